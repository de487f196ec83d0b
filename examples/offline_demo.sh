#!/usr/bin/env bash
# The whole SenseNova-MARS recipe, offline, on the CPU:
#   tiny policy + synthetic benchmark + local search index
#   → cold-start SFT on reference trajectories → evaluation on held-out tasks
#   → RL as one resident pipeline: `mars serve` + `rollout --loop | judge | advantage |
#     update --follow --push` → evaluations of its checkpoints on the same held-out tasks
#   → a table, the paired bootstrap interval of the accuracy gain, curves, an episode page.
#
#   bash examples/offline_demo.sh            # everything lands in ./demo (MARS_DEMO_DIR)
#
# Every setting below is an ordinary mars option; the environment variables only size the
# run (a test runs the same script smaller):
#   DEMO_SEED (0)            seeds the model, the tasks and the sampling
#   DEMO_TASKS (1700)        synthetic tasks; DEMO_KINDS (search) their kinds and weights
#   DEMO_VAGUE (0.5)         share of the SFT references that search with a vague query
#   DEMO_TEST_FRACTION (0.07) held out for evaluation; DEMO_VAL_FRACTION (0.04) for choosing settings
#   DEMO_WIDTH (128), DEMO_LAYERS (2)           the tiny policy
#   DEMO_SFT_EPOCHS (9), DEMO_SFT_LR (3e-3)     cold start
#   DEMO_RL_STEPS (32), DEMO_RL_TASKS (8), DEMO_SAMPLES (8), DEMO_RL_LR (3e-4), DEMO_BETA (0.1)   RL
#   DEMO_EVAL_SAMPLES (2), DEMO_EVAL_EVERY (16) held-out episodes per task; RL steps between evaluations
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mars/torch_extensions}"
# One thread per process: a tiny model's matrices are too small to share out, the pipeline's
# processes run side by side, and spinning threads on a busy machine cost ten times over.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

W="${MARS_DEMO_DIR:-demo}"
SEED="${DEMO_SEED:-0}"
TASKS="${DEMO_TASKS:-1700}"
VAGUE="${DEMO_VAGUE:-0.5}"
KINDS="${DEMO_KINDS:-search}"
TEST_FRACTION="${DEMO_TEST_FRACTION:-0.07}"
VAL_FRACTION="${DEMO_VAL_FRACTION:-0.04}"
WIDTH="${DEMO_WIDTH:-128}"
LAYERS="${DEMO_LAYERS:-2}"
EPOCHS="${DEMO_SFT_EPOCHS:-9}"
SFT_LR="${DEMO_SFT_LR:-3e-3}"
STEPS="${DEMO_RL_STEPS:-32}"
RL_TASKS="${DEMO_RL_TASKS:-8}"
SAMPLES="${DEMO_SAMPLES:-8}"
RL_LR="${DEMO_RL_LR:-3e-4}"
BETA="${DEMO_BETA:-0.1}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-2}"
EVAL_EVERY="${DEMO_EVAL_EVERY:-16}"
# A short system prompt and one search result per call: the CPU is slow, and every token of
# the prompt is paid for in every turn of every episode. The reference trajectories are
# written with the same prompt, the same search and the same protocol profile.
SYSTEM_PROMPT='You answer questions by searching text. Each turn: <thinking>...</thinking>, then a text_search_tool call or <answer>...</answer>.'
SEARCH_K=1
ROLL=(--protocol mars --system-prompt "$SYSTEM_PROMPT" --search-k "$SEARCH_K" --max-pixels 200704
      --index "$W/index" --max-turns 3 --max-new-tokens 64)

# Start clean, but only ever delete a folder this script made.
if [ -e "$W" ] && [ -n "$(ls -A "$W" 2>/dev/null)" ] && [ ! -f "$W/.mars-demo" ]; then
    echo "offline_demo: $W exists and is not a demo folder; set MARS_DEMO_DIR" >&2
    exit 1
