"""The command-line conventions of mars_cli.flags: help, renamed flags, -v/-q anywhere."""

from __future__ import annotations

import logging
import re

import pytest
import typer
from typer.testing import CliRunner

from mars_cli import flags, streams
from mars_cli.main import app


def leaves():
    """(path, click command) for every command of the tree."""
    root = typer.main.get_command(app)

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            if getattr(sub, "commands", None):
                yield from walk(sub, [*path, name])
            else:
                yield [*path, name], sub

    return list(walk(root, []))


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("path,cmd", leaves(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_help_shows_every_default_as_written(path, cmd):
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    text = flat(r.stdout)
    assert "<bool>" not in text  # flags take no value, so help shows none
    for p in cmd.params:
        if p.param_type_name != "option" or p.hidden:
            continue
        m = re.search(r"\[default: [^\]]*\]", p.help or "")
        if m:  # written by the help text: printed verbatim, and only once
            assert flat(m.group(0)) in text, (p.name, m.group(0))
            assert text.count(flat(m.group(0))) == 1
        elif isinstance(p.default, float):
            shown = flags.show_number(p.default)
            assert re.search(rf"default: {re.escape(shown)}[;\]]", text), (p.name, shown)
            assert f"({shown})" not in text


def test_update_help_keeps_its_clip_range_text():
    text = flat(CliRunner().invoke(app, ["update", "--help"]).stdout)
    assert "Lower clip range [default: 3e-4 gspo, 0.2 grpo]." in text
    assert "[default: 1e-4]" in text  # --beta, not 0.0001


@pytest.mark.parametrize("value,text", [(1e-4, "1e-4"), (1e-6, "1e-6"), (0.5, "0.5"), (0.01, "0.01"), (20.0, "20.0"),
                                        (3e-4, "3e-4"), (0.28, "0.28"), (0.0, "0.0"), (150000.0, "150000.0"), (1e-9, "1e-9")])
def test_show_number(value, text):
    assert flags.show_number(value) == text and float(text) == value


def test_rewrite_warns_once_and_stops_at_double_dash(capsys):
    flags._warned.clear()
    aliases = {"--output": "--out", "-q": ("--quality", str.isdigit)}
    assert flags.rewrite(["--output", "a", "--output=b", "-q", "80", "-q", "--", "--output"], aliases, "mars x") == \
        ["--out", "a", "--out=b", "--quality", "80", "-q", "--", "--output"]
    assert capsys.readouterr().err == "mars x: --output is now --out\nmars x: -q is now --quality\n"
    flags.rewrite(["--output", "c"], aliases, "mars x")
    assert capsys.readouterr().err == ""


def test_old_spelling_works_hidden_and_warns(tmp_path):
    from PIL import Image

    from clirun import Ran

    flags._warned.clear()
    Image.new("RGB", (100, 80), (10, 20, 30)).save(tmp_path / "a.png")
    r = Ran(["crop", tmp_path / "a.png", 0, 0, 1, 1, "--out-dir", tmp_path / "art", "-q", "50", "--format", "jpg"])
    assert r.exit_code == 0, r.stderr
    assert "mars crop: --out-dir is now --artifacts" in r.stderr and "mars crop: -q is now --quality" in r.stderr
    assert (tmp_path / "art").is_dir()
    helptext = CliRunner().invoke(app, ["crop", "--help"]).stdout
    assert "--out-dir" not in helptext and "--artifacts" in helptext


# Commands whose flags follow the vocabulary once their pending renames land (see mars(1)).
PENDING: set = set()


def test_every_command_names_its_output_dash_o_out():
    for path, cmd in leaves():
        if path[0] in PENDING:
            continue
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if "--output" in opts or "--out" in opts:
            assert {"-o", "--out"} <= opts and "--output" not in opts, path


def test_verbose_and_quiet_after_the_subcommand(tmp_path, monkeypatch):
    from clirun import Ran

    monkeypatch.setattr(streams, "verbosity", 0)
    monkeypatch.setattr(streams, "quiet", False)
    seen = {}

    def fake(*a, **kw):
        seen.update(verbosity=streams.verbosity, quiet=streams.quiet, level=logging.getLogger().level)
        return []

    monkeypatch.setattr("mars_cli.eval.metrics.compute_metrics", fake)
    f = tmp_path / "e.jsonl"
    f.write_text("")
    r = Ran(["eval", f, "-vv"])
    assert r.exit_code == 0, r.stderr
    assert seen["verbosity"] == 2 and seen["level"] == logging.DEBUG
    r = Ran(["judge", "-q", f])
    assert r.exit_code == 0 and streams.quiet and r.stderr == ""  # no progress summary either
