#!/usr/bin/env bash
# Evaluate an OpenAI-compatible model (GPT-4o, or any model behind `vllm serve`) as a
# multimodal search agent on a converted benchmark:
#   mars data convert → mars rollout --engine openai → mars judge → mars eval → mars show
#
#   DATA=HR-MMSearch/test.parquet FORMAT=hr-mmsearch bash examples/eval_openai.sh
#   MODEL=Qwen/Qwen2.5-VL-72B-Instruct BASE_URL=http://127.0.0.1:8000/v1 DATA=hr_bench_8k.tsv \
#       FORMAT=hr-bench bash examples/eval_openai.sh
#
# stdout: the metrics records (one per benchmark and per BY subset), also kept in
# $WORK/metrics.jsonl; logs on stderr; episodes in $WORK/episodes.html.
#
# Formats (FORMAT): hr-mmsearch, mmsearch, fvqa, sensenova-mars (open questions, LLM judge);
# vstar, hr-bench, mme-realworld (multiple choice, scored by option letter).
#
# Keys come from the environment only, never from flags: OPENAI_API_KEY (or
# MARS_OPENAI_API_KEY) for the model, MARS_JUDGE_API_KEY (or OPENAI_API_KEY) for the judge,
# SERPER_API_KEY for SEARCH_BACKEND=serper. A local server needs no key.
#
# Settings (environment variables, with their defaults):
#   MODEL (gpt-4o)  BASE_URL (https://api.openai.com/v1)  DATA (required: files or folders)
#   FORMAT (hr-mmsearch)  WORK (runs/eval-$MODEL)  N (1 sample per task)  LIMIT (all tasks)
#   MAX_TURNS (10)  MAX_NEW_TOKENS (2048)  TEMPERATURE (0)  BY (category)
#   JUDGE_BASE_URL, JUDGE_MODEL (unset: the offline rule judge; e.g. gpt-4o-mini)
#   SEARCH_BACKEND (local without INDEX: text search off; serper | searxng | retriever)
#   INDEX (a local text index from `mars index text`)  IMAGE_SEARCH_BACKEND, IMAGE_INDEX
#   CACHE (a tool cache directory: re-runs reuse search results)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/mars" ] && export PATH="$here/.venv/bin:$PATH"

MODEL="${MODEL:-gpt-4o}"
BASE_URL="${BASE_URL:-https://api.openai.com/v1}"
FORMAT="${FORMAT:-hr-mmsearch}"
WORK="${WORK:-runs/eval-${MODEL//\//_}}"
N="${N:-1}"
MAX_TURNS="${MAX_TURNS:-10}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"
TEMPERATURE="${TEMPERATURE:-0}"
BY="${BY:-category}"
if [ -z "${DATA:-}" ]; then
    echo "eval_openai.sh: set DATA to the benchmark files (and FORMAT to their format)" >&2
    exit 2
fi
read -r -a data <<< "$DATA"  # several files or folders, separated by spaces
log() { printf '== %s\n' "$*" >&2; }
mkdir -p "$WORK"

log "convert $FORMAT: ${data[*]} → $WORK/tasks"
mars data convert --format "$FORMAT" --out "$WORK/tasks" ${LIMIT:+--limit "$LIMIT"} "${data[@]}" >/dev/null

tools=()
[ -n "${SEARCH_BACKEND:-}" ] && tools+=(--search-backend "$SEARCH_BACKEND")
[ -n "${INDEX:-}" ] && tools+=(--index "$INDEX")
[ -n "${IMAGE_SEARCH_BACKEND:-}" ] && tools+=(--image-search-backend "$IMAGE_SEARCH_BACKEND")
[ -n "${IMAGE_INDEX:-}" ] && tools+=(--image-index "$IMAGE_INDEX")
[ -n "${CACHE:-}" ] && tools+=(--cache "$CACHE")

log "rollout: $MODEL at $BASE_URL, $N sample(s) per task"
# --resume: an interrupted run (Ctrl-C, a dead endpoint) continues where it stopped.
mars rollout --engine openai --base-url "$BASE_URL" --model "$MODEL" -n "$N" \
    --max-turns "$MAX_TURNS" --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" \
    "${tools[@]}" --resume -o "$WORK/trajectories.jsonl" "$WORK/tasks/tasks.jsonl"

judge=()
if [ -n "${JUDGE_BASE_URL:-}" ]; then
    judge=(--judge-base-url "$JUDGE_BASE_URL" --judge-model "${JUDGE_MODEL:-gpt-4o-mini}" --cache "$WORK/judge-cache")
    log "judge: ${JUDGE_MODEL:-gpt-4o-mini} at $JUDGE_BASE_URL"
else
    log "judge: the rule judge (set JUDGE_BASE_URL and JUDGE_MODEL for an LLM judge)"
fi
mars judge "${judge[@]}" -o "$WORK/judged.jsonl" "$WORK/trajectories.jsonl"

log "metrics by $BY → $WORK/metrics.jsonl"
mars eval --by "$BY" --label "$MODEL" -o "$WORK/metrics.jsonl" "$WORK/judged.jsonl"
cat "$WORK/metrics.jsonl"

mars show --title "$MODEL on $FORMAT" -o "$WORK/episodes.html" "$WORK/judged.jsonl" >/dev/null
log "episodes: $WORK/episodes.html"
