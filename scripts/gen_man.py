"""Generate the mars man pages from the command tree, or check that they are up to date.

    python scripts/gen_man.py           # write man/mars.1, man/mars-CMD[-SUB].1, man/mars-records.5
    python scripts/gen_man.py --check   # exit 1 listing stale, missing or extra pages

Every command and subcommand gets a page built from what `mars CMD --help` shows (the
docstring, each parameter's help, default, range and environment variable), so the pages
cannot drift from the code: tests/test_man.py runs --check. The overview page and the
record contract page (from the field tables in mars_cli/records.py) add hand-written prose
kept below. Output is deterministic (no dates), so a regenerated tree diffs cleanly.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAN_DIR = ROOT / "man"
sys.path.insert(0, str(ROOT))

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Bad input data or a runtime failure; the message on stderr names the program, the file and line where "
          "there is one, and what was wrong. Nothing half-written is left behind."),
    ("2", "Usage error: unknown option, missing or malformed argument."),
    ("130", "Interrupted (Ctrl-C)."),
    ("143", "Terminated (SIGTERM): ended as Ctrl-C ends it, its summary line printed; a second SIGTERM, or 60 s "
            "without ending, ends it at once. A server (mars serve, mars search --serve) stops on SIGTERM "
            "as it is meant to, and exits 0."),
]

SECRET = "A secret, read from the environment only and never written into records, logs or checkpoints."
# Environment variables the code reads directly (not through an option's envvar).
ENV_DOCS = {
    "MARS_LOG_LEVEL": "Log level on stderr (DEBUG, INFO, WARNING, ERROR); overrides -v.",
    "MARS_PROGRESS": "How long work reports progress on stderr. Unset: a bar on a terminal, otherwise a plain "
                     "line every MARS_PROGRESS_INTERVAL seconds and one summary line at the end (for log files). "
                     "bar (or 1) forces the bar, log the lines, 0 turns progress off (as -q does).",
    "MARS_PROGRESS_INTERVAL": "Seconds between progress lines when stderr is not a terminal (default 30).",
    "MARS_DEEPSPEED_SHM": "1 builds and uses DeepSpeed's shared-memory all-reduce kernel for CPU training (a ~90 s "
                          "C++ compile on first use, then faster all-reduce between CPU processes). Unset or 0 "
                          "skips it: one process never all-reduces, and several reduce correctly over gloo.",
    "MARS_TORCH_EXTENSIONS": "Where DeepSpeed's JIT-compiled ops are cached (default ~/.cache/mars/torch_extensions).",
    "MARS_ARTIFACTS": "Folder where crops and thumbnails are written under content-hash names "
                      "(default: the current directory).",
    "MARS_MAX_IMAGE_PIXELS": "Images with more pixels are refused as decompression bombs (default 200000000).",
    "MARS_IMAGE_CACHE_PIXELS": "Decoded pixels kept in the in-process image cache (default 150000000, about 450 MB).",
    "MARS_DECODE_PIXELS": "Pixels decoded at once by all of a process's threads; a decode waits while others hold them, and one image alone always runs (default 400000000).",
    "MARS_MAX_IMAGE_BYTES": "Image files larger than this are refused (default 1073741824); only regular files "
                            "are read as images.",
    "MARS_OPENAI_TIMEOUT": "Seconds per request of the openai engine (default 120; --request-timeout overrides).",
    "MARS_OPENAI_RETRIES": "Retries of a failed openai engine request (default 3; --retries overrides).",
    "MARS_OPENAI_BASE_URL": "The OpenAI-compatible API the openai engine asks when --base-url is not given "
                            "(then OPENAI_BASE_URL; unset: api.openai.com). user:password@ in it is sent as "
                            "Basic auth and kept out of records and logs.",
    "MARS_OPENAI_MODEL": "The model name the openai engine asks for when neither --model nor --policy names one.",
    "MARS_CACHE_HOME": "mars's own cache folder (default ~/.cache/mars): the real Qwen tokenizer files "
                       "`mars prompt` and the tiny models are built with, written once and reused.",
    "MARS_PIXEL_CACHE_MB": "Megabytes of processed images (pixel values and grids) that update, sft and the hf "
                           "engine keep between turns and steps, so one image is not resized and patchified again "
                           "(default 512; 0 keeps none).",
    "MARS_PREFETCH": "0 (or false, no) builds each training micro-batch's model input inline; by default the "
                     "next micro-batch's images are prepared on a worker thread while the current one trains.",
    "MARS_JUDGE_API_KEY": "The API key `mars judge` sends to --judge-base-url (then OPENAI_API_KEY). " + SECRET,
    "MARS_LLM_API_KEY": "The API key of the LLM that summarizes search results (then OPENAI_API_KEY). " + SECRET,
    "MARS_OPENAI_API_KEY": "The API key of the openai engine (then OPENAI_API_KEY). " + SECRET,
    "MARS_SERVE_API_KEY": "The key `mars serve` requires of every client (Authorization: Bearer), and that "
                          "rollout --server, ask, and update --push send. " + SECRET,
    "MARS_MAX_LINE_BYTES": "The longest JSONL line any command reads (default 268435456, 256 MiB); a longer line "
                           "is an error naming its file and line (or skipped with --skip-bad), never held whole "
                           "in memory.",
}

OVERVIEW = """\
mars trains and runs vision-language agents that reason over several turns and call three
tools (text search, image search and image crop) on high-resolution images. It follows the
SenseNova-MARS recipe: cold-start SFT, then reinforcement learning with BN-GSPO.

