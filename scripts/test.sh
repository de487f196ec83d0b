#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The browser test of `mars show` needs Debian's chromium; CI installs it, elsewhere the
# test skips with its reason when the browser is absent.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) >&2 || echo "chromium not installed; its test will skip" >&2
fi
# DeepSpeed compiles a small CPU op on first use: build it once per machine.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mars/torch_extensions}"
exec .venv/bin/python -m pytest "$@"
