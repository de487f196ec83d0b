#!/usr/bin/env bash
# Evaluate a released SenseNova-MARS checkpoint, unchanged, on a converted benchmark:
#   mars data convert → mars rollout (vLLM, or hf) → mars judge → mars eval --by difficulty → mars show
#
#   MODEL=models/SenseNova-MARS-8B DATA=data/hr_mmsearch.jsonl bash examples/eval_released_checkpoint.sh
#   REPLAY=1 MODEL=… DATA=… bash examples/eval_released_checkpoint.sh   # re-run from the tool cache only
#   DRY_RUN=1 bash examples/eval_released_checkpoint.sh                  # print the commands, run nothing
#
# The released checkpoints are scored as the paper scored them: with the protocol profile
# `sensenova-eval` (PROTOCOL), the official evaluation script inference/eval.py point for
# point. The official prompt byte for byte (each dataset's "#Role …" system prompt kept by
# `mars data convert` from the manifest, then the official tools block; check it with
# `mars prompt --protocol sensenova-eval`; a task without one is an error, as in eval.py:
# give SYSTEM_PROMPT for data converted without its manifest), the first image only, resized
# to 65,536–8,294,400 pixels, zooms cut from the full-resolution original, eval.py's error
# texts and reading of replies (a call wins over an answer, an untagged reply is the answer),
# 50 turns of 4,096 tokens without budgets. PROTOCOL=sensenova runs the training loop's rules
# instead. Sampling is the
# official evaluation's (SAMPLING=official: T 0.7, top-p 0.8, top-k 20, presence penalty 1.5,
# seed 3407; SAMPLING=greedy for argmax), and `mars judge` scores the records by eval.py's
# rules (its A–D multiple-choice cascade, its exact match) and the official rubric (a lenient
# 13-rule Yes/No judge that sees the image, max_tokens 8192; with JUDGE_BASE_URL set; a judge
# call that fails stops the run, as in eval.py). To
# evaluate a whole official manifest, pass it as DATA (test_all.json): each dataset then
# keeps its scorer (em_score_mcq → the mcq rule, llm_score → the LLM judge).
# Image search uses the results stored with the benchmark (`precomputed`: the SenseNova-MARS
# files carry image_search_title_list / image_search_thumbnail_list per task), so it is
# reproducible.
# Text search results are recorded in CACHE on the first run; REPLAY=1 answers every tool
# call from that cache (no network; a call not in the cache fails as a tool error).
#
# stdout: the metrics records (per benchmark and per BY subset); logs on stderr.
#
# Settings (environment variables, with their defaults):
#   MODEL (models/SenseNova-MARS-8B: the checkpoint directory)  DATA (required unless DRY_RUN)
#   FORMAT (sensenova-mars; or hr-mmsearch, mmsearch, fvqa, vstar, hr-bench, mme-realworld)
#   ENGINE (vllm; hf runs on DEVICE, default cuda; openai: the checkpoint already behind
#     `vllm serve MODEL` at BASE_URL, MODEL then being the served name)  TP (1)  DTYPE
#   WORK (runs/released-<model name>)  CACHE ($WORK/tool-cache)  REPLAY (0)  BY (difficulty)
#   N (1)  SAMPLING (official)  PROTOCOL (sensenova-eval)  SYSTEM_PROMPT (unset: each task's dataset prompt)
#   MAX_TURNS (50)  MAX_NEW_TOKENS (4096)  LIMIT
#   MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS, MAX_TOTAL_TOKENS (unset: no budget, as eval.py)
#   MIN_PIXELS, MAX_PIXELS (65536, 8294400: the official image limits)
#   SEARCH_BACKEND (serper, needs SERPER_API_KEY; local with INDEX)  INDEX  IMAGE_SEARCH_BACKEND (precomputed)
#   SUMMARY_URL, SUMMARY_MODEL (summarize search pages with an LLM behind an OpenAI-compatible server)
#   JUDGE_BASE_URL, JUDGE_MODEL (unset: the official exact match alone; eval.py needs a judge)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/mars" ] && export PATH="$here/.venv/bin:$PATH"

DRY_RUN="${DRY_RUN:-0}"
MODEL="${MODEL:-models/SenseNova-MARS-8B}"
FORMAT="${FORMAT:-sensenova-mars}"
ENGINE="${ENGINE:-vllm}"
WORK="${WORK:-runs/released-$(basename "$MODEL")}"
CACHE="${CACHE:-$WORK/tool-cache}"
REPLAY="${REPLAY:-0}"
BY="${BY:-difficulty}"
DATA="${DATA:-data/hr_mmsearch.jsonl}"
[ -n "${INDEX:-}" ] && SEARCH_BACKEND="${SEARCH_BACKEND:-local}"

