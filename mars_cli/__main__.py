"""`python -m mars_cli` is the same as `mars`."""

from mars_cli.main import run

if __name__ == "__main__":
    run()
