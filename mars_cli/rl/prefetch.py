"""Model inputs built one micro-batch ahead, in a background thread.

Rebuilding a trajectory's input decodes, resizes and patchifies its images on the CPU
(seconds for a 4K photo). Inline, that time adds to every training step while the
accelerator waits. `batching.micro_logprobs(..., upcoming=next_examples)` hands the next
micro-batch to one worker thread, which builds it while the current one computes:

    prefetcher.submit(policy, upcoming)       # returns at once
    batch = prefetcher.take(policy, current)  # the built Batch, or None if not submitted

At most one build runs ahead (memory: one micro-batch's pixel tensors). The worker runs
exactly what `build_inputs` runs inline, so a prefetched batch is the inline batch; an
error in it (a missing image) is raised by the `take` of the step that uses it. Images
decoded by the worker land in the shared pixel cache as well. The worker is one daemon
thread of a ThreadPoolExecutor, joined when the process exits.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence


def _key(policy, examples) -> tuple:
    # Identity, not content: the training loop hands the same Example objects to submit
    # and then to take, and they stay alive in between.
    return (id(policy), *(id(ex) for ex in examples))


def build_for(policy, examples, *, vision_filler: bool = False):
    """The model input of a micro-batch of Examples (ids, images, recorded pixel limits)."""
    from mars_cli.models.inputs import build_inputs

    return build_inputs(policy, [(ex.ids, ex.images) for ex in examples], vision_filler=vision_filler,
                        pixels=[ex.pixels for ex in examples])


class InputPrefetcher:
    """One worker thread that builds the next micro-batch's inputs."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple, Future] | None = None
        self._lock = threading.Lock()
        self.hits = 0  # batches taken ready-made (for tests and benchmarks)

    def submit(self, policy, examples: Sequence) -> None:
        """Start building `examples`' input; drops an earlier build nobody took."""
        key = _key(policy, examples)
        with self._lock:
            if self._pending is not None and self._pending[0] == key:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-prefetch")
            if self._pending is not None:
                self._pending[1].cancel()  # not started yet: never runs; running: its result is dropped
            self._pending = (key, self._pool.submit(build_for, policy, list(examples)))

    def take(self, policy, examples: Sequence):
        """The prefetched input of `examples` (waiting for it if still building), or None."""
        key = _key(policy, examples)
        with self._lock:
            if self._pending is None or self._pending[0] != key:
                return None
            _, fut = self._pending
            self._pending = None
        batch = fut.result()  # re-raises the build's error here, in the step that needs it
        self.hits += 1
        return batch

    def close(self) -> None:
        """Stop the worker (a pending build is cancelled or waited for)."""
        with self._lock:
            pool, self._pool, self._pending = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


PREFETCHER = InputPrefetcher()