run() {  # run a command; with DRY_RUN=1 print it instead (one shell-quoted line)
    if [ "$DRY_RUN" = 1 ]; then
        local line
        printf -v line ' %q' "$@"
        echo "${line# }"
    else
        "$@"
    fi
}
quiet() {  # run a command whose summary record is not wanted on stdout (only metrics are)
    if [ "$DRY_RUN" = 1 ]; then run "$@"; else "$@" >/dev/null; fi
}
log() { printf '== %s\n' "$*" >&2; }
read -r -a data <<< "$DATA"
if [ "$DRY_RUN" != 1 ]; then
    for f in "${data[@]}"; do
        [ -e "$f" ] || { echo "eval_released_checkpoint.sh: no such benchmark file: $f (set DATA)" >&2; exit 2; }
    done
    [ "$ENGINE" = openai ] || [ -e "$MODEL" ] || { echo "eval_released_checkpoint.sh: no checkpoint at $MODEL (set MODEL)" >&2; exit 2; }
fi

engine=(--engine "$ENGINE")
case "$ENGINE" in
    vllm) engine+=(--tp "${TP:-1}") ;;
    hf) engine+=(--device "${DEVICE:-cuda}") ;;
    openai) engine+=(--base-url "${BASE_URL:?set BASE_URL to the server, e.g. http://127.0.0.1:8000/v1}") ;;
esac
[ "$ENGINE" != openai ] && [ -n "${DTYPE:-}" ] && engine+=(--dtype "$DTYPE")
tools=(--search-backend "${SEARCH_BACKEND:-serper}" --image-search-backend "${IMAGE_SEARCH_BACKEND:-precomputed}" --cache "$CACHE")
[ -n "${INDEX:-}" ] && tools+=(--index "$INDEX")
[ -n "${SUMMARY_URL:-}" ] && tools+=(--summarize --llm-base-url "$SUMMARY_URL" --llm-model "${SUMMARY_MODEL:?set SUMMARY_MODEL}")
tag=live
if [ "$REPLAY" = 1 ]; then tools+=(--replay); tag=replay; fi
judge=()
[ -n "${JUDGE_BASE_URL:-}" ] && judge=(--judge-base-url "$JUDGE_BASE_URL" --judge-model "${JUDGE_MODEL:?set JUDGE_MODEL}")

log "convert $FORMAT: ${data[*]} → $WORK/tasks"
[ -e "$WORK/tasks/tasks.jsonl" ] || quiet mars data convert --format "$FORMAT" --out "$WORK/tasks" ${LIMIT:+--limit "$LIMIT"} "${data[@]}"

log "rollout ($tag tools): $MODEL on $ENGINE"
run mkdir -p "$WORK"  # outputs are checked before any model loads: their folder must exist
# --resume: an interrupted run continues with the episodes it had not finished.
run mars rollout --policy "$MODEL" "${engine[@]}" "${tools[@]}" -n "${N:-1}" --sampling "${SAMPLING:-official}" \
    --protocol "${PROTOCOL:-sensenova-eval}" ${SYSTEM_PROMPT:+--system-prompt "$SYSTEM_PROMPT"} \
    --max-turns "${MAX_TURNS:-50}" --max-new-tokens "${MAX_NEW_TOKENS:-4096}" \
    ${MAX_PROMPT_TOKENS:+--max-prompt-tokens "$MAX_PROMPT_TOKENS"} \
    ${MAX_RESPONSE_TOKENS:+--max-response-tokens "$MAX_RESPONSE_TOKENS"} \
    ${MAX_TOTAL_TOKENS:+--max-total-tokens "$MAX_TOTAL_TOKENS"} \
    --min-pixels "${MIN_PIXELS:-65536}" --max-pixels "${MAX_PIXELS:-8294400}" \
    --seed 3407 --resume -o "$WORK/$tag.jsonl" "$WORK/tasks/tasks.jsonl"
run mars judge "${judge[@]}" -o "$WORK/$tag.judged.jsonl" "$WORK/$tag.jsonl"
run mars eval --by "$BY" --label "$(basename "$MODEL")-$tag" -o "$WORK/$tag.metrics.jsonl" "$WORK/$tag.judged.jsonl"
run cat "$WORK/$tag.metrics.jsonl"
quiet mars show --title "$(basename "$MODEL")" -o "$WORK/$tag.html" "$WORK/$tag.judged.jsonl"
log "episodes: $WORK/$tag.html"
