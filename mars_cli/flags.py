"""One flag vocabulary: renamed flags, defaults as written, -v/-q on every command.

`finish_tree` runs once over the click command tree (from `MarsGroup.__init__`, so the
entry point, tests' CliRunner and the man page generator all see the same tree):

- renamed flags: a command declares `@renamed({"--output": "--out"})`; the old
  spelling keeps working, is hidden from --help, and warns once per process
  (`mars CMD: --output is now --out`). An alias may carry a test of the next word,
  for a short flag whose letter now means something else (crop's `-q 80`).
- defaults shown as a person writes them: 1e-4, not 0.0001 or 1e-06; a help text that
  spells its own `[default: …]` is left alone (and not given a second one).
- plain help: no Rich markup, so `[default: 3e-4 gspo, 0.2 grpo]` or `[0, 1]` in a help
  text print as written, and flags show no `<bool>` type they would not accept.
- `-v/--verbose` after the subcommand as well as before it, and `-q/--quiet` (no
  progress or summary lines on stderr) on every command that has no -q of its own.
- whole summaries: each command's line in its parent's --help is the first paragraph of
  its help, never cut at click's 45 characters.

The vocabulary itself (which name means what) is the table in mars(1): VOCABULARY below.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from typing import Callable

ATTR = "__mars_renamed__"
_warned: set[tuple[str, str]] = set()

# (flag, meaning) — the names every command uses for the same thing; man/mars.1 prints it.
VOCABULARY = [
    ("-o, --out PATH", "The command's output: a file of records, a folder, a checkpoint or a page."),
    ("-q, --quiet", "No progress or summary lines on stderr (warnings and errors still print)."),
    ("-v, --verbose", "More log output on stderr (-vv: debug); before or after the command name."),
    ("--seed N", "The random seed; the same seed gives the same output."),
    ("--max-inflight N", "Requests or episodes in flight at once (the one concurrency knob)."),
    ("--batch-size N", "Trajectories per optimizer step (sft, update)."),
    ("--batch-groups N", "Groups per advantage batch (advantage)."),
    ("-n N", "Samples per task (rollout)."),
    ("-k, --num-results N", "Results per query (search, image-search)."),
    ("--top-k, --top-p, --temperature", "Sampling knobs of a policy (rollout, ask)."),
    ("--limit N", "Stop after N items (tasks, episodes)."),
    ("--artifacts DIR", "Where crops and thumbnails are written under content-hash names."),
    ("--image-root DIR", "Where relative image paths in the input resolve [default: beside the input file]."),
    ("--index DIR", "A local text index folder."),
    ("--image-index DIR", "A local image index folder."),
    ("--dense-model DIR", "A local text embedding model."),
    ("--image-model DIR", "A local image embedding (CLIP-style) model."),
    ("--policy DIR", "The policy checkpoint (a model name with --engine openai)."),
    ("--model NAME", "A model name at an OpenAI-compatible endpoint (with --base-url)."),
    ("--min-pixels N", "The image processor's lower pixel bound (smart resize)."),
    ("--max-pixels N", "The image processor's upper pixel bound (smart resize)."),
    ("--max-prompt-tokens N", "Token budget of an episode's prompt side."),
    ("--max-response-tokens N", "Token budget of an episode's generated side."),
    ("--protocol NAME", "The agent protocol profile (sensenova, mars)."),
    ("--server URL[,URL...]", "mars serve endpoints to generate with."),
    ("--push URL[,URL...]", "mars serve endpoints to push new weights to."),
    ("--report-to NAME", "Where training metrics are also sent."),
    ("--config FILE", "Read flags from a file."),
    ("--skip-bad", "Skip unparsable input lines with a warning instead of failing."),
    ("--timeout S", "Seconds per network request."),
    ("--retries N", "Retries of a failed network request."),
]


def renamed(aliases: dict[str, str | tuple[str, Callable[[str | None], bool]]]):
    """Declare a command's old flag spellings: `@renamed({"--output": "--out"})`.

    A value may be `(new, test)`: the alias applies only when `test(next_word)` holds
    (`{"-q": ("--quality", str.isdigit)}` where -q now means --quiet).
    """

    def mark(fn):
        setattr(fn, ATTR, {**getattr(fn, ATTR, {}), **aliases})
        return fn

    return mark


def rewrite(args: list[str], aliases: dict, prog: str) -> list[str]:
    """Old spellings in `args` replaced by the new ones (warning once each); stops at `--`."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        new = None
        for old, spec in aliases.items():
            target, test = (spec, None) if isinstance(spec, str) else spec
            nxt = args[i + 1] if i + 1 < len(args) else None
            if arg == old and (test is None or test(nxt or "")):
                new = target
            elif old.startswith("--") and arg.startswith(old + "="):
                new = target + arg[len(old):]
            if new is not None:
                if (prog, old) not in _warned:
                    _warned.add((prog, old))
                    sys.stderr.write(f"{prog}: {old} is now {target}\n")
                break
        out.append(new if new is not None else arg)
    return out