Each command is a small filter: it reads JSONL records (from the files named, or stdin),
adds its own fields, passes every other field through unchanged, and writes records to
stdout, one JSON object per line, flushed per record so pipelines stream. Progress and logs
go to stderr. Piping rollout, judge and advantage and then running update is one RL step;
a shell loop is the trainer. The record fields are described in mars-records(5).

Options take their value from the command line, then from a MARS_* environment variable
where one is listed, then from the file given with --config (YAML, or TOML by its suffix:
the long option names without the dashes as top-level keys, e.g. `lr: 1e-6`), then from
the default. update and sft write the settings they ran with into their checkpoint as
mars_settings.json. Secrets (API keys) are read from the environment only and are never
written into records, logs or checkpoints.

A policy may be named as on the Hugging Face Hub (`--policy Qwen/Qwen2.5-VL-7B-Instruct`):
an existing local path wins; otherwise the name is looked up in the local Hugging Face
cache (HF_HUB_CACHE, else HF_HOME/hub), and never downloaded on the way."""

sys.path.insert(0, str(Path(__file__).resolve().parent))
from man_examples import EXAMPLES  # noqa: E402
from man_sections import completion_section, flags_section, renamed_section  # noqa: E402


# -- troff helpers -----------------------------------------------------------------------------


def esc(text: str) -> str:
    """Text safe for troff: backslashes, hyphens (copy-pastable minus), leading dots, non-ASCII."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # groff reads Latin-1 unless told otherwise; named Unicode escapes work everywhere.
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


def inline(text: str) -> str:
    """Escaped text with `code` shown in bold."""
    parts = re.split(r"`([^`]+)`", text)
    return "".join(esc(p) if i % 2 == 0 else f"\\fB{esc(p)}\\fR" for i, p in enumerate(parts))


def prose(text: str, *, clean: bool = True) -> list[str]:
    """A docstring or help text as troff paragraphs, literal blocks and bullet lists.

    `clean=False` for text already dedented (cleaning again would flatten a literal block
    that follows an unindented first line).
    """
    out: list[str] = []
    text = inspect.cleandoc(text or "") if clean else (text or "")
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        lines = para.split("\n")
        if not para.strip():
            continue
        if para.startswith("\b") or all(ln.startswith((" ", "\t")) for ln in lines):
            body = textwrap.dedent("\n".join(ln.lstrip("\b") for ln in lines)).strip("\n")
            out += [".PP", ".RS 4", ".nf", esc(body), ".fi", ".RE"]
        elif lines[0].lstrip().startswith("- "):
            items: list[str] = []
            for ln in lines:
                if ln.lstrip().startswith("- "):
                    items.append(ln.lstrip()[2:].strip())
                else:
                    items[-1] += " " + ln.strip()
            for item in items:
                out += [".IP \\(bu 2", inline(item)]
        else:
            out += [".PP", inline(" ".join(ln.strip() for ln in lines))]
    return out


def header(name: str, section: int, short: str, title: str) -> list[str]:
    from mars_cli import __version__

    return [
        ".\\\" Generated by scripts/gen_man.py; do not edit: run python scripts/gen_man.py",
        f'.TH "{esc(title.upper())}" "{section}" "" "mars {__version__}" "mars manual"',
        ".SH NAME",
        f"{esc(name)} \\- {inline(short)}",
    ]


