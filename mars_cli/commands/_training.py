"""Options `mars update` and `mars sft` share: DeepSpeed, precision, image limits, attention, ranks and nodes, tracking.

One declaration each, so the two training commands cannot drift apart (their help,
defaults and ranges are the same object). Light to import: typer only.
"""

from __future__ import annotations

import typer

ZERO = typer.Option(0, "--zero", envvar="MARS_ZERO", help="DeepSpeed ZeRO stage: 0, 2 or 3 (packaged configs).")
DEEPSPEED = typer.Option(None, "--deepspeed", envvar="MARS_DEEPSPEED", help="Your own DeepSpeed JSON config (overrides --zero).")
TRAIN_VISION = typer.Option(False, "--train-vision/--no-train-vision", help="Also train the vision encoder and merger.")
GRADIENT_CHECKPOINTING = typer.Option(False, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward.")
BF16 = typer.Option(None, "--bf16/--no-bf16", help="bf16 weights and DeepSpeed bf16 [default: on a GPU].")
MIN_PIXELS = typer.Option(None, "--min-pixels", min=1, help="Image pixel floor for records without policy.pixels (which keep the limits their rollout used) [default: the checkpoint's min_pixels].")
MAX_PIXELS = typer.Option(None, "--max-pixels", min=1, help="Image pixel cap for records without policy.pixels [default: the checkpoint's max_pixels].")
ATTN_IMPLEMENTATION = typer.Option(None, "--attn-implementation", envvar="MARS_ATTN_IMPLEMENTATION", help="sdpa | flash_attention_2 (flash-attn package, CUDA) | eager [default: sdpa].")
NPROC = typer.Option(1, "--nproc", min=1, help="Run N processes (torch.distributed.run); records sharded by rank.")
NNODES = typer.Option(1, "--nnodes", min=1, help="Nodes in the job: start this same command on each, with its --node-rank.")
NODE_RANK = typer.Option(0, "--node-rank", min=0, help="This node's index; node 0 is at --master-addr and writes the outputs.")
MASTER_ADDR = typer.Option(None, "--master-addr", help="Node 0's address, reachable from every node (with --nnodes).")
MASTER_PORT = typer.Option(29500, "--master-port", min=1, max=65535, help="Node 0's rendezvous port (with --nnodes).")
REPORT_TO = typer.Option("none", "--report-to", envvar="MARS_REPORT_TO", help="Also log metrics to tensorboard or wandb (none: only the records).")
LOGGING_DIR = typer.Option(None, "--logging-dir", envvar="MARS_LOGGING_DIR", help="Where --report-to writes [default: under ./runs/, named by the command and the time].")
LOCAL_RANK = typer.Option(None, "--local_rank", "--local-rank", hidden=True, help="Set by the deepspeed launcher (LOCAL_RANK is read).")
