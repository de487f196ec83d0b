"""`mars env`: versions and settings to paste into a bug report."""

from __future__ import annotations

import typer


def main(
    as_json: bool = typer.Option(False, "--json", help="One JSON record instead of text."),
) -> None:
    """Print versions and settings for a bug report.

    Python, mars, torch, transformers, DeepSpeed, vLLM and the other libraries mars drives (from package metadata, so a broken install is reported, not fatal); the platform; CUDA as torch sees it (GPUs, memory, compute capability); and every MARS_* variable plus the few others mars reads (OPENAI_API_KEY, SERPER_API_KEY, CUDA_VISIBLE_DEVICES, DS_ACCELERATOR, …). Secrets are never printed: a variable named like a key or token shows only its length, a password in a URL becomes ***.
    """
    from mars_cli.envinfo import format_report, report
    from mars_cli.jsonl import RecordWriter
    from mars_cli.streams import records_out

    rep = report()
    if as_json:
        with RecordWriter() as w:
            w.write(rep)
        return
    out = records_out()
    out.write((format_report(rep) + "\n").encode())
    out.flush()