def show_number(value: float) -> str:
    """A float as a person writes it: 1e-4 rather than 0.0001 or 1e-06; 20.0 stays."""
    text = repr(float(value))
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return text
    # the shortest mantissa that reads back as the same float
    cand = next(c for c in (f"{value:.{d}e}" for d in range(17)) if float(c) == value)
    m, _, e = cand.partition("e")
    sci = f"{m}e{int(e)}"
    return sci if abs(value) < 1 and len(sci) < len(text) else text


def _set_verbose(ctx, param, value) -> None:
    if value:
        from mars_cli import streams

        streams.verbosity = max(streams.verbosity, value)
        if not os.environ.get("MARS_LOG_LEVEL"):
            logging.getLogger().setLevel("DEBUG" if streams.verbosity > 1 else "INFO")


def _set_quiet(ctx, param, value) -> None:
    if value:
        from mars_cli import streams

        streams.quiet = True


def _finish_params(cmd) -> None:
    names = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for p in cmd.params:
        if p.param_type_name != "option":
            continue
        if re.search(r"\[default: [^\]]*\]", p.help or ""):
            p.show_default = False  # the help text writes its own
        elif isinstance(p.default, float) and p.show_default is not False:
            text = show_number(p.default)
            p._get_default_string = lambda *a, _text=text, **kw: _text
    for extra in _common_options():
        if not names & set(extra.opts):
            cmd.params.append(extra)


def _common_options() -> list:
    """Fresh -v/--verbose and -q/--quiet parameters, built by typer itself (any version)."""
    import typer

    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(
        verbose: int = typer.Option(0, "-v", "--verbose", count=True, show_default=False,
                                    help="More log output on stderr (-vv for debug)."),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or summary lines on stderr."),
    ) -> None:
        pass

    params = typer.main.get_command(probe).params
    for p, callback in zip(params, (_set_verbose, _set_quiet)):
        p.expose_value, p.callback = False, callback
    return params


def _install_aliases(cmd, aliases: dict) -> None:
    original = cmd.parse_args

    def parse_args(ctx, args):
        from mars_cli import streams

        return original(ctx, rewrite(list(args), aliases, streams.program.get()))

    cmd.parse_args = parse_args


def finish_tree(cmd) -> None:
    """Apply the conventions above to `cmd` and every command below it (idempotent)."""
    if getattr(cmd, "_mars_finished", False):
        return
    cmd._mars_finished = True
    if hasattr(cmd, "rich_markup_mode"):
        cmd.rich_markup_mode = None
    if not getattr(cmd, "short_help", None) and getattr(cmd, "help", None):
        # the listing in the parent's --help shows the whole first paragraph (click cuts at 45 characters)
        cmd.short_help = " ".join(inspect.cleandoc(cmd.help).split("\n\n")[0].split())
    subs = getattr(cmd, "commands", None)
    if subs is not None:
        for sub in subs.values():
            finish_tree(sub)
        return
    _finish_params(cmd)
    aliases = getattr(getattr(cmd, "callback", None), ATTR, None)
    if aliases:
        _install_aliases(cmd, aliases)
