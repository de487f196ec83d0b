"""Experiment tracking for update, sft and eval: `--report-to tensorboard|wandb|none`.

    with open_tracker("tensorboard", logging_dir=None, command="update", config=settings) as t:
        t.log(metrics_record, step=metrics_record["step"])

Every numeric field of a record becomes one scalar, nested fields by path
(`logprob_gap/mean_abs`), under a prefix (`train/`, `eval/<benchmark>/`). TensorBoard event
files are written by tensorboardX (no TensorFlow) into --logging-dir, default
`./runs/<command>-<UTC time>/`, the layout TensorBoard and TRL use. wandb runs in whatever
mode its environment says (WANDB_MODE=offline writes to the logging dir and sends nothing);
its key comes only from the environment (WANDB_API_KEY), never from a flag or a file.
A run's config has its URL credentials masked (mars_cli.urls.redact_value) before either
backend sees it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

from mars_cli.errors import MarsError, UsageError
from mars_cli.urls import redact_value

REPORT_TO = ("none", "tensorboard", "wandb")


def default_logging_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record (nested dicts flattened with '/'), booleans left out."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


class Tracker:
    """Logs metric records to the chosen backends; a no-op for `none`."""

    def __init__(self, report_to: str, logging_dir: Path, command: str, config: dict | None):
        self.report_to, self.logging_dir, self.command = report_to, Path(logging_dir), command
        self._tb = self._wandb = None
        if report_to == "none":
            return
        config = redact_value(config) if config else config
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise MarsError("--report-to tensorboard needs the tensorboardX package (pip install tensorboardX)") from None
            # Event files are named by the second and host: successive commands logging into
            # one directory (update, then eval) would overwrite each other without a suffix.
            self._tb = SummaryWriter(logdir=str(self.logging_dir), filename_suffix=f".{command}.{os.getpid()}.{time.time_ns()}")
            if config:
                self._tb.add_text("mars/settings", "\n".join(f"    {k}: {v!r}" for k, v in sorted(config.items())), 0)
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise MarsError("--report-to wandb needs the wandb package (pip install wandb)") from None
            project = os.environ.get("WANDB_PROJECT") or "mars"
            try:
                with _argv_redacted():  # wandb records the command line in the run's metadata
                    self._wandb = wandb.init(project=project, dir=str(self.logging_dir), config=config or {},
                                             job_type=command, name=os.environ.get("WANDB_NAME") or self.logging_dir.name,
                                             reinit="finish_previous")
            except Exception as e:  # wandb raises its own error types (auth, network)
                raise MarsError(f"--report-to wandb: {type(e).__name__}: {e}") from None
        else:
            raise MarsError(f"unknown --report-to {report_to!r} (choose from {', '.join(REPORT_TO)})")

    def log(self, rec: dict, *, step: int | None = None, prefix: str = "") -> None:
        values = scalars(rec, prefix)
        if not values:
            return
        step = int(step) if step is not None else 0
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            self._wandb = None
            # The run's file is written by wandb's service process; tearing it down waits for
            # every record to reach the disk (finish alone may return first).
            wandb.teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _argv_redacted():
    """sys.argv with URL credentials masked, for a library that records the command line."""
    saved = sys.argv
    sys.argv = redact_value(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


def check_report_to(report_to: str | None) -> str:
    """Validate --report-to before any work (a typo must not cost a training run): the choice and its package."""
    report_to = (report_to or "none").lower()
    if report_to not in REPORT_TO:
        raise UsageError(f"unknown --report-to {report_to!r} (choose from {', '.join(REPORT_TO)})")
    package = {"tensorboard": "tensorboardX", "wandb": "wandb"}.get(report_to)
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise UsageError(f"--report-to {report_to} needs the {package} package (pip install {package})")
    return report_to


def report(records: list[dict], *, report_to: str | None, logging_dir, command: str, step_key: str = "step",
           prefix: str = "train/") -> None:
    """Log finished metrics records; after the work is done a tracker failure is a warning, not a lost run."""
    if (report_to or "none").lower() == "none":
        return
    from mars_cli import streams

    try:
        with open_tracker(report_to, logging_dir=logging_dir, command=command, config=run_settings()) as t:
            for rec in records:
                t.log(rec, step=rec.get(step_key), prefix=prefix)
    except (MarsError, OSError) as e:
        streams.warn(f"--report-to {report_to}: nothing logged: {e}")


def open_tracker(report_to: str | None, *, logging_dir: str | os.PathLike | None, command: str,
                 config: dict | None = None) -> Tracker:
    """A Tracker for `report_to` (none, tensorboard, wandb); `logging_dir` None = runs/<command>-<time>/."""
    report_to = (report_to or "none").lower()
    if report_to not in REPORT_TO:
        raise UsageError(f"unknown --report-to {report_to!r} (choose from {', '.join(REPORT_TO)})")
    where = Path(logging_dir) if logging_dir else default_logging_dir(command)
    return Tracker(report_to, where, command, config)


def run_settings() -> dict:
    """The current command's resolved options (for the tracker's run config), {} outside a command."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer uses the click package
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return {}
    from mars_cli.settings import resolved

    return resolved(ctx)["settings"]
