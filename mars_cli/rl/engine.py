"""The DeepSpeed machinery `update` and `sft` share: process group, ZeRO config, optimizer,
gradient accumulation, clipping, optimizer state that persists between invocations.

One process on a CPU runs the same code as many GPUs: DeepSpeed initialises gloo when
there is no CUDA (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE get single-process
defaults here) and nccl under a launcher on GPUs. The optimizer is torch's AdamW handed
to DeepSpeed as a client optimizer: on a CPU this avoids compiling DeepSpeed's CPU Adam,
and with ZeRO it is partitioned like any other.

Micro-batches are packed by token budget, so their number varies per mini-batch: the
accumulation boundary is set by hand and every loss arrives already normalised by the
mini-batch size (see rl.loss), so DeepSpeed must not rescale it (`scale_wrt_gas=False`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import weakref
from pathlib import Path

from mars_cli.errors import MarsError, UsageError
from mars_cli.fsutil import read_json

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # package data
STATE_TAG = "state"
STATE_META = "mars_state.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEFAULTED: set[str] = set()  # launcher variables this process filled in itself


def under_launcher() -> bool:
    """Whether a launcher (torchrun, deepspeed, accelerate) started this process as one rank."""
    return "LOCAL_RANK" in os.environ and "LOCAL_RANK" not in _DEFAULTED


def _teardown() -> None:
    """At exit: stop the input prefetcher and destroy the process group, in that order.

    Left to interpreter shutdown, a live gloo/NCCL process group is destructed while its
    threads still run, and the C++ runtime aborts a rank that had finished its work
    ("terminate called without an active exception", exit -6).
    """
    from mars_cli.rl.prefetch import PREFETCHER

    PREFETCHER.close()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; a failed teardown must not mask the exit status
        pass


def exit_rank(code: int) -> None:
    """End a rank of a multi-process job now: teardown, flush, os._exit(code); a lone process returns.

    Even after the teardown, interpreter shutdown can still destruct a C++ object that owns a
    running thread (DeepSpeed keeps references to its process groups) and abort a rank that
    had finished its work ("terminate called without an active exception", exit -6).
    Everything mars writes is flushed and closed by now, so the rank skips that shutdown.
    """
    try:
        import torch.distributed as dist

        ranked = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except Exception:  # noqa: BLE001 - no usable process group: nothing to leave early
        ranked = False
    if not ranked:
        return
    _teardown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_TEARDOWN_REGISTERED = False


def setup_distributed() -> tuple[int, int]:
    """Fill in single-process defaults for the launcher variables; return (rank, world)."""
    global _TEARDOWN_REGISTERED
    if not _TEARDOWN_REGISTERED:
        import atexit

        atexit.register(_teardown)
        _TEARDOWN_REGISTERED = True
    env = os.environ
    _DEFAULTED.update(k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE") if k not in env)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port())
    env.setdefault("RANK", "0")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    # DeepSpeed JIT-compiles ops on first use; keep them in one cache so that happens once.
    env.setdefault("TORCH_EXTENSIONS_DIR", env.get("MARS_TORCH_EXTENSIONS")
                   or str(Path.home() / ".cache" / "mars" / "torch_extensions"))
    return int(env["RANK"]), int(env["WORLD_SIZE"])


def _skip_shm_op_on_cpu() -> None:
    """Don't compile DeepSpeed's shared-memory all-reduce kernel for CPU runs.

    DeepSpeed builds it (~90 s of C++ on two cores) whenever the CPU accelerator is active.
    One process never all-reduces, and several CPU processes reduce correctly over gloo
    without it; MARS_DEEPSPEED_SHM=1 builds it anyway (faster CPU all-reduce).
    """
    import deepspeed.ops
    import torch

    if torch.cuda.is_available() or os.environ.get("MARS_DEEPSPEED_SHM", "") not in ("", "0"):
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def load_ds_config(zero: int | None, config_file: str | None, *, bf16: bool, grad_clip: float) -> dict:
    """The DeepSpeed config: a user's file, or the packaged ZeRO-2/3 one, or plain stage 0."""
    if config_file:
        try:
            cfg = json.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise UsageError(f"{config_file}: no such DeepSpeed config file") from None
        except json.JSONDecodeError as e:
            raise MarsError(f"{config_file}: invalid JSON: {e}") from None
    elif zero in (2, 3):
        cfg = json.loads((CONFIG_DIR / f"zero{zero}.json").read_text())
    elif zero in (0, None):
        # Under bf16, DeepSpeed accumulates gradients in fp32 only inside a ZeRO optimizer:
        # stage 1 (its bf16 optimizer) keeps fp32 gradients and master weights, and on one
        # rank partitions nothing. Without bf16, plain stage 0.
        cfg = {"zero_optimization": {"stage": 1 if bf16 else 0}}
    else:
        raise UsageError(f"--zero must be 0, 2 or 3, got {zero}")
    if int(cfg.get("zero_optimization", {}).get("stage", 0)) > 0:
        # bf16 micro-batch gradients add up in fp32 (DeepSpeed's default is the model's dtype).
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    # Batch sizes are ours (token-budget micro-batches): DeepSpeed sees one row per step.
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)
    cfg.setdefault("gradient_clipping", grad_clip)
    cfg["zero_allow_untested_optimizer"] = True
    cfg.pop("optimizer", None)  # ours: AdamW with the flags' settings
    cfg.setdefault("bf16", {})["enabled"] = bool(bf16)
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def freeze_vision(model, train_vision: bool = False) -> int:
    """Freeze the vision tower and its merger/projector; return the number of frozen tensors."""
    if train_vision:
        return 0
    frozen = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "visual":
            for p in mod.parameters():
                p.requires_grad_(False)
                frozen += 1
    if not frozen:
        raise MarsError("no vision module named 'visual' found to freeze (pass --train-vision to train everything)")
    return frozen