def exit_status() -> list[str]:
    out = [".SH EXIT STATUS"]
    for code, what in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", esc(what)]
    return out


def examples(key: str) -> list[str]:
    if key not in EXAMPLES:
        return []
    out = [".SH EXAMPLES"]
    for what, cmd, _ in EXAMPLES[key]:
        out += [".PP", inline(what), ".RS 4", ".nf", esc(cmd), ".fi", ".RE"]
    return out


# -- the command tree ----------------------------------------------------------------------------


def root_command():
    import typer

    from mars_cli.main import app

    return typer.main.get_command(app)


def make_ctx(cmd, name: str, parent=None):
    return cmd.context_class(cmd, info_name=name, parent=parent)


def help_record(param, ctx) -> tuple[str, str] | None:
    if getattr(param, "hidden", False):
        return None
    try:
        rec = param.get_help_record(ctx)
    except (AttributeError, TypeError):
        rec = None
    if rec is None and getattr(param, "param_type_name", "") == "argument":
        rec = (param.name.upper(), getattr(param, "help", None) or "")
    return rec


def short_help(cmd) -> str:
    text = cmd.short_help or (inspect.cleandoc(cmd.help or "").split("\n\n")[0].replace("\n", " "))
    return text.strip() or "(no description)"


def params_section(title: str, records: list[tuple[str, str]]) -> list[str]:
    if not records:
        return []
    out = [f".SH {title}"]
    for term, text in records:
        term = re.sub(r"(-{1,2}[\w-]+)", lambda m: f"\\fB{esc(m.group(1))}\\fR", term.replace("\\", "\\e"))
        term = re.sub(r"^([A-Z][A-Z0-9_.]*)", lambda m: f"\\fI{esc(m.group(1))}\\fR", term)
        term = re.sub(r"<([^>]+)>", lambda m: f"\\fI{m.group(1)}\\fR", term)
        out += [".TP", term, inline(text)]
    return out


def command_page(cmd, path: list[str], ctx) -> list[str]:
    full = " ".join(["mars", *path])
    dashed = "-".join(["mars", *path])
    lines = header(dashed, 1, short_help(cmd), dashed)
    pieces = cmd.collect_usage_pieces(ctx)
    usage = " ".join(re.sub(r"\{([^}]+)\}|(?<=\[)([a-z][a-z0-9_]*)(?=\])", lambda m: (m.group(1) or m.group(2)).upper(), p)
                     for p in pieces)
    # NAME carries the first paragraph already; DESCRIPTION gives the rest (or repeats a lone one).
    paras = re.split(r"\n\s*\n", inspect.cleandoc(cmd.help or "").strip(), maxsplit=1)
    body = paras[1] if len(paras) > 1 else paras[0] or short_help(cmd)
    lines += [".SH SYNOPSIS", f"\\fB{esc(full)}\\fR {esc(usage)}", ".SH DESCRIPTION", *prose(body, clean=False)]
    args, opts = [], []
    for p in cmd.params:
        rec = help_record(p, ctx)
        if rec and p.param_type_name == "argument":
            typ = rec[0].split(" ", 1)[1] if " " in rec[0] else ""
            args.append((f"{p.name.upper()} {typ}".strip(), rec[1].replace("  [required]", "").strip()))
        elif rec:
            opts.append(rec)
    opts.append(("-h, --help", "Show the help and exit."))
    subs = getattr(cmd, "commands", None)
    if subs:
        lines += [".SH COMMANDS"]
        for name, sub in subs.items():
            if not getattr(sub, "hidden", False):
                lines += [".TP", f"\\fB{esc(name)}\\fR", inline(short_help(sub)) + f" See {esc(dashed)}\\-{esc(name)}(1)."]
    lines += params_section("ARGUMENTS", args) + params_section("OPTIONS", opts)
    lines += examples(" ".join(path)) + exit_status()
    see = ["mars(1)", "mars\\-records(5)"] + ([f"{esc(dashed)}\\-{esc(n)}(1)" for n in subs] if subs else [])
    return lines + [".SH SEE ALSO", ", ".join(see)]


