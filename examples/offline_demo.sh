#!/usr/bin/env bash
# The whole SenseNova-MARS recipe, offline, on the CPU, in a few minutes:
#   tiny policy + synthetic 4K benchmark + local search index
#   → evaluation of the random policy
#   → cold-start SFT on reference trajectories → evaluation
#   → a few RL steps, each literally `rollout | judge | advantage > batch; update` → evaluation
#   → an HTML page of the last rollout, and a table of the three stages.
#
#   bash examples/offline_demo.sh            # everything lands in ./demo (MARS_DEMO_DIR)
#
# Sizes are environment variables so a test can run the same script smaller:
#   DEMO_TASKS (200), DEMO_TEST_FRACTION (0.1), DEMO_SFT_EPOCHS (6), DEMO_RL_STEPS (6),
#   DEMO_RL_TASKS (8 per step), DEMO_SAMPLES (4)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/mars/torch_extensions}"

W="${MARS_DEMO_DIR:-demo}"
TASKS="${DEMO_TASKS:-200}"
TEST_FRACTION="${DEMO_TEST_FRACTION:-0.1}"
EPOCHS="${DEMO_SFT_EPOCHS:-6}"
STEPS="${DEMO_RL_STEPS:-6}"
RL_TASKS="${DEMO_RL_TASKS:-8}"
SAMPLES="${DEMO_SAMPLES:-4}"
# Short episodes: the CPU is slow. A turn of the reference agent is ~90 tokens.
ROLL=(--index "$W/index" --max-turns 5 --max-new-tokens 160 --max-total-tokens 4096)
# Start clean, but only ever delete a folder this script made.
if [ -e "$W" ] && [ -n "$(ls -A "$W" 2>/dev/null)" ] && [ ! -f "$W/.mars-demo" ]; then
    echo "offline_demo: $W exists and is not a demo folder; set MARS_DEMO_DIR" >&2
    exit 1
fi
rm -rf "$W" && mkdir -p "$W" && touch "$W/.mars-demo"
log() { printf '\n== %s\n' "$*" >&2; }

log "1. a tiny policy, the synthetic benchmark, the local index"
# Qwen's tokenizer cut to its first 8192 tokens: on a CPU the 151k-row output layer would
# cost more than the rest of the model, and a 4-layer model learns the protocol in minutes.
mars tiny-model "$W/policy-0" --seed 0 --vocab 8192 --layers 4 >/dev/null
# The reference agent zooms on the quarter or half of the image that holds the sign: a
# policy that cannot yet see learns four coordinates from {0, 500, 1000}.
mars data synth --tasks "$TASKS" --seed 0 --test-fraction "$TEST_FRACTION" --box-grid 500 --out "$W/data" >/dev/null
mars index text "$W/data/corpus.jsonl" --out "$W/index" >/dev/null

evaluate() {  # policy label: 2 sampled episodes per held-out task (the policy RL samples from)
    mars rollout --policy "$1" "${ROLL[@]}" -n 2 --temperature 1 --seed 7 -o "$W/eval-$2.jsonl" < "$W/data/test/tasks.jsonl"
    mars judge "$W/eval-$2.jsonl" | mars eval --label "$2" -q >> "$W/metrics.jsonl"
}

log "2. evaluate the random policy"
evaluate "$W/policy-0" random

log "3. cold-start SFT on the reference trajectories"
# A tiny random model needs many small steps at a high rate (a 7B model: lr 1e-5, batch 64).
mars sft "$W/data/train/reference.jsonl" --policy "$W/policy-0" --out "$W/policy-sft" --no-eval \
    --epochs "$EPOCHS" --lr 1e-2 --batch-size 1 --warmup 0.05 --min-lr-ratio 0.1 --seed 0 > "$W/sft-metrics.jsonl"
evaluate "$W/policy-sft" sft

log "4. reinforcement learning: $STEPS steps of BN-GSPO, $RL_TASKS tasks x $SAMPLES samples each"
policy="$W/policy-sft"
for step in $(seq 1 "$STEPS"); do
    sed -n "$(( (step - 1) * RL_TASKS + 1 )),$(( step * RL_TASKS ))p" "$W/data/train/tasks.jsonl" \
        | mars rollout --policy "$policy" "${ROLL[@]}" -n "$SAMPLES" --seed "$step" \
        | mars judge | mars advantage > "$W/batch-$step.jsonl"
    mars update "$W/batch-$step.jsonl" --policy "$policy" --out "$W/policy-rl-$step" \
        --state "$W/optimizer" --lr 1e-3 >> "$W/update-metrics.jsonl"
    policy="$W/policy-rl-$step"
done
evaluate "$policy" rl

log "5. a page of the last RL rollout: $W/episodes.html"
mars judge "$W/eval-rl.jsonl" | mars show -o "$W/episodes.html" >/dev/null
log "   and the curves (update and sft steps, eval per stage): $W/run.html"
mars plot "$W/update-metrics.jsonl" "$W/sft-metrics.jsonl" "$W/metrics.jsonl" -o "$W/run.html" >/dev/null

log "results on the held-out tasks (2 samples each, temperature 1)"
python3 - "$W/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'stage':<8} {'episodes':>8} {'format':>7} {'accuracy':>9} {'tools/ep':>9} {'reward':>7}")
for r in rows:
    if r.get("subset") not in (None, "all"):
        continue
    print(f"{r['label']:<8} {r['episodes']:>8} {r['format']:>7.2f} {r['pass@1']:>9.2f} {r['tool_calls']:>9.2f} {r['reward']:>7.2f}")
PY
