"""A thread-safe LRU of decoded images, bounded by their total pixel count (images.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np


class PixelLRU:
    """A thread-safe LRU of decoded arrays, bounded by their total pixel count.

    Two threads asking for the same missing image do not both decode it: the second waits
    for the first (and decodes itself only if the first failed).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple, threading.Event] = {}
        self.hits = self.misses = self.decodes = 0

    def get(self, key: tuple, decode: Callable[[], np.ndarray]) -> np.ndarray:
        while True:
            with self._lock:
                arr = self._items.get(key)
                if arr is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return arr
                pending = self._inflight.get(key)
                if pending is None:
                    self._inflight[key] = threading.Event()
                    self.misses += 1
                    break
            pending.wait()
        try:
            arr = decode()
            with self._lock:
                self.decodes += 1
                self._put(key, arr)
            return arr
        finally:
            with self._lock:
                self._inflight.pop(key).set()

    def _put(self, key: tuple, arr: np.ndarray) -> None:
        n = arr.shape[0] * arr.shape[1]
        if n > self.budget:
            return  # bigger than the whole cache: decoding it again is cheaper than evicting all
        # An older version of the same file (same path, other mtime) will never be asked for again.
        for old in [k for k in self._items if k[0] == key[0]]:
            self._drop(old)
        self._items[key] = arr
        self._pixels += n
        while self._pixels > self.budget:
            self._drop(next(iter(self._items)))

    def _drop(self, key: tuple) -> None:
        arr = self._items.pop(key)
        self._pixels -= arr.shape[0] * arr.shape[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._pixels = 0
            self.hits = self.misses = self.decodes = 0

    def info(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "decodes": self.decodes,
                    "entries": len(self._items), "pixels": self._pixels, "budget": self.budget}