def walk(cmd, path: list[str], ctx):
    """Yield (path, command, context) for every command below `cmd`, depth first."""
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        if getattr(sub, "hidden", False):
            continue
        sub_ctx = make_ctx(sub, name, ctx)
        yield [*path, name], sub, sub_ctx
        yield from walk(sub, [*path, name], sub_ctx)


def environment(root, ctx) -> dict[str, str]:
    """MARS_* variables: from option envvars and from the sources, with the docs above."""
    docs: dict[str, str] = dict(ENV_DOCS)
    uses: dict[str, list[str]] = {}
    for path, cmd, _ in walk(root, [], ctx):
        for p in cmd.params:
            names = p.envvar if isinstance(p.envvar, (list, tuple)) else [p.envvar] if p.envvar else []
            for name in names:
                flag = max(getattr(p, "opts", []) or [p.name], key=len)
                docs.setdefault(name, (p.help or "").strip().rstrip(".") + ".")
                uses.setdefault(name, []).append(f"`mars {' '.join(path)} {flag}`")
    readers: dict[str, list[str]] = {}
    for src in sorted((ROOT / "mars_cli").rglob("*.py")):
        for name in sorted(set(re.findall(r"[\"'](MARS_[A-Z0-9_]+)[\"']", src.read_text(encoding="utf-8")))):
            readers.setdefault(name, []).append(src.relative_to(ROOT).as_posix())
    env = {}
    for name in sorted(set(uses) | set(readers) | (set(ENV_DOCS) & set(readers))):
        if name in docs:
            text = docs[name]
        elif name.endswith(("_API_KEY", "_KEY", "_TOKEN")):
            text = SECRET
        else:
            text = ""
        if name in uses:
            text += " Default for " + ", ".join(uses[name]) + "."
        elif not text:  # tests/test_man.py refuses this on the real page: describe it in ENV_DOCS
            text = "Read by " + ", ".join(readers[name]) + "."
        env[name] = text.strip()
    return env


def overview_page(root, ctx) -> list[str]:
    lines = header("mars", 1, "train and run multimodal search agents as small Unix commands", "mars")
    lines += [".SH SYNOPSIS", "\\fBmars\\fR [\\fB\\-\\-version\\fR] [\\fB\\-v\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
              ".SH DESCRIPTION", *prose(OVERVIEW), ".SH COMMANDS"]
    for name, cmd in root.commands.items():
        if not getattr(cmd, "hidden", False):
            lines += [".TP", f"\\fBmars {esc(name)}\\fR", inline(short_help(cmd)) + f" See mars\\-{esc(name)}(1)."]
    opts = [r for r in (help_record(p, ctx) for p in root.params) if r] + [("-h, --help", "Show the help and exit.")]
    lines += params_section("OPTIONS", opts) + flags_section(esc, inline) + renamed_section(root, walk, make_ctx, esc)
    lines += exit_status() + [".SH ENVIRONMENT"]
    for name, doc in environment(root, ctx).items():
        lines += [".TP", f"\\fB{esc(name)}\\fR", inline(doc)]
    lines += completion_section(esc) + examples("")
    see = ", ".join(["mars\\-records(5)"] + [f"mars\\-{esc(p)}(1)" for p in ("-".join(x) for x, _, _ in walk(root, [], ctx))])
    return lines + [".SH SEE ALSO", see]


RECORDS_PROSE = """\
Every mars command reads and writes JSON Lines: one JSON object per line, UTF-8, each line
ending in a newline and flushed as it is written so that pipes stream. No file (or -) means
stdin. A byte-order mark at the start of a file is dropped and blank lines are skipped. A
line that is not a JSON object is an error naming the file and line (with --skip-bad it is
skipped with a warning, and the count is printed at the end). A last line without its
newline that does not parse is reported as truncated. NaN and infinite numbers are refused
on writing rather than turned into null. Output files (-o) are written under a temporary
name and renamed into place only when complete.

Every record carries schema_version. A stage adds its own fields and passes every other
field through unchanged, fields it does not know included, so a record accumulates the
history of the pipeline: a task, then a trajectory (mars rollout), a judged trajectory
(mars judge) and a scored one (mars advantage). A record from a newer mars (a larger
schema_version) is refused.

Images are referenced by path. Crops and thumbnails are files named by the hash of their
content in an artifacts folder (MARS_ARTIFACTS), so records stay small and a trajectory can
be re-tokenized exactly."""

