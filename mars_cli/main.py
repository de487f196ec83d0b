"""The `mars` entry point: the typer app, command table and the stdout/exit-code guard.

Exit status: 0 ok, 1 bad data or runtime error, 2 usage error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM: ended as Ctrl-C ends it, summary line included).
A reader that goes away (`mars … | head -1`) ends the program quietly.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

try:  # typer ≥ 0.29 vendors its own click; older typer uses the click package
    from typer._click import exceptions as click_exc
    from typer._click.utils import echo
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exc
    from click.utils import echo

from mars_cli import __version__, streams
from mars_cli.errors import TERM_GRACE_S, MarsError, Terminated, stop_status, stop_word
from mars_cli.urls import redact

# name -> module under mars_cli.commands. Each module is light to import (heavy libraries
# are imported inside the command body) and exposes either `main` (one command) or
# `app` (a typer group such as `mars index text`).
COMMANDS = {
    "crop": "crop",
    "search": "search",
    "image-search": "image_search",
    "index": "index",
    "data": "data",
    "tiny-model": "tiny_model",
    "rollout": "rollout",
    "ask": "ask",
    "judge": "judge",
    "advantage": "advantage",
    "update": "update",
    "sft": "sft",
    "eval": "eval",
    "show": "show",
    "serve": "serve",
    "prompt": "prompt",
    "env": "env",
    "plot": "plot",
}


class CommandFailed(click_exc.ClickException):
    """A MarsError on its way out: `mars CMD: message`, with the error's exit code."""

    def __init__(self, prog: str, message: str, exit_code: int = 1):
        super().__init__(redact(message))
        self.prog = prog
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        echo(f"{self.prog}: {self.message}", err=True)


class MarsGroup(TyperGroup):
    """Turns MarsError into `mars CMD: message` and names the program for warnings.

    Also applies the command-line conventions of mars_cli.flags to the whole tree.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from mars_cli import flagchecks
        from mars_cli.flags import finish_tree

        for cmd in self.commands.values():  # every command, and every command of a group, takes --config
            _with_config_option(cmd)
        finish_tree(self)
        flagchecks.install(self, click_exc)  # every numeric flag finite and in its range

    def invoke(self, ctx):
        pending = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []) + list(ctx.args)
        sub = pending[0] if pending else None
        prog = f"mars {sub}" if sub in self.commands else "mars"
        token = streams.set_program(prog)
        try:
            return super().invoke(ctx)
        except MarsError as e:
            raise CommandFailed(prog, str(e), e.exit_code) from e
        except KeyboardInterrupt as e:
            if "mars_cli.progress" in sys.modules:  # each open progress bar's summary first
                sys.modules["mars_cli.progress"].stopped(e)
            sys.stderr.write(f"{prog}: {stop_word(e)}\n")
            raise typer.Exit(stop_status(e)) from None
        except BrokenPipeError:
            # The reader went away (`| head -1`): that is how pipelines end, not an error.
            if "mars_cli.pipes" in sys.modules:
                sys.modules["mars_cli.pipes"].say_last_words()
            streams.silence_broken_pipe()
            raise typer.Exit(0) from None
        finally:
            streams.reset_program(token)

    def list_commands(self, ctx):
        # Keep the table's order (the pipeline's order), not alphabetical.
        return list(self.commands)


def _load_config(ctx: typer.Context, value: Optional[str]):
    """Eager: fill the default map from the file before the other options are read."""
    if value:
        from mars_cli.settings import config_defaults

        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, value)}
        ctx.meta["mars.config"] = str(value)
    return value


def _with_config_option(cmd) -> None:
    """Give a command (every command of a group) the `--config FILE` option, once."""
    if getattr(cmd, "commands", None) is not None:
        for sub in cmd.commands.values():
            _with_config_option(sub)
        return
    if any(p.name == "config" for p in cmd.params):
        return
    cmd.params.append(_config_param())


def _config_param():
    """A fresh `--config` option, made by typer (its vendored click has no public Option)."""
    holder = typer.Typer()

    @holder.command()
    def _cmd(config: Optional[str] = typer.Option(
            None, "--config", metavar="FILE", is_eager=True, expose_value=False, callback=_load_config,
            help="Read options from a YAML or TOML file (keys: long option names); flags and MARS_* variables win.")):
        pass  # pragma: no cover - never invoked

    return typer.main.get_command(holder).params[0]


app = typer.Typer(
    cls=MarsGroup,
    name="mars",
    help="Train and run multimodal search agents as small Unix commands over JSONL.\n\n"
    "  mars rollout --policy ckpt/ < tasks.jsonl | mars judge | mars advantage > batch.jsonl\n\n"
    "  mars update batch.jsonl --policy ckpt/ --out ckpt-next/",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mars {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False, help="More log output on stderr (-vv for debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary lines on stderr."),
) -> None:
    streams.verbosity, streams.quiet = verbose, quiet
    level = os.environ.get("MARS_LOG_LEVEL") or ("DEBUG" if verbose > 1 else "INFO" if verbose else "WARNING")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(streams.RedactingFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _register() -> None:
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(f"mars_cli.commands.{modname}")
        except ModuleNotFoundError as e:
            if e.name == f"mars_cli.commands.{modname}":
                continue  # command not built in this tree
            raise
        if hasattr(mod, "app"):
            app.add_typer(mod.app, name=name)
        else:
            doc = (mod.main.__doc__ or "").strip()
            app.command(name, help=doc, short_help=doc.splitlines()[0] if doc else None)(mod.main)


_register()


def _launcher_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N before the command (`mars --local_rank=0 update …`):
    take it into LOCAL_RANK, as torchrun would have set it."""
    import os

    if argv and argv[0].startswith(("--local_rank", "--local-rank")):
        flag, _, value = argv[0].partition("=")
        rest = argv[1:]
        if not value and rest:
            value, rest = rest[0], rest[1:]
        os.environ.setdefault("LOCAL_RANK", value)
        return rest
    return argv


