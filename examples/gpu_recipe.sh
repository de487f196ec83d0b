#!/usr/bin/env bash
# The SenseNova-MARS recipe on one 8-GPU node, for Qwen2.5-VL-7B or Qwen3-VL-8B:
#   0. convert the RL prompts and the held-out benchmarks to task records
#   1. cold-start SFT on agent trajectories (DeepSpeed ZeRO-3 over 8 GPUs, bf16)
#   2. RL: each step samples 128 prompts, runs 8 episodes per prompt (vLLM, up to 10 turns),
#      (presence penalty 1.5, as the official rollouts), judges them with the official LLM
#      rubric, computes BN-GSPO advantages and trains GSPO on them in mini-batches of
#      MINI_BATCH trajectories (lr 1e-6, KL β 1e-4 against the SFT model as reference),
#      evaluating every EVAL_EVERY steps with the official sampling (T 0.7, top-p 0.8, top-k 20).
#      Why mini-batches: with old log-probs recomputed from the policy before the step, the
#      GSPO ratio of the first optimizer step is exactly 1, so with one step per batch the
#      clip never acts; from the second mini-batch on the policy has moved and it does.
#
# The policy is served once for the whole run: `mars serve --engine vllm` on all NGPU GPUs
# (tensor parallel TP, vLLM's data parallelism over the NGPU/TP groups), started after SFT
# and kept across steps. Rollouts and evaluations go to it (`mars rollout --server`). For
# each update it sleeps (its GPU memory lent to the ZeRO-3 trainer), and `mars update
# --push` has it load the new checkpoint in place: no restart, no recompilation, no CUDA
# graph recapture. Its log is $WORK/serve.log; it stops when this script ends.
#
#   BASE_MODEL=models/Qwen2.5-VL-7B-Instruct SFT_DATA=data/cold_start.jsonl RL_DATA=data/mars_rl.jsonl \
#       EVAL_SETS="hr-mmsearch=data/hr_mmsearch.parquet vstar=data/vstar_bench" bash examples/gpu_recipe.sh
#   DRY_RUN=1 bash examples/gpu_recipe.sh     # print every command it would run now, one per line
#
# The judge and the search summarizer are LLMs behind vLLM's OpenAI-compatible server, on
# other GPUs (another node, or a second 8-GPU machine), started before this script:
#   vllm serve Qwen/Qwen2.5-72B-Instruct --port 8001 --tensor-parallel-size 4 --max-model-len 32768
# and given to it as JUDGE_URL / SUMMARY_URL (default http://127.0.0.1:8001/v1 for both).
#
# Resumable: a step whose checkpoint exists is skipped, and a stage whose output exists is
# not redone (every output is written atomically); an interrupted rollout continues with
# --resume, and tool results come from the tool cache. Run the same command again to go on.
#
# Settings (environment variables, with their defaults):
#   BASE_MODEL (models/Qwen2.5-VL-7B-Instruct; or models/Qwen3-VL-8B-Instruct)  WORK (runs/mars)
#   SFT_DATA (data/cold_start.jsonl: trajectory records, e.g. a teacher's, see eval_openai.sh)
#   RL_DATA (data/mars_rl.jsonl, SenseNova-MARS format)  RL_FORMAT (sensenova-mars)
#   EVAL_SETS ("FORMAT=PATH …" held-out benchmarks)  EVAL_EVERY (10)  STEPS (300)  SEED (0)
#   PROMPTS (128)  SAMPLES (8)  MINI_BATCH (256: 4 optimizer steps per batch)  MAX_TURNS (10)
#   LR (1e-6)  BETA (1e-4)  PRESENCE_PENALTY (1.5)  EVAL_SAMPLING (official; or greedy)  NPROC (8)  TP (1)
#   NGPU (8: GPUs the server uses)  SERVE_PORT (8100)  MAX_IMAGES (32: images per episode)
#   MAX_INFLIGHT (512: episodes in flight against the server)
#   SFT_EPOCHS (2)  SFT_LR (1e-5)  SFT_BATCH (64)  MAX_NEW_TOKENS (2048)  (budgets 16K prompt + 16K response and
#   images at 65,536–8,294,400 pixels, as the official run)
#   JUDGE_URL, JUDGE_MODEL (Qwen/Qwen2.5-72B-Instruct)  SUMMARY_URL, SUMMARY_MODEL (the same)
#   SEARCH_BACKEND (serper: needs SERPER_API_KEY)  IMAGE_SEARCH_BACKEND (precomputed)
# Keys only from the environment: SERPER_API_KEY, MARS_JUDGE_API_KEY, MARS_LLM_API_KEY.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/mars" ] && export PATH="$here/.venv/bin:$PATH"