fi
rm -rf "$W" && mkdir -p "$W" && touch "$W/.mars-demo"
log() { printf '\n== %s\n' "$*" >&2; }

# Every process this script starts in the background is stopped on success, error or Ctrl-C.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "1. a tiny policy, the synthetic benchmark, the local index"
# Qwen's tokenizer cut to its first 8192 tokens: on a CPU the 151k-row output layer would
# cost more than the rest of the model.
mars tiny-model "$W/policy-0" --seed "$SEED" --vocab 8192 --layers "$LAYERS" --width "$WIDTH" >/dev/null
# Search tasks: the question names a place; one text search finds its passage and the city or
# the founder asked for is copied out of it. A policy that cannot read images can learn them
# by acting. Names are made of common words (--names words), which a model this small learns
# to copy in minutes. The reference agent is a sloppy teacher: half of its searches are for
# the place's kind and place word ("mill Row"), not its name, and it answers from whatever
# place that finds. That is the habit RL has to unlearn.
mars data synth --tasks "$TASKS" --seed "$SEED" --kinds "$KINDS" --names words --attributes city,founder \
    --vague-fraction "$VAGUE" --distractors 0 --protocol mars --system-prompt "$SYSTEM_PROMPT" --search-k "$SEARCH_K" \
    --test-fraction "$TEST_FRACTION" --val-fraction "$VAL_FRACTION" -o "$W/data" >/dev/null
mars index text "$W/data/corpus.jsonl" --out "$W/index" >/dev/null

evaluate() {  # policy label step: EVAL_SAMPLES sampled episodes per held-out task (the policy RL samples from)
    mars rollout --policy "$1" "${ROLL[@]}" -n "$EVAL_SAMPLES" --temperature 1 --seed 7 \
        -o "$W/eval-$2.jsonl" "$W/data/test/tasks.jsonl"
    mars judge "$W/eval-$2.jsonl" -o "$W/judged-$2.jsonl"
    mars eval "$W/judged-$2.jsonl" --label "$2" --step "$3" -q >> "$W/metrics.jsonl"   # step: plot's x axis
}

log "2. cold-start SFT on the reference trajectories of two thirds of the training tasks"
# The other third is left for RL: tasks the policy has never seen, so a reward can only come
# from acting well, not from remembering an answer.
awk 'NR % 3 != 0' "$W/data/train/reference.jsonl" > "$W/sft-references.jsonl"
awk 'NR % 3 == 0' "$W/data/train/tasks.jsonl" > "$W/rl-tasks.jsonl"
# Settings chosen on the validation split (README): a tiny random model needs many passes at
# a high rate (a 7B model: lr 1e-5, batch 64), and this many leave it short of perfect.
mars sft "$W/sft-references.jsonl" --policy "$W/policy-0" --out "$W/policy-sft" --no-eval \
    --epochs "$EPOCHS" --lr "$SFT_LR" --batch-size 4 --micro-batch-tokens 4096 --warmup 0.05 --min-lr-ratio 0.1 \
    --seed "$SEED" > "$W/sft-metrics.jsonl"
evaluate "$W/policy-sft" sft 0

log "3. reinforcement learning: $STEPS steps of BN-GSPO, $RL_TASKS tasks x $SAMPLES samples each, one resident pipeline"
# The policy is served once; rollout streams episodes from it over the RL tasks
# (reshuffled each pass), judge and advantage score and batch them as they come, and
# update --follow trains on each batch and pushes the new weights to the server. Rollout
# runs at most one batch ahead of the weights it samples from (--max-staleness 1).
mars serve --policy "$W/policy-sft" --port 0 --seed "$SEED" -q > "$W/serve.json" 2> "$W/serve.log" &
PIDS+=("$!")
until [ -s "$W/serve.json" ]; do
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$W/serve.log" >&2; echo "offline_demo: mars serve failed" >&2; exit 1; }
    sleep 0.2
