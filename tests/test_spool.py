"""mars_cli.spool: one content-addressed writer, and a bounded spool that never evicts a held file."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from mars_cli.spool import Spool, content_name, store, sweep_dead_spools


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_many_threads_storing_the_same_bytes_all_succeed_with_one_whole_file(tmp_path):
    data = os.urandom(300_000)
    barrier = threading.Barrier(32)

    def write(_):
        barrier.wait()
        return store(tmp_path / "art", data, ".png")

    with ThreadPoolExecutor(32) as pool:
        paths = set(pool.map(write, range(32)))
    assert paths == {tmp_path / "art" / content_name(data, ".png")}
    assert _files(tmp_path / "art") == [content_name(data, ".png")]  # no temporary file left
    assert paths.pop().read_bytes() == data


def test_store_replaces_a_truncated_file_and_keeps_a_whole_one(tmp_path):
    data = b"x" * 1000
    path = tmp_path / content_name(data, ".bin")
    path.write_bytes(b"x" * 10)  # a partial file from an older writer without a temporary name
    assert store(tmp_path, data, ".bin") == path and path.read_bytes() == data
    before = path.stat().st_ino
    store(tmp_path, data, ".bin")
    assert path.stat().st_ino == before  # already there: not rewritten


def test_concurrent_holders_with_evictions_in_the_middle_never_lose_a_held_file(tmp_path):
    shared = os.urandom(50_000)
    spool = Spool(max_bytes=120_000, max_files=4, parent=tmp_path)
    errors: list[str] = []
    barrier = threading.Barrier(24)

    def client(k):
        barrier.wait()
        for r in range(30):
            # the shared image, plus one of this client's own that pushes the spool over its bounds
            mine = os.urandom(40_000)
            a = spool.hold(shared, ".img")
            b = spool.hold(mine, ".img")  # evicts unheld files: never `a`, held by this and other clients
            for path, want in ((a, shared), (b, mine)):
                try:
                    if path.read_bytes() != want:
                        errors.append(f"{path.name}: wrong bytes")
                except FileNotFoundError:
                    errors.append(f"{path.name}: evicted while held")
            spool.release(b)
            spool.release(a)

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(client, range(24)))
    assert errors == []
    info = spool.info()
    assert info["evicted"] > 0 and info["held"] == 0
    on_disk = sum(p.stat().st_size for p in spool.dir.iterdir())
    assert info["bytes"] == on_disk <= 120_000 and len(list(spool.dir.iterdir())) == info["files"] <= 4
    spool.close()
    assert not spool.dir.exists()


def test_the_spool_is_bounded_in_bytes_and_a_discarded_file_goes_at_once(tmp_path):
    spool = Spool(max_bytes=64_000, max_files=2048, parent=tmp_path)
    for _ in range(30):
        spool.release(spool.hold(os.urandom(8_000)))
    assert sum(p.stat().st_size for p in spool.dir.iterdir()) <= 64_000
    refused = spool.hold(b"not an image")
    kept = spool.hold(b"not an image")  # a second request holds the same bytes
    spool.discard(refused)
    assert kept.exists()  # still held by the other request
    spool.discard(kept)
    assert not kept.exists()
    spool.close()


def test_spools_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    live = Spool(max_bytes=1 << 20, max_files=10, parent=tmp_path)
    host = live.dir.name.split("-")[2]
    gone = tmp_path / f"mars-spool-{host}-{pid}-abc123"
    gone.mkdir()
    (gone / "x.img").write_bytes(b"old")
    other_host = tmp_path / f"mars-spool-00000000-{pid}-abc123"
    other_host.mkdir()
    assert sweep_dead_spools(tmp_path) == [gone]
    assert not gone.exists() and live.dir.exists() and other_host.exists()
    Spool(max_bytes=1, max_files=1, parent=tmp_path).close()  # a new spool sweeps too
    live.close()
