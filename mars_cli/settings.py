"""`--config FILE` for every command, and the resolved settings a training run records.

A config file (YAML, or TOML by its .toml suffix) holds one command's options at the top
level, keyed by their long names without `--` (`micro-batch-tokens: 2048`; `_` works
too). The file fills click's default map before the other options are read, so the
precedence is click's own: a flag on the command line, then the option's MARS_* variable,
then the file, then the built-in default. Positional arguments are not settings.

`resolved(ctx)` is what a command ran with: every option's value and where it came from;
update and sft write it beside their checkpoint as mars_settings.json, and trackers
(wandb, TensorBoard) record it as the run's config: URL credentials in any value are
masked here (mars_cli.urls.redact_value), the one place all three read from.

`env_number(name, default)` reads a MARS_* number that no flag carries (image limits,
cache budgets, the progress interval): the one check for all of them, a usage error (exit 2,
like a bad flag or a bad number in an option's own MARS_* variable) when the text is not a
number or is below the minimum.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mars_cli.errors import MarsError, UsageError
from mars_cli.urls import redact_value

SETTINGS_FILE = "mars_settings.json"


def read_config_file(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML or TOML file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError: both say where
        raise UsageError(f"--config {path}: cannot parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values at the top level")
    return data


def option_names(command) -> dict[str, str]:
    """Accepted config keys → parameter names: each long option (with - or _), not arguments."""
    keys: dict[str, str] = {}
    for p in command.params:
        if getattr(p, "param_type_name", "") != "option" or p.name in ("config", "help"):
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = p.name
                keys[opt[2:].replace("-", "_")] = p.name
    return keys


def config_defaults(command, path: str | os.PathLike) -> dict:
    """The file's settings as click's default_map for `command`; unknown keys are errors."""
    data = read_config_file(path)
    keys = option_names(command)
    params = {p.name: p for p in command.params}
    out, unknown = {}, []
    for k, v in data.items():
        name = keys.get(str(k))
        if name is None:
            unknown.append(str(k))
            continue
        if getattr(params[name], "multiple", False) and not isinstance(v, list):
            v = [v]  # `by: category` means one value, not the letters of a string
        out[name] = v
    if unknown:
        known = sorted({o[2:] for p in command.params if p.name in keys.values() for o in p.opts if o.startswith("--")})
        raise UsageError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(u) for u in unknown)} for `{command.name}` (known: {', '.join(known)})")
    return out


def env_number(name: str, default: float, *, integer: bool = True, minimum: float = 1):
    """The MARS_* variable `name` as a number >= minimum (an int when `integer`), else `default`
    when unset or blank; anything else is a UsageError naming the variable and what it needs."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    need = ("an integer" if integer else "a number") + (
        " >= 0" if minimum == 0 else " >= 1" if minimum == 1 and integer else f" >= {minimum:g}")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name} must be {need}, got {raw!r}") from None
    if not value >= minimum or value == float("inf") or (integer and value != int(value)):
        raise UsageError(f"{name} must be {need}, got {raw!r}")
    return int(value) if integer else value


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def resolved(ctx) -> dict:
    """{"command", "config", "settings": {option: value}, "sources": {option: flag|env|config|default}}."""
    names = {"COMMANDLINE": "flag", "ENVIRONMENT": "env", "DEFAULT_MAP": "config", "DEFAULT": "default", "PROMPT": "prompt"}
    settings, sources = {}, {}
    for p in ctx.command.params:
        if p.name not in ctx.params or p.name in ("local_rank",):
            continue
        settings[p.name] = redact_value(_jsonable(ctx.params[p.name]))
        src = ctx.get_parameter_source(p.name)
        sources[p.name] = names.get(getattr(src, "name", ""), "default")
    return {"command": ctx.command_path.replace("mars ", "", 1), "config": ctx.meta.get("mars.config"),
            "settings": settings, "sources": sources}


def write_settings(out_dir: str | os.PathLike, ctx=None, extra: dict | None = None) -> Path | None:
    """Write mars_settings.json into `out_dir` (atomically); None without a click context."""
    from mars_cli import __version__
    from mars_cli.fsutil import atomic_file

    if ctx is None:
        try:
            from typer._click.globals import get_current_context
        except ImportError:  # pragma: no cover - older typer uses the click package
            from click import get_current_context
        ctx = get_current_context(silent=True)
    if ctx is None or not Path(out_dir).is_dir():
        return None
    data = {"mars_version": __version__, **resolved(ctx), **(extra or {})}
    dest = Path(out_dir) / SETTINGS_FILE
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return dest
