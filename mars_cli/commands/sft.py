"""`mars sft`: cold-start supervised fine-tuning on trajectory records."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.commands import _training as T


def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Trajectory JSONL (teacher or reference) [default: stdin]."),
    policy: Path = typer.Option(..., "--policy", envvar="MARS_POLICY", help="The checkpoint directory to start from."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the fine-tuned checkpoint (atomically)."),
    state: Optional[Path] = typer.Option(None, "--state", envvar="MARS_STATE", help="Optimizer state dir: resumed if present, then saved."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Passes over the data."),
    lr: float = typer.Option(1e-5, "--lr", envvar="MARS_SFT_LR", help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm to this."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Trajectories per optimizer step."),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", min=1, envvar="MARS_MICRO_BATCH_TOKENS", help="Padded tokens per forward/backward [default: 4096 on a GPU, 1024 on a CPU]."),
    warmup: float = typer.Option(0.05, "--warmup", help="Linear warmup, as a fraction of the steps; then cosine decay."),
    min_lr_ratio: float = typer.Option(0.0, "--min-lr-ratio", help="Final learning rate as a fraction of --lr."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    min_reward: Optional[float] = typer.Option(None, "--min-reward", help="Train only on records whose reward is at least this."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", min=1, help="Skip (with a warning naming the line) a trajectory longer than this many tokens, images expanded [default: the model's context length]."),
    zero: int = T.ZERO,
    deepspeed: Optional[Path] = T.DEEPSPEED,
    train_vision: bool = T.TRAIN_VISION,
    gradient_checkpointing: bool = T.GRADIENT_CHECKPOINTING,
    bf16: Optional[bool] = T.BF16,
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and torch."),
    eval: bool = typer.Option(True, "--eval/--no-eval", help="Measure the data's NLL before and after each epoch."),
    min_pixels: Optional[int] = T.MIN_PIXELS,
    max_pixels: Optional[int] = T.MAX_PIXELS,
    attn_implementation: Optional[str] = T.ATTN_IMPLEMENTATION,
    nproc: int = T.NPROC,
    nnodes: int = T.NNODES,
    node_rank: int = T.NODE_RANK,
    master_addr: Optional[str] = T.MASTER_ADDR,
    master_port: int = T.MASTER_PORT,
    report_to: str = T.REPORT_TO,
    logging_dir: Optional[Path] = T.LOGGING_DIR,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
    local_rank: Optional[int] = T.LOCAL_RANK,
) -> None:
    """Fine-tune on trajectories (NLL on assistant tokens).

    Records with token ids train on those ids; records without (teacher trajectories from the openai engine) are tokenized from their messages by the agent protocol. Prompt, tool-result and template tokens are masked; only the assistant's own tokens count. Prints one metrics record per epoch (nll_before, nll_after, train_nll, grad_norm, lr, tokens); the last one also names the checkpoint written to --out.
    """
    import os

    from mars_cli.jsonl import RecordWriter
    from mars_cli.models.load import resolve_policy
    from mars_cli.rl.engine import launch_ranks
    from mars_cli.rl.sft import SFTConfig, run_sft
    from mars_cli.settings import write_settings
    from mars_cli.tracking import check_report_to, open_tracker, run_settings

    check_report_to(report_to)  # before the work: a typo must not cost a training run
    policy = resolve_policy(policy)  # a Hub name → its cached snapshot
    cfg = SFTConfig(policy=str(policy), out=str(out), state=str(state) if state else None, epochs=epochs, lr=lr,
                    weight_decay=weight_decay, grad_clip=grad_clip, batch_size=batch_size,
                    micro_batch_tokens=micro_batch_tokens, warmup=warmup, min_lr_ratio=min_lr_ratio,
                    max_steps=max_steps, min_reward=min_reward, max_seq_len=max_seq_len, zero=zero, deepspeed=str(deepspeed) if deepspeed else None,
                    train_vision=train_vision, gradient_checkpointing=gradient_checkpointing, bf16=bf16, seed=seed, eval=eval,
                    attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
    paths = [str(f) for f in files or []]
    code = launch_ranks("sft", paths, cfg, nproc=nproc, local_rank=local_rank, skip_bad=skip_bad, what="data",
                        nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)
    if code is not None:
        raise typer.Exit(code)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with RecordWriter() as w, open_tracker(report_to if rank0 else "none", logging_dir=logging_dir, command="sft",
                                           config=run_settings()) as t:
        def on_epoch(rec):  # live: an SFT epoch can take hours
            t.log(rec, step=rec.get("steps"), prefix="train/")
            w.write(rec)

        run_sft(paths, cfg, skip_bad=skip_bad, on_epoch=on_epoch if rank0 else None)
    if rank0:
        write_settings(out)
