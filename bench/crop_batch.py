"""Benchmark `mars crop` batch mode against one process per crop.

    .venv/bin/python bench/crop_batch.py [--n 24] [--images 3]

Writes `--images` 3840x2160 JPEGs and `--n` boxes spread over them, then times, in one
run so the ratio is side by side:

  per_process  `mars crop IMG X0 Y0 X1 Y1` once per box (a shell loop's cost: interpreter
               start, imports, a fresh decode of the image every time)
  batch        one `mars crop` reading all boxes as JSONL on stdin (each image decoded once)

Prints a table on stderr and one JSON line of figures on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crop import make_photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="boxes")
    ap.add_argument("--images", type=int, default=3, help="source images")
    ap.add_argument("--quick", action="store_true", help="8 boxes over 2 images")
    args = ap.parse_args()
    if args.quick:
        args.n, args.images = 8, 2
    env = {"MARS_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        srcs = []
        for i in range(args.images):
            make_photo(3840, 2160, d / f"p{i}.jpg", seed=i)
            srcs.append(d / f"p{i}.jpg")
        boxes = [(srcs[i % len(srcs)], (0.05 * (i % 10), 0.04 * (i % 12), 0.05 * (i % 10) + 0.2, 0.04 * (i % 12) + 0.3))
                 for i in range(args.n)]
        py = [sys.executable, "-m", "mars_cli", "crop"]
        import os

        full_env = {**os.environ, **env}
        t = time.perf_counter()
        for src, b in boxes:
            subprocess.run([*py, str(src), *map(str, b), "--artifacts", str(d / "a1")], check=True,
                           capture_output=True, env=full_env)
        per_process = time.perf_counter() - t
        lines = "".join(json.dumps({"image": str(s), "box": list(b)}) + "\n" for s, b in boxes)
        t = time.perf_counter()
        p = subprocess.run([*py, "--artifacts", str(d / "a2")], input=lines, text=True, capture_output=True, env=full_env)
        batch = time.perf_counter() - t
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == args.n
    figures = {"crops": args.n, "images": args.images, "per_process_s": round(per_process, 2), "batch_s": round(batch, 2),
               "speedup": round(per_process / batch, 1)}
    sys.stderr.write(f"{args.n} crops of 4K images: one process each {per_process:.2f}s, batch {batch:.2f}s "
                     f"({per_process / batch:.1f}x faster)\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