def _terminate_like_interrupt() -> None:
    """SIGTERM (kill, systemd, docker stop, a pipeline's supervisor) raises Terminated in the
    main thread, so the command ends as Ctrl-C ends it: cleanup and the summary line, exit
    143. Commands that handle their own shutdown (`mars serve`) install their own handler."""
    import signal
    import threading

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the second one ends the process at once
        timer = threading.Timer(TERM_GRACE_S, os._exit, args=(143,))
        timer.daemon = True
        timer.start()
        Terminated.raised = True
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


def run(argv: list[str] | None = None) -> None:
    """Console entry: guard stdout, run the app, map failures to exit codes."""
    argv = _launcher_local_rank(sys.argv[1:] if argv is None else list(argv))
    _terminate_like_interrupt()
    streams.reopen_closed_std()
    # Help and version are text for a person: leave them on stdout.
    if any(a in ("-h", "--help", "--version") for a in argv) or not argv:
        if streams.stdout_closed():
            sys.stderr.write("mars: standard output is closed\n")
            sys.exit(1)
    else:
        streams.guard_stdout()
    command = typer.main.get_command(app)
    code = 0
    try:
        rv = command.main(args=argv, prog_name="mars", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click_exc.ClickException as e:
        e.show()
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt) as e:
        sys.stderr.write(f"mars: {stop_word(e)}\n")
        code = stop_status(e)
    except BrokenPipeError:
        streams.silence_broken_pipe()
    except OSError as e:  # help text to a full or broken stdout
        sys.stderr.write(f"mars: <stdout>: {(e.strerror or str(e)).lower()}\n")
        code = 1
    try:
        streams.close_records()
        sys.stdout.flush()
    except BrokenPipeError:
        streams.silence_broken_pipe()
    except OSError as e:  # `> /dev/full`: the last buffered records could not be written
        if code == 0:
            sys.stderr.write(f"mars: <stdout>: {(e.strerror or str(e)).lower()}\n")
            code = 1
        streams.silence_broken_pipe()
    engine = sys.modules.get("mars_cli.rl.engine")  # loaded only by the training commands
    if engine is not None:
        engine.exit_rank(code)
    if code in (130, 143):
        import threading

        if any(t.daemon and t.is_alive() for t in threading.enumerate()):
            # Interrupted with a reader thread still blocked on stdin (a stage in a pipeline
            # whose writer is alive): Python's shutdown would wait for that read's lock and
            # abort. Everything is written and flushed by now.
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)
