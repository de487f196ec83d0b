"""`mars prompt`: print the exact first-turn text a model sees for each task.

    mars prompt tasks.jsonl | jq -r .prompt
    mars prompt --policy ckpt/ --protocol mars < tasks.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Task JSONL files [default: stdin]."),
    policy: Optional[str] = typer.Option(None, "--policy", envvar="MARS_POLICY", help="Checkpoint whose tokenizer renders the prompt [default: the Qwen vocabulary]."),
    protocol_name: str = typer.Option("sensenova", "--protocol", envvar="MARS_PROTOCOL", help="Protocol profile: sensenova (the training loop), sensenova-eval (the official eval.py) or mars."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Replace the system prompt text (sensenova: the part before the tools block)."),
    arch: str = typer.Option("qwen3-vl", "--arch", help="Without --policy: qwen3-vl or qwen2.5-vl special tokens."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", min=1, help="With --policy: the image processor's min pixels [default: the checkpoint's min_pixels]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="With --policy: the image processor's max pixels [default: the checkpoint's max_pixels]."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write records here (atomically) instead of stdout."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
) -> None:
    """Render each task's first prompt: one JSON record per task.

    The `prompt` field holds the text the policy receives at the first turn: the chat
    template with the system message, the images as <|vision_start|><|image_pad|><|vision_end|>
    and the question, ending with the assistant header. With --protocol sensenova (the
    default) the system message is the task's dataset system prompt (meta.system_prompt,
    kept by `mars data convert`; the official one when the task has none), a blank line
    and the official tools block, byte for byte as the released code builds it. Records
    also give the token count and the image paths; with --policy, the model input's length
    once each image is expanded to its patches at the pixel limits used (input_tokens, pixels)
    and, when the checkpoint has a chat template, whether it renders the same text
    (chat_template_equal).
    """
    from mars_cli.agent.prompt import PromptRenderer, prompt_records
    from mars_cli.errors import UsageError
    from mars_cli.jsonl import RecordWriter, SkipCounter, read_located
    from mars_cli.models.qwen_vocab import specials_for

    try:
        specials_for(arch)
    except Exception:
        raise UsageError(f"--arch must be qwen3-vl or qwen2.5-vl, got {arch!r}") from None
    renderer = PromptRenderer(policy, profile=protocol_name, system_prompt=system_prompt, arch=arch,
                              min_pixels=min_pixels, max_pixels=max_pixels)
    skipped = SkipCounter()
    located = read_located([str(f) for f in files or []], skip_bad=skip_bad, skipped=skipped)
    with RecordWriter(out) as w:
        for rec in prompt_records(located, renderer):
            w.write(rec)
    skipped.report()
