"""Run a mars command in-process the way the real entry point reports it."""

from typer.testing import CliRunner

from mars_cli.main import app

runner = CliRunner()


class Ran:
    """A command's outcome, with a MarsError shown as `mars CMD: message` on stderr.

    typer's standalone mode would draw errors in a rich panel; the `mars` entry point
    prints them plainly, so the command runs non-standalone and the error is formatted
    here exactly as `mars_cli.main.run` formats it.
    """

    def __init__(self, args, input=None, env=None):
        res = runner.invoke(app, [str(a) for a in args], input=input, env=env, standalone_mode=False)
        self.stdout, self.stderr, self.exit_code = res.stdout, res.stderr, res.exit_code
        e = res.exception
        if e is not None and hasattr(e, "prog"):
            self.stderr += f"{e.prog}: {e.message}\n"
            self.exit_code = e.exit_code
        elif e is not None and hasattr(e, "format_message") and hasattr(e, "exit_code"):
            self.stderr += f"Error: {e.format_message()}\n"  # a click usage error (exit 2)
            self.exit_code = e.exit_code
        elif e is not None and not isinstance(e, SystemExit):
            raise e
