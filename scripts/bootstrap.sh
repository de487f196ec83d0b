#!/usr/bin/env bash
# Create .venv and install mars with its test tools, on a machine with only Python 3.10+.
# torch is pinned first, on its own, so pip takes the CPU build instead of a multi-GB
# CUDA one; every later install repeats the pin so nothing upgrades it.
# Usage: scripts/bootstrap.sh [extra pip args]   (MARS_TORCH overrides the torch pin;
# MARS_EXTRAS the extras installed with mars, default `test`: scripts/test.sh adds `bench`)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pin="${MARS_TORCH:-torch==2.13.0}"
extras="${MARS_EXTRAS:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The stamp: line 1 what was installed from, line 2 the extras. A later call asking for
# fewer extras than are installed has nothing to do.
stamp=.venv/.mars-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $torch_pin"
if [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$want" ]; then
    have="$(sed -n 2p "$stamp")"
    todo=""
    for e in ${extras//,/ }; do
        case ",$have," in *",$e,"*) ;; *) todo="$todo,$e" ;; esac
    done
    [ -z "$todo" ] && exit 0
    extras="$have$todo"  # keep what is there
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q "$torch_pin" >&2
.venv/bin/python -m pip install -q -e ".[$extras]" "$torch_pin" "$@" >&2
printf '%s\n%s\n' "$want" "$extras" > "$stamp"
