"""Sections of mars(1) built from the code: the flag vocabulary table, the old flag names
still accepted, and shell completion. Used by gen_man.py (troff helpers passed in)."""

from __future__ import annotations


def flags_section(esc, inline) -> list[str]:
    """The vocabulary as a tbl table (mars.1 starts with the `'\\" t` line that asks for tbl)."""
    from mars_cli.flags import VOCABULARY

    out = [".SH FLAGS",
           ".PP",
           inline("Every command spells the same thing the same way; a new flag takes its name from this table. "
                  "`-v` and `-q` work before the command name or after it."),
           ".TS", "tab(@);", "lB lB", "lw(26n) lx."]
    out.append("flag@meaning")
    for flag, meaning in VOCABULARY:
        out.append(f"T{{\n{esc(flag)}\nT}}@T{{\n{esc(meaning)}\nT}}")
    out.append(".TE")
    return out


def renamed_section(root, walk, make_ctx, esc) -> list[str]:
    """Old spellings (hidden from --help) that still work, with a warning, per command."""
    from mars_cli.flags import ATTR

    rows = []
    for path, cmd, _ in walk(root, [], make_ctx(root, "mars")):
        for old, spec in (getattr(getattr(cmd, "callback", None), ATTR, None) or {}).items():
            new = spec if isinstance(spec, str) else spec[0]
            rows.append((" ".join(["mars", *path]), old if isinstance(spec, str) else f"{old} N", new))
    if not rows:
        return []
    out = [".SH OLD FLAG NAMES", ".PP",
           esc("These spellings still work, hidden from --help; each use warns once, "
               "e.g. \"mars search: --output is now --out\".")]
    for cmd, old, new in rows:
        out += [".TP", f"\\fB{esc(cmd)} {esc(old)}\\fR", f"now \\fB{esc(new)}\\fR"]
    return out


def completion_section(esc) -> list[str]:
    return [".SH SHELL COMPLETION", ".PP",
            esc("mars --install-completion installs completion of commands, subcommands and flags for the current "
                "shell (bash, zsh, fish or PowerShell); mars --show-completion prints the script instead, to install "
                "by hand. Completion runs mars itself with _MARS_COMPLETE set, so it always matches the installed "
                "version.")]