STRUCTURES = """\
messages is the chat in order. A system message has text content; the user message holds
the task's images and question as a list of parts, {"type": "image", "image": PATH} and
{"type": "text", "text": TEXT}; an assistant message is the raw model text (thinking, one
<tool_call> or <answer>); a tool message has the tool's "name" and content parts (text and
images by path).

Each tool_calls entry is {"turn", "name", "arguments", "ok", "error", "latency"}: the turn
it was made in, the tool and its arguments (null when the call could not be parsed), whether
it succeeded, the error text the model was shown, and the seconds it took.

tokens holds what the policy actually saw and produced: "ids" (token ids, with one image
placeholder per image), "mask" (1 for tokens the policy generated, 0 for prompt, tool
results and template), "logprobs" (the sampling log-probabilities, 0.0 where the mask is 0)
and "images" (the image paths in placeholder order). It is null when the engine cannot
return tokens (an OpenAI-compatible API); such trajectories can be judged and evaluated
but not trained on."""


def records_page() -> list[str]:
    from mars_cli import records

    lines = header("mars-records", 5, "the JSONL record contract of the mars commands", "mars-records")
    lines += [".SH DESCRIPTION", *prose(RECORDS_PROSE),
              *prose(f"The current schema_version is {records.SCHEMA_VERSION}.")]
    tables = [
        ("TASK FIELDS", "A task: what `mars data` writes and `mars rollout` reads.", records.TASK_FIELDS),
        ("TRAJECTORY FIELDS", "Added by `mars rollout`, one record per sampled episode.", records.TRAJECTORY_FIELDS),
        ("JUDGED FIELDS", "Added by `mars judge`. Rewards are numbers, or null when a reward could not be judged.",
         records.JUDGED_FIELDS),
        ("SCORED FIELDS", "Added by `mars advantage`, read by `mars update`.", records.SCORED_FIELDS),
    ]
    for title, intro, table in tables:
        lines += [f".SH {title}", *prose(intro)]
        for name, (_, desc, required) in table.items():
            lines += [".TP", f"\\fB{esc(name)}\\fR ({'required' if required else 'optional'})", f"Must be {inline(desc)}."]
    lines += [".SH STRUCTURES", *prose(STRUCTURES), ".SH EXAMPLE", *prose("A task record:")]
    task = records.make_task("street-001", "What is written on the red sign?", images=["images/street.jpg"],
                             answers=["OPEN"], benchmark="custom", scorer="em")
    lines += [".RS 4", ".nf", esc(json.dumps(task, ensure_ascii=False)), ".fi", ".RE"]
    return lines + [".SH SEE ALSO", "mars(1)"]


def pages(root=None) -> dict[str, str]:
    """Every page's file name and troff text (for the mars app, or another click command tree)."""
    root = root if root is not None else root_command()
    ctx = make_ctx(root, "mars")
    out = {"mars.1": ["'\\\" t", *overview_page(root, ctx)], "mars-records.5": records_page()}  # t: the FLAGS table needs tbl
    for path, cmd, cctx in walk(root, [], ctx):
        out[f"mars-{'-'.join(path)}.1"] = command_page(cmd, path, cctx)
    return {name: "\n".join(lines) + "\n" for name, lines in out.items()}


def check(generated: dict[str, str], man_dir: Path) -> list[str]:
    """Problems with the pages on disk: stale, missing or left over from a removed command."""
    problems = []
    for name, text in generated.items():
        path = man_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: stale")
    if man_dir.is_dir():
        for path in sorted(man_dir.glob("mars*.[15]")):
            if path.name not in generated:
                problems.append(f"{path.name}: no such command any more")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate (or --check) the mars man pages.")
    ap.add_argument("--check", action="store_true", help="exit 1 if any page is stale, missing or extra")
    ap.add_argument("--dir", type=Path, default=MAN_DIR, help="man page directory (default: man/)")
    args = ap.parse_args(argv)
    generated = pages()
    if args.check:
        problems = check(generated, args.dir)
        for p in problems:
            print(f"gen_man: {args.dir / p}", file=sys.stderr)
        if problems:
            print("gen_man: regenerate with: python scripts/gen_man.py", file=sys.stderr)
        return 1 if problems else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for stale in check(generated, args.dir):
        if stale.endswith("no such command any more"):
            (args.dir / stale.split(":")[0]).unlink()
    for name, text in generated.items():
        path = args.dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    print(f"gen_man: {len(generated)} pages in {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
