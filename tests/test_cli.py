"""The entry guard: stdout for records only, exit codes, quiet broken pipes, fast start."""

import os
import subprocess
import sys
import textwrap

import orjson
from typer.testing import CliRunner

from mars_cli.main import COMMANDS, app

PY = sys.executable

# A command registered only for this test: it prints junk the way vLLM/DeepSpeed do,
# writes records, and fails on request.
NOISY = textwrap.dedent(
    """
    import os, sys, typer
    from mars_cli import jsonl
    from mars_cli.errors import MarsError
    from mars_cli.main import app, run

    @app.command("noisy")
    def noisy(n: int = 3, fail: bool = False, interrupt: bool = False):
        print("library chatter on stdout")
        os.write(1, b"C-level chatter on fd 1\\n")
        with jsonl.RecordWriter() as w:
            for i in range(n):
                w.write({"i": i})
        if fail:
            raise MarsError("data.jsonl:3: something was wrong")
        if interrupt:
            raise KeyboardInterrupt

    run()
    """
)


def run_noisy(*args, shell_tail=""):
    cmd = [PY, "-c", NOISY, "noisy", *args]
    if shell_tail:
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in cmd)
        return subprocess.run(f"set -o pipefail; {quoted} {shell_tail}", shell=True, capture_output=True, executable="/bin/bash")
    return subprocess.run(cmd, capture_output=True)


def test_stdout_carries_records_only():
    p = run_noisy("--n", "2")
    assert p.returncode == 0, p.stderr
    assert [orjson.loads(l) for l in p.stdout.splitlines()] == [{"schema_version": 1, "i": 0}, {"schema_version": 1, "i": 1}]
    assert b"library chatter" in p.stderr and b"C-level chatter" in p.stderr


def test_errors_are_prefixed_and_exit_1():
    p = run_noisy("--fail")
    assert p.returncode == 1
    assert p.stderr.decode().strip().endswith("mars noisy: data.jsonl:3: something was wrong")
    assert b"Traceback" not in p.stderr


def test_interrupt_exits_130():
    p = run_noisy("--interrupt")
    assert p.returncode == 130 and b"interrupted" in p.stderr


def test_usage_error_exits_2():
    p = run_noisy("--n", "many")
    assert p.returncode == 2


def test_head_ends_quietly():
    p = run_noisy("--n", "200000", shell_tail="| head -1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == '{"schema_version":1,"i":0}\n'
    assert b"Traceback" not in p.stderr and b"BrokenPipe" not in p.stderr


def test_import_does_not_load_heavy_libraries():
    code = "import sys, mars_cli.main; print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'vllm', 'bm25s', 'faiss') if m in sys.modules))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_help_lists_every_command_and_version():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in COMMANDS:
        if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "mars_cli", "commands", COMMANDS[name] + ".py")):
            assert name in r.stdout
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mars ")


def test_python_dash_m_and_unknown_command():
    p = subprocess.run([PY, "-m", "mars_cli", "no-such-command"], capture_output=True, text=True)
    assert p.returncode == 2 and "no-such-command" in p.stderr