class Trainer:
    """A DeepSpeed engine around a policy model, with the loop's few operations."""

    def __init__(self, model, *, zero: int | None = 0, config_file: str | None = None, lr: float = 1e-6,
                 weight_decay: float = 0.01, betas=(0.9, 0.999), grad_clip: float = 1.0, bf16: bool = False,
                 schedule=None):
        from mars_cli.models.load import quiet_deepspeed

        quiet_deepspeed()
        import deepspeed
        import torch

        self.rank, self.world = setup_distributed()
        _skip_shm_op_on_cpu()
        self.config = load_ds_config(zero, config_file, bf16=bf16, grad_clip=grad_clip)
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise MarsError("no trainable parameters")
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)
        sched = None
        if schedule is not None:
            sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=self.config, lr_scheduler=sched,
            dist_init_required=None)
        self.model = self.engine.module
        # models.logprobs forwards through the engine (see its _forward_of); a weak reference
        # keeps the module free of a cycle and of a submodule that state_dict would walk.
        self.model.ds_engine_ref = weakref.ref(self.engine)

    # --- one optimizer step: backward × micro-batches, then step ---------------------

    def backward(self, loss, *, last: bool) -> None:
        """Accumulate the gradient of an already-normalised micro-batch loss."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Clip and apply the accumulated gradient; return the pre-clip global norm."""
        import torch

        if self.stage == 0:
            # Stage 0 keeps plain .grad tensors: check them before anything is changed.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
            if not math.isfinite(norm):
                raise MarsError(f"non-finite gradient norm ({norm}): nothing written")
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        if self.stage != 0:
            n = self.engine.get_global_grad_norm()
            norm = float(n) if n is not None else float("nan")
            if not math.isfinite(norm):
                raise MarsError(f"non-finite gradient norm ({norm}): nothing written")
        return norm

    @property
    def grad_accum_dtype(self):
        """The dtype micro-batch gradients are summed in (fp32 unless a config says otherwise)."""
        return self.engine.get_data_types()[1]

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- collective helpers -----------------------------------------------------------

    def all_reduce(self, sums: dict) -> dict:
        """Sum (and min/max for *_min/*_max keys) metric sums over all ranks (same keys on each)."""
        if self.world == 1:
            return sums
        import torch
        import torch.distributed as dist

        keys = sorted(sums)
        out = {}
        for op, sel in ((dist.ReduceOp.SUM, lambda k: not k.endswith(("_min", "_max"))),
                        (dist.ReduceOp.MIN, lambda k: k.endswith("_min")),
                        (dist.ReduceOp.MAX, lambda k: k.endswith("_max"))):
            ks = [k for k in keys if sel(k)]
            if not ks:
                continue
            t = torch.tensor([float(sums[k]) for k in ks], dtype=torch.float64, device=self._comm_device())
            dist.all_reduce(t, op=op)
            out.update(zip(ks, t.tolist()))
        return out

    def _comm_device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # --- weights and optimizer state ----------------------------------------------------

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (gathered under ZeRO-3); None elsewhere."""
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if self.rank == 0 else None
        return self.model.state_dict() if self.rank == 0 else None

    def full_grad(self, param):
        """The accumulated gradient of one parameter (tests; call before step)."""
        from deepspeed.utils import safe_get_full_grad

        return param.grad if self.stage == 0 else safe_get_full_grad(param)

    def save_state(self, state_dir: str | Path, meta: dict) -> None:
        """Optimizer (and master weights) state for the next invocation, swapped in crash-safely."""
        from mars_cli.fsutil import make_temp_dir, recover_dir, replace_dir

        state_dir = Path(state_dir)
        # Every rank writes its shard into the same temporary directory; rank 0 makes it
        # (named after its own process, so a kill -9 leaves something the next run can
        # recognise as stale) and swaps it in after the barrier (fsutil.replace_dir).
        name = [None]
        if self.rank == 0:
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            recover_dir(state_dir)
            name[0] = make_temp_dir(state_dir).name
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(name, src=0)
        tmp = state_dir.parent / name[0]
        self.engine.save_checkpoint(str(tmp), tag=STATE_TAG, save_latest=False)
        self.barrier()
        if self.rank == 0:
            (tmp / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")
            replace_dir(tmp, state_dir)
        self.barrier()

    def load_state(self, state_dir: str | Path) -> dict:
        """Restore the optimizer state saved by save_state; return its meta."""
        state_dir = Path(state_dir)
        meta = read_state_meta(state_dir)  # recovers an interrupted save first
        path, _ = self.engine.load_checkpoint(str(state_dir), tag=STATE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise MarsError(f"{state_dir}: no DeepSpeed state to resume from")
        return meta


def read_state_meta(state_dir: str | Path) -> dict:
    """mars_state.json of a state directory ({} when there is none yet)."""
    from mars_cli.fsutil import recover_dir

    recover_dir(state_dir)
    p = Path(state_dir) / STATE_META
    if not p.is_file():
        return {}
    return read_json(p)


def config_argv(cfg) -> list[str]:
    """A config dataclass back to the command's flags (field foo_bar ↔ --foo-bar)."""
    from dataclasses import fields

    renamed = getattr(cfg, "FLAG_NAMES", {})  # fields whose flag is not --field-name
    out: list[str] = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        flag = renamed.get(f.name) or "--" + f.name.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def launch_ranks(command: str, paths: list[str], cfg, *, nproc: int, local_rank: int | None,
                 skip_bad: bool, what: str, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                 master_port: int | None = None) -> int | None:
    """Shared start of `mars update`/`mars sft`: take a launcher's --local_rank, and with
    --nproc N (and --nnodes M) outside a launcher relaunch as N ranks on this node; their
    exit code, or None to train here."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank must be in [0, {nnodes}) for --nnodes {nnodes}, got {node_rank}")
    if nnodes > 1 and not master_addr:
        raise UsageError("--nnodes needs --master-addr (node 0's address, reachable from every node)")
    if (nproc <= 1 and nnodes == 1) or under_launcher():
        return None
    if not paths or "-" in paths:
        raise UsageError(f"--nproc/--nnodes need the {what} as a file (every process reads it)")
    nodes = None
    if nnodes > 1:
        nodes = {"nnodes": nnodes, "node_rank": node_rank, "master_addr": master_addr, "master_port": master_port or 29500}
    return relaunch(nproc, command, [*paths, *config_argv(cfg), *(["--skip-bad"] if skip_bad else [])], nodes=nodes)


def relaunch(nproc: int, command: str, args: list[str], *, nodes: dict | None = None) -> int:
    """Run `mars COMMAND ARGS` in `nproc` processes under torch.distributed.run; its exit code.

    Each child reads the whole batch and trains on its rank's share; global rank 0 alone
    writes the checkpoint and the metrics record (to this process's stdout, which it
    inherits). `nodes` (nnodes, node_rank, master_addr, master_port): this is one node of
    several, each started the same way; they meet at master_addr:master_port (node 0).
    """
    import signal
    import subprocess
    import sys

    from mars_cli import streams

    if nodes is None:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nodes['nnodes']}", f"--node-rank={nodes['node_rank']}",
                 f"--master-addr={nodes['master_addr']}", f"--master-port={nodes['master_port']}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
           "-m", "mars_cli", command, *args]
    out = streams.records_out()
    out.flush()
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if fd is None else fd)
    try:
        records, _ = proc.communicate()
    except KeyboardInterrupt as e:
        from mars_cli.errors import TERM_GRACE_S, Terminated

        if isinstance(e, Terminated):  # the launcher passes it to every rank, which ends as on Ctrl-C
            proc.send_signal(signal.SIGTERM)  # (Ctrl-C reached the whole process group already)
        try:
            proc.wait(timeout=TERM_GRACE_S - 5)  # a rank saving its last step
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if fd is None:  # a captured stdout (tests): pass the records through
        out.write(records)
    return proc.returncode
