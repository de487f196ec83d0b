#!/usr/bin/env bash
# The whole SenseNova-MARS recipe, offline, on the CPU:
#   tiny policy + synthetic benchmark + local search index
#   → cold-start SFT on reference trajectories → evaluation on held-out tasks
#   → RL steps, each literally `rollout | judge | advantage > batch; update`, with
#     evaluations along the way → evaluation on the same held-out tasks
#   → a table, the paired bootstrap interval of the accuracy gain, curves, an episode page.
#
#   bash examples/offline_demo.sh            # everything lands in ./demo (MARS_DEMO_DIR)
#
# Every setting below is an ordinary mars option; the environment variables only size the
# run (a test runs the same script smaller):
#   DEMO_SEED (0)            seeds the model, the tasks and the sampling
#   DEMO_TASKS (400)         synthetic tasks; DEMO_KINDS (search) their kinds and weights
#   DEMO_TEST_FRACTION (0.2) held out for evaluation; DEMO_VAL_FRACTION (0.1) for choosing settings
#   DEMO_WIDTH (64), DEMO_LAYERS (4)            the tiny policy
#   DEMO_SFT_EPOCHS (1), DEMO_SFT_LR (1e-2)     cold start
#   DEMO_RL_STEPS (24), DEMO_RL_TASKS (8), DEMO_SAMPLES (8), DEMO_RL_LR (1e-3)   RL
#   DEMO_EVAL_SAMPLES (3), DEMO_EVAL_EVERY (8)  held-out episodes per task; RL steps between evaluations
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
TASKS="${DEMO_TASKS:-400}"
KINDS="${DEMO_KINDS:-search}"
TEST_FRACTION="${DEMO_TEST_FRACTION:-0.2}"
VAL_FRACTION="${DEMO_VAL_FRACTION:-0.1}"
WIDTH="${DEMO_WIDTH:-64}"
LAYERS="${DEMO_LAYERS:-4}"
EPOCHS="${DEMO_SFT_EPOCHS:-1}"
SFT_LR="${DEMO_SFT_LR:-1e-2}"
STEPS="${DEMO_RL_STEPS:-24}"
RL_TASKS="${DEMO_RL_TASKS:-8}"
SAMPLES="${DEMO_SAMPLES:-8}"
RL_LR="${DEMO_RL_LR:-1e-3}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-3}"
EVAL_EVERY="${DEMO_EVAL_EVERY:-8}"
# The mars protocol profile (a short system prompt) and short episodes: the CPU is slow.
# A search task takes two turns of the reference agent, each under 70 tokens.
ROLL=(--protocol mars --max-pixels 200704 --index "$W/index" --max-turns 3 --max-new-tokens 96)

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
# Search tasks: the question names a made-up place; one text search finds its passage and
# the answer is copied out of it. A policy that cannot read images can learn them by acting.
mars data synth --tasks "$TASKS" --seed "$SEED" --kinds "$KINDS" --protocol mars \
    --test-fraction "$TEST_FRACTION" --val-fraction "$VAL_FRACTION" -o "$W/data" >/dev/null
mars index text "$W/data/corpus.jsonl" --out "$W/index" >/dev/null

evaluate() {  # policy label: EVAL_SAMPLES sampled episodes per held-out task (the policy RL samples from)
    mars rollout --policy "$1" "${ROLL[@]}" -n "$EVAL_SAMPLES" --temperature 1 --seed 7 \
        -o "$W/eval-$2.jsonl" "$W/data/test/tasks.jsonl"
    mars judge "$W/eval-$2.jsonl" -o "$W/judged-$2.jsonl"
    mars eval "$W/judged-$2.jsonl" --label "$2" -q >> "$W/metrics.jsonl"
}

log "2. cold-start SFT on the reference trajectories of the training tasks"
# Settings chosen on the validation split (README): a tiny random model needs many small
# steps at a high rate (a 7B model: lr 1e-5, batch 64); one epoch leaves it short of perfect.
mars sft "$W/data/train/reference.jsonl" --policy "$W/policy-0" --out "$W/policy-sft" --no-eval \
    --epochs "$EPOCHS" --lr "$SFT_LR" --batch-size 1 --warmup 0.05 --min-lr-ratio 0.1 --seed "$SEED" > "$W/sft-metrics.jsonl"
evaluate "$W/policy-sft" sft

log "3. reinforcement learning: $STEPS steps of BN-GSPO, $RL_TASKS tasks x $SAMPLES samples each"
# The training tasks in a shuffled order, repeated as often as the steps need.
python3 - "$W/data/train/tasks.jsonl" "$W/rl-tasks.jsonl" "$(( STEPS * RL_TASKS ))" "$SEED" <<'PY'
import random, sys
src, dst, need, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lines = [l for l in open(src) if l.strip()]
rng, out = random.Random(seed), []
while len(out) < need:
    rng.shuffle(lines)
    out += lines
open(dst, "w").writelines(out[:need])
PY
policy="$W/policy-sft"
for step in $(seq 1 "$STEPS"); do
    sed -n "$(( (step - 1) * RL_TASKS + 1 )),$(( step * RL_TASKS ))p" "$W/rl-tasks.jsonl" \
        | mars rollout --policy "$policy" "${ROLL[@]}" -n "$SAMPLES" --temperature 1 --seed "$(( SEED * 1000 + step ))" \
        | mars judge | mars advantage > "$W/batch-$step.jsonl"
    mars update "$W/batch-$step.jsonl" --policy "$policy" --out "$W/policy-rl-$step" \
        --state "$W/optimizer" --lr "$RL_LR" >> "$W/update-metrics.jsonl"
    [ "$policy" = "$W/policy-sft" ] || rm -rf "$policy"  # keep the last checkpoint only
    policy="$W/policy-rl-$step"
    if [ "$EVAL_EVERY" -gt 0 ] && [ "$(( step % EVAL_EVERY ))" -eq 0 ] && [ "$step" -lt "$STEPS" ]; then
        evaluate "$policy" "rl-$step"
    fi
done
evaluate "$policy" rl

log "4. pages: $W/episodes.html and the curves, $W/run.html"
mars show "$W/judged-rl.jsonl" -o "$W/episodes.html" >/dev/null
mars plot "$W/update-metrics.jsonl" "$W/sft-metrics.jsonl" "$W/metrics.jsonl" -o "$W/run.html" >/dev/null

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
