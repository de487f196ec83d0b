"""Record/replay cache for tool calls: one SQLite file, shared by every tool.

A call is keyed by tool name + normalized arguments + the parameters that change its
answer (backend, k, endpoint, model): never secrets. The first run records what a
call returned; a later run with the same key gets exactly that value back. With
`replay=True` a miss is an error, so an evaluation can be re-run at zero API cost and
is guaranteed to see the same tool results.

WAL mode and a busy timeout let several threads and several `mars` processes share
one cache directory. Failures (ToolError) are not stored: they are usually transient.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from mars_cli.errors import MarsError, ToolError
from mars_cli.fsutil import sha256_bytes

DB_NAME = "tools.sqlite"

# Argument/parameter names that must never reach a key, a log or a record.
SECRET_NAMES = ("api_key", "apikey", "key", "token", "secret", "password", "authorization")


def _is_secret(name: str) -> bool:
    n = name.lower().replace("-", "_")
    return n in SECRET_NAMES or n.endswith("_key") or n.endswith("_token") or n.endswith("_secret")


def normalize(value: Any) -> Any:
    """Canonical form of call arguments: trimmed, whitespace-collapsed strings, secrets dropped."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {str(k): normalize(v) for k, v in sorted(value.items()) if not _is_secret(str(k))}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 5.0 and 5 are the same call
    return value


def cache_key(tool: str, args: dict, params: dict | None = None) -> str:
    """sha256 over the canonical JSON of (tool, args, params)."""
    payload = {"tool": tool, "args": normalize(args), "params": normalize(params or {})}
    return sha256_bytes(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


class ReplayMiss(ToolError):
    """--replay asked for a call that was never recorded."""


class ToolCache:
    """A thread-safe key → JSON value store with record/replay semantics."""

    def __init__(self, directory: str | os.PathLike, *, replay: bool = False):
        self.dir = Path(directory)
        self.replay = replay
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MarsError(f"cache {self.dir}: cannot create: {e.strerror}") from None
        self.path = self.dir / DB_NAME
        if replay and not self.path.exists():
            raise MarsError(f"cache {self.dir}: --replay needs a recorded cache, found none")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, tool TEXT NOT NULL, "
                "args TEXT NOT NULL, value BLOB NOT NULL, created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            raise MarsError(f"cache {self.path}: not a usable SQLite database: {e}") from None
        self.hits = 0
        self.misses = 0

    def get(self, tool: str, args: dict, params: dict | None = None) -> Any | None:
        """The recorded value, or None (a recorded value is never None: see put)."""
        key = cache_key(tool, args, params)
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return orjson.loads(row[0])["v"]

    def put(self, tool: str, args: dict, value: Any, params: dict | None = None) -> None:
        """Record `value` (any JSON value) for this call; an existing entry is replaced."""
        key = cache_key(tool, args, params)
        try:
            blob = orjson.dumps({"v": value})
        except TypeError as e:
            raise MarsError(f"cache: {tool} returned a value that is not JSON: {e}") from None
        shown = orjson.dumps(normalize(args)).decode()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls (key, tool, args, value, created) VALUES (?, ?, ?, ?, ?)",
                (key, tool, shown, blob, time.time()),
            )

    def wrap(self, tool: str, fn: Callable[[], Any], args: dict, params: dict | None = None) -> Any:
        """Return the recorded value for this call, or run `fn()` and record it.

        Under replay a miss raises ReplayMiss (a ToolError naming the call) instead of
        running `fn`. A hit returns a fresh copy, so callers may mutate it.
        """
        value = self.get(tool, args, params)
        if value is not None:
            self.hits += 1
            return value
        if self.replay:
            shown = orjson.dumps(normalize(args)).decode()
            raise ReplayMiss(f"replay: no recorded result for {tool} {shown}")
        self.misses += 1
        value = fn()
        self.put(tool, args, value, params)
        # Hand back what a later hit will return (a JSON round trip), not the live object.
        return orjson.loads(orjson.dumps(value))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_cache(directory: str | os.PathLike | None, *, replay: bool = False) -> ToolCache | None:
    """The cache at `directory` (or MARS_CACHE); None when neither is set."""
    directory = directory or os.environ.get("MARS_CACHE") or None
    if directory is None:
        if replay:
            raise MarsError("--replay needs a cache: pass --cache DIR or set MARS_CACHE")
        return None
    return ToolCache(directory, replay=replay)
