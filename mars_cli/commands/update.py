"""`mars update`: a policy step per scored batch (GSPO + KL, DeepSpeed); --follow stays resident."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.commands import _training as T

from mars_cli.flags import renamed


@renamed({"--mini-batch": "--batch-size"})
def main(
    ctx: typer.Context,
    files: Optional[List[Path]] = typer.Argument(None, help="Scored trajectory JSONL (with advantages) [default: stdin]."),
    policy: Path = typer.Option(..., "--policy", envvar="MARS_POLICY", help="The policy checkpoint directory to start from."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the new checkpoint (atomically); with --follow the folder of step-N/ checkpoints."),
    ref: Optional[Path] = typer.Option(None, "--ref", envvar="MARS_REF", help="Reference model for the KL term (none: no KL)."),
    state: Optional[Path] = typer.Option(None, "--state", envvar="MARS_STATE", help="Optimizer state dir: resumed if present, then saved."),
    loss: str = typer.Option("gspo", "--loss", help="gspo (sequence level), grpo (token-level PPO clip) or grpo-verl (grpo with verl's dual clip c=3 and token-mean per micro-batch)."),
    eps_low: Optional[float] = typer.Option(None, "--eps-low", help="Lower clip range [default: 3e-4 gspo, 0.2 grpo]."),
    eps_high: Optional[float] = typer.Option(None, "--eps-high", help="Upper clip range [default: 4e-4 gspo, 0.28 grpo]."),
    beta: float = typer.Option(1e-4, "--beta", help="KL coefficient (k3 estimator); 0 loads no reference."),
    lr: float = typer.Option(1e-6, "--lr", envvar="MARS_LR", help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm to this."),
    mini_batch: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Trajectories per optimizer step (as sft's --batch-size) [default: all, one step]."),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", min=1, envvar="MARS_MICRO_BATCH_TOKENS", help="Padded tokens per forward/backward [default: 4096 on a GPU, 1024 on a CPU]."),
    old_logprobs: str = typer.Option("recompute", "--old-logprobs", help="recompute (with the policy before the step) or rollout."),
    zero: int = T.ZERO,
    deepspeed: Optional[Path] = T.DEEPSPEED,
    train_vision: bool = T.TRAIN_VISION,
    gradient_checkpointing: bool = T.GRADIENT_CHECKPOINTING,
    bf16: Optional[bool] = T.BF16,
    seed: int = typer.Option(0, "--seed", help="Torch seed."),
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
    follow: bool = typer.Option(False, "--follow", help="Stay resident: read a stream of batches, one optimizer step as each completes."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="With --follow: exit after N steps [default: at the end of input]."),
    save_every: int = typer.Option(1, "--save-every", min=1, help="With --follow: write OUT/step-N every K steps (the last step always)."),
    keep_last: int = typer.Option(3, "--keep-last", min=0, help="With --follow: keep the newest N step folders (0: all)."),
    push: Optional[str] = typer.Option(None, "--push", envvar="MARS_PUSH", help="Policy servers (URL[,URL…]) that load each new checkpoint."),
    push_max_gap: Optional[float] = typer.Option(None, "--push-max-gap", envvar="MARS_PUSH_MAX_GAP", help="With --push: the largest log-prob gap allowed between a server's answer to the push probe and the trainer's forward pass on the same tokens; over it the push fails (the server reports the checkpoint but serves other weights) [default: 0.02, measured on fp32]."),
    push_dir: Optional[Path] = typer.Option(None, "--push-dir", help="With --follow --push: where weights of unsaved steps go [default: OUT/.push; /dev/shm/… avoids the disk]."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
    local_rank: Optional[int] = T.LOCAL_RANK,
    preset: Optional[str] = typer.Option(None, "--preset", help="official-script: the released training script's loss (grpo-verl: clip 0.2/0.28, dual clip 3, token-mean per micro-batch), lr 1e-5, no KL, rollout log-probs; explicit flags win."),
) -> None:
    """Train the policy one step on a scored batch; write a checkpoint.

    Rebuilds each trajectory's model input from its stored token ids and images and trains only on the policy's own tokens (mask 1). GSPO: s = exp(mean over policy tokens of log π_θ − log π_old), loss = −mean over trajectories of min(s·A, clip(s, 1−ε_low, 1+ε_high)·A) + β·KL(π_θ‖π_ref). Records without token ids (openai engine) are refused. A batch whose advantages are all 0 (every group's rewards equal) is trained and written anyway, with a warning: only the KL term and weight decay move the weights.

    Writes --out (an HF safetensors checkpoint with mars_meta.json) atomically and prints one metrics record: loss, clip_fraction, kl, ratio_mean/min/max, grad_norm, tokens, trajectories, seconds, logprob_gap, rewards (the batch's mean of each judged reward: reward, accuracy, format…), sampled_by (the fingerprints and server weight versions that sampled the batch: reported, never refused). With --push, every server then loads --out; the command returns once each one's /health shows its fingerprint at the next weight version and the load is proven: the server's log-probs on a fixed probe (its /load answer) match the trainer's forward pass on the same tokens within --push-max-gap (each server's gap is in the record's push entries). It exits 1 naming any server that failed, and the gap against the bound where the server serves other weights than it reports (the checkpoint stays written). A sleeping server (POST /sleep, to lend its GPUs to this trainer) wakes to load; with --nproc the push waits until every rank has exited and is reported on stderr. Under a launcher (deepspeed, accelerate, torchrun) every rank runs this command; --nproc N does that for you on one machine.

    --follow keeps the policy, the reference model and the optimizer in memory and reads a stream of batches written by `mars advantage` (each record's `batch` {id, size}), taking one optimizer step as soon as a batch's last record arrives and printing exactly one metrics record per step (with the batch, `staleness` of its records in steps, push result, timings and bytes written). --out then holds OUT/step-N/ checkpoints, every --save-every steps and after the last one; the newest also holds the optimizer state (OUT/step-N/optimizer/), so the same command restarted resumes from it with the same step numbering, skipping batches it already trained. --keep-last bounds the disk. With --push each step's weights go to the servers; a refused push is a warning and the next step's push retries (meanwhile the servers report the trainer "stalled", and a rollout held back by --max-staleness goes ahead, so that a next step comes), 3 refused in a row stop the trainer with exit 1, and a server whose probe gap exceeds --push-max-gap (it serves other weights than it reports) stops the trainer with exit 1, after that step's record and with the step saved. A trajectory without policy tokens is skipped with a warning; a token id beyond the vocabulary stops the trainer before that step.
    """
    import os

    from mars_cli.errors import UsageError
    from mars_cli.jsonl import RecordWriter
    from mars_cli.rl.engine import launch_ranks
    from mars_cli.models.load import resolve_policy
    from mars_cli.rl.update import UpdateConfig, run_update, update_once
    from mars_cli.settings import write_settings
    from mars_cli.tracking import check_report_to, report

    check_report_to(report_to)  # before the work: a typo must not cost a training run
    policy, ref = resolve_policy(policy), resolve_policy(ref) if ref else None  # Hub names → cached snapshots

    from mars_cli import presets

    v = presets.apply(ctx, dict(loss=loss, eps_low=eps_low, eps_high=eps_high, lr=lr, beta=beta, old_logprobs=old_logprobs,
                                mini_batch=mini_batch), presets.training(preset, "update"))
    loss, eps_low, eps_high, lr, beta, old_logprobs, mini_batch = (
        v[k] for k in ("loss", "eps_low", "eps_high", "lr", "beta", "old_logprobs", "mini_batch"))
    cfg = UpdateConfig(policy=str(policy), out=str(out), ref=str(ref) if ref else None, state=str(state) if state else None,
                       loss=loss, eps_low=eps_low, eps_high=eps_high, beta=beta, lr=lr, weight_decay=weight_decay,
                       grad_clip=grad_clip, mini_batch=mini_batch, micro_batch_tokens=micro_batch_tokens,
                       old_logprobs=old_logprobs, zero=zero, deepspeed=str(deepspeed) if deepspeed else None,
                       train_vision=train_vision, gradient_checkpointing=gradient_checkpointing, bf16=bf16, seed=seed,
                       attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
    paths = [str(f) for f in files or []]
    urls = [u.strip() for u in push.split(",") if u.strip()] if push else []
    if push is not None and not urls:
        raise UsageError("--push needs URL[,URL…]")
    if follow:
        from mars_cli.rl.follow import FollowConfig, run_command

        fcfg = FollowConfig(max_steps=max_steps, save_every=save_every, keep_last=keep_last, push=urls,
                            push_dir=str(push_dir) if push_dir else None, push_max_gap=push_max_gap, report_to=report_to,
                            logging_dir=str(logging_dir) if logging_dir else None)
        raise typer.Exit(run_command(paths, cfg, fcfg, nproc=nproc, local_rank=local_rank, skip_bad=skip_bad))
    if max_steps is not None or push_dir is not None:
        raise UsageError("--max-steps and --push-dir go with --follow")
    code = launch_ranks("update", paths, cfg, nproc=nproc, local_rank=local_rank, skip_bad=skip_bad, what="batch",
                        nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)
    if code is not None:
        if code == 0 and urls:  # every rank has exited: the GPUs are free for the servers
            from mars_cli import streams
            from mars_cli.serve.push import push_checkpoint

            for res in push_checkpoint(urls, str(out), max_gap=push_max_gap):  # reference: OUT loaded on the CPU
                streams.warn(f"{res['url']} serves {out} ({res['fingerprint']}), weight version {res['weight_version']}, "
                             f"probe gap {res['probe']['gap']:.3g}")
        raise typer.Exit(code)
    metrics, session = update_once(paths, cfg, skip_bad=skip_bad) if urls else (run_update(paths, cfg, skip_bad=skip_bad), None)
    if int(os.environ.get("RANK", "0")) == 0:
        write_settings(out)
        report([metrics], report_to=report_to, logging_dir=logging_dir, command="update")
        failure = None
        if urls:
            from mars_cli.serve.probe import model_reference
            from mars_cli.serve.push import PushError, push_checkpoint

            # The probe's reference: the trainer's model as the step left it. On a GPU, or
            # across ranks, the memory goes to the servers (a sleeping one wakes to load)
            # and the reference is OUT as written, loaded on the CPU.
            reference = None
            if session.trainer.world == 1 and session.policy.device.type == "cpu":
                reference = model_reference(session.policy, session.trainer.model)
            else:
                session = None
                _free_gpu_memory()
            try:
                metrics["push"] = push_checkpoint(urls, str(out), fingerprint=metrics.get("fingerprint"),
                                                  reference=reference, max_gap=push_max_gap)
            except PushError as e:
                failure, metrics["push"] = e, {"error": str(e), "servers": e.results}
        with RecordWriter() as w:
            w.write(metrics)
        if failure is not None:
            raise failure


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
