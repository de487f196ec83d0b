"""Checks on flags, applied to the whole command tree when it is built, before any work.

Numbers: every float flag must be finite (`--lr nan`, `--temperature inf` are usage
errors, exit 2), and flags whose meaning has a valid range are listed in RANGES, keyed by
command path and flag; a flag that declares `min=`/`max=` in its typer.Option needs no
entry. tests/test_hardening_io.py walks the tree and fails for a numeric flag that has
neither and is not listed in UNBOUNDED, so a new flag cannot be added unchecked.

Outputs: the paths in OUTPUTS are checked to be writable when the flag is parsed
(fsutil.check_output: the folder exists and accepts a file, a directory output does not
replace a file or device), so `update --out /read-only/x` fails in a second, not after
the training, and a bad `-o` fails before a model is loaded.
"""

from __future__ import annotations

import math
import typing

# (low, high, low_open, high_open); None = unbounded on that side.
GE0 = (0, None, False, False)
GT0 = (0, None, True, False)
GE1 = (1, None, False, False)
UNIT_OPEN_LOW = (0, 1, True, False)  # (0, 1]
UNIT = (0, 1, False, False)  # [0, 1]

RANGES: dict[str, tuple] = {
    "crop --min-side": (1, 65500, False, False),
    "crop --max-pixels": GE1, "crop --min-pixels": GE1, "crop --max-image-pixels": GE1,
    "rollout -n": GE1, "rollout --max-turns": GE1, "rollout --max-total-tokens": GE1,
    "rollout --max-new-tokens": GE1, "rollout --temperature": GE0,
    "rollout --top-p": UNIT_OPEN_LOW, "rollout --top-k": GE0, "rollout --presence-penalty": (-2, 2, False, False),
    "rollout --tp": GE1, "rollout --gpu-memory-utilization": UNIT_OPEN_LOW,
    "rollout --request-timeout": GT0, "rollout --retries": GE0,
    "ask --max-turns": GE1, "ask --max-total-tokens": GE1, "ask --max-new-tokens": GE1, "ask --temperature": GE0,
    "ask --request-timeout": GT0, "ask --retries": GE0,
    "rollout --max-prompt-tokens": GE1, "rollout --max-response-tokens": GE1, "rollout --max-inflight": GE1,
    "rollout --min-pixels": GE1, "rollout --max-pixels": GE1, "rollout --max-error-rate": UNIT,
    "rollout --batch-groups": GE1, "rollout --max-staleness": GE0, "rollout --search-k": GE1,
    "ask --max-prompt-tokens": GE1, "ask --max-response-tokens": GE1, "ask --min-pixels": GE1, "ask --max-pixels": GE1,
    "serve --gpu-memory-utilization": UNIT_OPEN_LOW, "serve --min-pixels": GE1, "serve --max-pixels": GE1,
    "judge --format-weight": GE0, "judge --min-judge-success": UNIT, "judge --tool-cost": GE0, "judge --timeout": GT0,
    "advantage --eps": GE0, "advantage --batch-eps": GE0,
    "update --eps-low": (0, 1, False, True), "update --eps-high": GE0, "update --beta": GE0, "update --lr": GT0,
    "update --weight-decay": GE0, "update --push-max-gap": GT0, "update --grad-clip": GT0, "update --zero": (0, 3, False, False),
    "sft --lr": GT0, "sft --weight-decay": GE0, "sft --grad-clip": GT0, "sft --warmup": (0, 1, False, True),
    "sft --min-lr-ratio": UNIT, "sft --zero": (0, 3, False, False),
}

# Output paths checked at parse time: "file" (written in place if a device or FIFO) or "dir".
OUTPUTS: dict[str, str] = {
    "update --out": "dir", "update --state": "dir", "sft --out": "dir", "sft --state": "dir",
    "index text --out": "dir", "index images --out": "dir", "data convert --out": "dir", "data synth --out": "dir",
    "rollout -o": "file", "judge --out": "file", "advantage --out": "file", "eval --out": "file",
    "search --out": "file", "image-search --out": "file", "show --out": "file", "crop --out": "file",
    "tiny-model --out": "dir", "prompt -o": "file",
}

# Numeric flags any finite value of which means something.
UNBOUNDED = {
    "crop x0", "crop y0", "crop x1", "crop y1",  # checked against each other by crop itself
    "tiny-model --seed", "rollout --seed", "ask --seed", "update --seed", "sft --seed", "data convert --seed",
    "data synth --seed", "serve --seed", "update --local_rank", "sft --local_rank", "sft --min-reward",
}


def numeric_kind(annotation) -> type | None:
    """int or float when a parameter's annotation is one (optionally Optional), else None."""
    if annotation in (int, float):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float):
        return args[0]
    return None


def describe(rng: tuple) -> str:
    """The range in words, as the commands' own checks say it ("at least 1", "in (0, 1]")."""
    lo, hi, lo_open, hi_open = rng
    if hi is None:
        return f"{'greater than' if lo_open else 'at least'} {lo}"
    if lo is None:
        return f"{'less than' if hi_open else 'at most'} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def problem(value, rng: tuple | None) -> str | None:
    """Why `value` is not acceptable for a flag with range `rng` (None: only finiteness)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if rng is None or value is None:
        return None
    lo, hi, lo_open, hi_open = rng
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return f"must be {describe(rng)}"
    if hi is not None and (value > hi or (hi_open and value == hi)):
        return f"must be {describe(rng)}"
    return None


def walk(command, path=()):
    """(\"cmd sub\", param) for every parameter of every leaf command."""
    subs = getattr(command, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from walk(sub, (*path, name))
        return
    for p in command.params:
        yield " ".join(path), p


def key(path: str, param) -> str:
    opts = getattr(param, "opts", None) or [param.name]
    return f"{path} {opts[0]}" if path else opts[0]


def _wrap(param, check) -> None:
    original = param.callback

    def callback(ctx, p, value):
        if original is not None:
            value = original(ctx, p, value)
        check(ctx, p, value)
        return value

    param.callback = callback


def _output_check(kind: str):
    def check(ctx, param, value):
        if value is not None and str(value) != "-":
            from mars_cli.fsutil import check_output

            check_output(value, kind=kind, create=False)  # a MarsError: `mars CMD: PATH: …`, exit 1

    return check


def install(command, errors) -> None:
    """Wrap the callback of every numeric parameter with its check (a usage error, exit 2),
    and of every output path in OUTPUTS with check_output (exit 1)."""
    for path, p in walk(command):
        if key(path, p) in OUTPUTS:
            _wrap(p, _output_check(OUTPUTS[key(path, p)]))
            continue
        desc = getattr(p, "type_descriptor", None)
        kind = numeric_kind(getattr(desc, "annotation", None))
        if kind is None:
            continue
        rng = RANGES.get(key(path, p))
        original = p.callback

        def check(ctx, param, value, original=original, rng=rng):
            if original is not None:
                value = original(ctx, param, value)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                why = problem(v, rng)
                if why:  # "--eps must be at least 0, got -1.0" (exit 2)
                    name = (getattr(param, "opts", None) or [param.name])[0]
                    if getattr(ctx.get_parameter_source(param.name), "name", "") == "ENVIRONMENT" and param.envvar:
                        name += f" (from {param.envvar})"  # the value the user did not type: say where it came from
                    raise errors.UsageError(f"{name} {why}, got {v}", ctx=ctx)
            return value

        p.callback = check