DRY_RUN="${DRY_RUN:-0}"
BASE_MODEL="${BASE_MODEL:-models/Qwen2.5-VL-7B-Instruct}"
W="${WORK:-runs/mars}"
SFT_DATA="${SFT_DATA:-data/cold_start.jsonl}"
RL_DATA="${RL_DATA:-data/mars_rl.jsonl}"
RL_FORMAT="${RL_FORMAT:-sensenova-mars}"
EVAL_SETS="${EVAL_SETS:-hr-mmsearch=data/hr_mmsearch.parquet fvqa=data/fvqa_test.parquet vstar=data/vstar_bench hr-bench=data/hr_bench_4k.tsv}"
EVAL_EVERY="${EVAL_EVERY:-10}"
STEPS="${STEPS:-300}"
SEED="${SEED:-0}"
PROMPTS="${PROMPTS:-128}"
SAMPLES="${SAMPLES:-8}"
MINI_BATCH="${MINI_BATCH:-256}"
MAX_TURNS="${MAX_TURNS:-10}"
LR="${LR:-1e-6}"
BETA="${BETA:-1e-4}"
NPROC="${NPROC:-8}"
TP="${TP:-1}"
NGPU="${NGPU:-8}"
SERVE_PORT="${SERVE_PORT:-8100}"
MAX_IMAGES="${MAX_IMAGES:-32}"
MAX_INFLIGHT="${MAX_INFLIGHT:-512}"
SFT_EPOCHS="${SFT_EPOCHS:-2}"
SFT_LR="${SFT_LR:-1e-5}"
SFT_BATCH="${SFT_BATCH:-64}"
JUDGE_URL="${JUDGE_URL:-http://127.0.0.1:8001/v1}"
JUDGE_MODEL="${JUDGE_MODEL:-Qwen/Qwen2.5-72B-Instruct}"
SUMMARY_URL="${SUMMARY_URL:-$JUDGE_URL}"
SUMMARY_MODEL="${SUMMARY_MODEL:-$JUDGE_MODEL}"

run() {  # run a command; with DRY_RUN=1 print it instead (one shell-quoted line)
    if [ "$DRY_RUN" = 1 ]; then
        local line
        printf -v line ' %q' "$@"
        echo "${line# }"
    else
        "$@"
    fi
}
append() {  # append FILE CMD…: CMD's stdout (a metrics record) added to FILE
    local file="$1"
    shift
    if [ "$DRY_RUN" = 1 ]; then run "$@"; else "$@" >> "$file"; fi
}
have() { [ -e "$1" ]; }  # a finished output: a dry run, too, shows only what is left to do
seeded_bytes() { openssl enc -aes-256-ctr -pass "pass:$1" -nosalt -pbkdf2 < /dev/zero 2>/dev/null; }
sample_prompts() {  # N SEED IN OUT: the same N prompts for the same seed, so a re-run agrees
    if [ "$DRY_RUN" = 1 ]; then
        echo "shuf -n $1 --random-source=<(seeded_bytes $2) $3 -o $4"
    else
        shuf -n "$1" --random-source=<(seeded_bytes "$2") "$3" -o "$4"
    fi
}
log() { printf '== %s\n' "$*" >&2; }

# The policy server: started once (serve_policy), asleep while a trainer uses the GPUs.
S="http://127.0.0.1:$SERVE_PORT"
serve_pid=""
serve_policy() {  # POLICY: start the server on it unless it is running; wait until it serves
    [ -n "$serve_pid" ] && return
    if [ "$DRY_RUN" = 1 ]; then
        run mars serve "${SERVE[@]}" --policy "$1"
        serve_pid=dry
        return
    fi
    mkdir -p "$W"
    mars serve "${SERVE[@]}" --policy "$1" > "$W/serve.url" 2>> "$W/serve.log" &
    serve_pid=$!
    trap 'kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null' EXIT
    until curl -sf "$S/health" > /dev/null; do  # 503 while loading; vLLM's first start takes minutes
        kill -0 "$serve_pid" 2>/dev/null || { echo "mars serve failed: see $W/serve.log" >&2; exit 1; }
        sleep 5
    done
}
serve_sleep() {  # lend the GPUs to the trainer: vLLM drops weights and KV cache (level 2); the push reloads
    run curl -sf -X POST "$S/sleep?level=2&mode=wait" -o /dev/null
}

# Serving, generation and tools, shared by training rollouts and evaluation.
SERVE=(--engine vllm --tp "$TP" --dp "$((NGPU / TP))" --port "$SERVE_PORT" --allow-load "$W"
       --max-model-len 32768 --min-pixels 65536 --max-pixels 8294400 --limit-mm-per-prompt "$MAX_IMAGES" --gpu-memory-utilization 0.85)
GEN=(--server "$S" --max-inflight "$MAX_INFLIGHT" --max-turns "$MAX_TURNS" --max-new-tokens "${MAX_NEW_TOKENS:-2048}"
     --max-prompt-tokens 16384 --max-response-tokens 16384 --min-pixels 65536 --max-pixels 8294400)