done
URL="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["url"])' "$W/serve.json")"
KEEP=$(( EVAL_EVERY > 0 ? STEPS / EVAL_EVERY + 1 : 1 ))
# The reward is accuracy alone (--format-weight 0): SFT already taught the format, and a
# format bonus would let RL trade accuracy for it. The KL term to the SFT policy (--ref,
# --beta) keeps what no reward speaks for, the copying, from drifting while RL changes the query.
mars rollout --server "$URL" "${ROLL[@]}" -n "$SAMPLES" --temperature 1 --seed "$SEED" --loop --group-order \
        --batch-groups "$RL_TASKS" --max-staleness 1 -q "$W/rl-tasks.jsonl" 2> "$W/rollout.log" \
    | mars judge --format-weight 0 -q \
    | mars advantage --batch-groups "$RL_TASKS" --group-size "$SAMPLES" -q \
    | mars update --follow --policy "$W/policy-sft" --out "$W/rl" --push "$URL" --max-steps "$STEPS" \
        --save-every "$(( EVAL_EVERY > 0 ? EVAL_EVERY : STEPS ))" --keep-last "$KEEP" --lr "$RL_LR" --seed "$SEED" \
        --ref "$W/policy-sft" --beta "$BETA" \
        > "$W/update-metrics.jsonl"
kill "${PIDS[-1]}" 2>/dev/null || true

log "held-out evaluations of the RL checkpoints"
if [ "$EVAL_EVERY" -gt 0 ]; then
    for step in $(seq "$EVAL_EVERY" "$EVAL_EVERY" "$(( STEPS - 1 ))"); do
        evaluate "$W/rl/step-$step" "rl-$step" "$step"
    done
fi
evaluate "$W/rl/step-$STEPS" rl "$STEPS"

log "4. pages: $W/episodes.html, the RL curves $W/run.html and the SFT curves $W/sft.html"
mars show "$W/judged-rl.jsonl" -o "$W/episodes.html" >/dev/null
# Apart: SFT counts thousands of steps, RL tens, and one x axis would flatten the RL curves.
mars plot "$W/update-metrics.jsonl" "$W/metrics.jsonl" -o "$W/run.html" >/dev/null
mars plot "$W/sft-metrics.jsonl" -o "$W/sft.html" >/dev/null

log "results on the held-out tasks ($EVAL_SAMPLES sampled episodes per task, temperature 1)"
python3 - "$W" <<'PY'
import json, random, sys
from collections import defaultdict
w = sys.argv[1]
rows = [json.loads(l) for l in open(f"{w}/metrics.jsonl") if l.strip()]
print(f"{'stage':<8} {'episodes':>8} {'format':>7} {'accuracy':>9} {'tools/ep':>9} {'reward':>7}")
for r in rows:
    if r.get("by") is None:
        print(f"{r['label']:<8} {r['episodes']:>8} {r['format']:>7.2f} {r['pass@1']:>9.2f} {r['tool_calls']:>9.2f} {r['reward']:>7.2f}")

def per_task(label):
    acc = defaultdict(list)
    for l in open(f"{w}/judged-{label}.jsonl"):
        if l.strip():
            r = json.loads(l)
            acc[r["group"]].append((r.get("rewards") or {}).get("accuracy") or 0.0)
    return {k: sum(v) / len(v) for k, v in acc.items()}

# The gain in accuracy, RL over SFT: held-out tasks resampled with replacement, paired.
sft, rl = per_task("sft"), per_task("rl")
tasks = sorted(set(sft) & set(rl))
diffs = [rl[t] - sft[t] for t in tasks]
rng = random.Random(0)
boot = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(10000))
print(f"accuracy gain rl - sft: {sum(diffs) / len(diffs):+.3f}, 95% paired bootstrap interval "
      f"[{boot[249]:+.3f}, {boot[9749]:+.3f}] over {len(tasks)} held-out tasks")
PY
