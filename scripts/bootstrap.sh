#!/usr/bin/env bash
# Create .venv and install mars with its test tools, on a machine with only Python 3.10+.
# torch is pinned first, on its own, so pip takes the CPU build instead of a multi-GB
# CUDA one; every later install repeats the pin so nothing upgrades it.
# Usage: scripts/bootstrap.sh [extra pip args]   (MARS_TORCH overrides the torch pin)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pin="${MARS_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.mars-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $torch_pin"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q "$torch_pin" >&2
.venv/bin/python -m pip install -q -e '.[test]' "$torch_pin" "$@" >&2
echo "$want" > "$stamp"