TOOLS=(--search-backend "${SEARCH_BACKEND:-serper}" --summarize --llm-base-url "$SUMMARY_URL" --llm-model "$SUMMARY_MODEL"
       --image-search-backend "${IMAGE_SEARCH_BACKEND:-precomputed}" --cache "$W/tool-cache")
JUDGE=(--judge-base-url "$JUDGE_URL" --judge-model "$JUDGE_MODEL" --cache "$W/judge-cache")

log "0. data: RL prompts and held-out benchmarks"
have "$W/data/rl/tasks.jsonl" || run mars data convert --format "$RL_FORMAT" --seed "$SEED" --out "$W/data/rl" "$RL_DATA"
evals=()
for spec in $EVAL_SETS; do
    fmt="${spec%%=*}"
    evals+=("$fmt")
    have "$W/data/eval/$fmt/tasks.jsonl" || run mars data convert --format "$fmt" --out "$W/data/eval/$fmt" "${spec#*=}"
done

evaluate() {  # POLICY LABEL: greedy episodes on every held-out benchmark, one metrics file each
    local out="$W/eval/$2"
    run mkdir -p "$out"
    for name in "${evals[@]}"; do
        have "$out/$name.metrics.jsonl" && continue
        serve_policy "$1"
        # --policy: refused unless the server serves exactly this checkpoint
        run mars rollout --policy "$1" "${GEN[@]}" "${TOOLS[@]}" --sampling "${EVAL_SAMPLING:-official}" --seed 3407 -n 1 --resume \
            -o "$out/$name.jsonl" "$W/data/eval/$name/tasks.jsonl"
        run mars judge "${JUDGE[@]}" --allow-missing -o "$out/$name.judged.jsonl" "$out/$name.jsonl"
        run mars eval --by category --label "$2" -o "$out/$name.metrics.jsonl" "$out/$name.judged.jsonl"
    done
}

log "1. cold-start SFT: $BASE_MODEL on $SFT_DATA"
SFT="$W/policy-sft"
if ! have "$SFT"; then
    append "$W/sft-metrics.jsonl" mars sft "$SFT_DATA" --policy "$BASE_MODEL" --out "$SFT" \
        --epochs "$SFT_EPOCHS" --lr "$SFT_LR" --batch-size "$SFT_BATCH" --warmup 0.05 --seed "$SEED" \
        --nproc "$NPROC" --zero 3 --bf16 --gradient-checkpointing
fi
evaluate "$SFT" sft

log "2. RL: $STEPS steps of BN-GSPO, $PROMPTS prompts × $SAMPLES samples"
policy="$SFT"
for step in $(seq 1 "$STEPS"); do
    ckpt="$W/ckpt/step-$step"
    d="$W/steps/$step"
    if ! have "$ckpt"; then
        run mkdir -p "$d"
        have "$d/prompts.jsonl" || sample_prompts "$PROMPTS" "$SEED-$step" "$W/data/rl/tasks.jsonl" "$d/prompts.jsonl"
        if ! have "$d/batch.jsonl"; then
            serve_policy "$policy"
            run mars rollout --policy "$policy" "${GEN[@]}" "${TOOLS[@]}" -n "$SAMPLES" --temperature 1.0 \
                --presence-penalty "${PRESENCE_PENALTY:-1.5}" \
                --seed "$((SEED * 100000 + step))" --resume -o "$d/rollout.jsonl" "$d/prompts.jsonl"
            run mars judge "${JUDGE[@]}" --allow-missing -o "$d/judged.jsonl" "$d/rollout.jsonl"
            run mars advantage --algo bn-gspo -o "$d/batch.jsonl" "$d/judged.jsonl"
        fi
        push=()
        if [ -n "$serve_pid" ]; then  # the server sleeps through the update, then loads its checkpoint
            serve_sleep
            push=(--push "$S")
        fi
        append "$W/update-metrics.jsonl" mars update "$d/batch.jsonl" --policy "$policy" --ref "$SFT" --out "$ckpt" \
            --state "$W/optimizer" --loss gspo --lr "$LR" --beta "$BETA" --batch-size "$MINI_BATCH" --seed "$step" \
            --nproc "$NPROC" --zero 3 --bf16 --gradient-checkpointing "${push[@]}"
    fi
    policy="$ckpt"
    # Evaluations are skipped per benchmark once their metrics exist, so a resumed run
    # redoes only what an interruption cut short.
    if [ $((step % EVAL_EVERY)) = 0 ] || [ "$step" = "$STEPS" ]; then
        evaluate "$policy" "step-$step"
    fi
done
log "done: $policy; metrics in $W/eval/*/*.metrics.jsonl and $W/update-metrics.jsonl"
