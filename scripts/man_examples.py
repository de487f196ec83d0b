"""The EXAMPLES section of every man page: (what it does, the command line, runs offline).

Examples marked to run are executed by tests/test_man.py in a scratch folder holding the
files they name (photo.jpg, photos/, corpus.jsonl, fvqa.parquet, synth/ from
`mars data synth`, tiny/ from `mars tiny-model`), so the manual cannot drift from the
commands. The others need a GPU, a checkpoint, a network service or a published benchmark.
"""

from __future__ import annotations

from typing import NamedTuple


class Example(NamedTuple):
    what: str
    cmd: str
    runs: bool = True


E = Example

EXAMPLES: dict[str, list[Example]] = {
    "": [
        E("One RL step: sample, judge, compute advantages, update the policy.",
          "mars rollout --policy ckpt/ < tasks.jsonl | mars judge | mars advantage > batch.jsonl\n"
          "mars update batch.jsonl --policy ckpt/ --out ckpt-next/", False),
        E("Crop the top-left quarter of a photo.", "mars crop photo.jpg 0 0 0.5 0.5 -o corner.jpg"),
        E("Look at the first trajectory of a batch.", "head -1 synth/reference.jsonl | jq .messages", False),
        E("Versions and settings for a bug report.", "mars env"),
        E("Shell completion, installed for the current user and shell.", "mars --install-completion", False),
    ],
    "crop": [
        E("Cut a box out of a photo; prints the crop's record.", "mars crop photo.jpg 0.1 0.2 0.3 0.4 -o crop.jpg"),
        E("Write a PNG under its content hash into a folder.",
          "mars crop photo.jpg 0.5 0.5 1 1 --artifacts artifacts --format png"),
        E("A box that spills over the edges (negative numbers after --); the warning shows the clamped box.",
          "mars crop --clamp -o edge.jpg photo.jpg -- -0.05 0.9 0.3 1.1"),
        E("Resize the crop the way Qwen-VL sees it.", "mars crop photo.jpg 0 0 1 1 --max-pixels 1003520 -o model.jpg"),
        E("A box a model wrote, in 0-1000 units.", "mars crop photo.jpg 100 200 500 600 --units 1000 -o box.jpg"),
        E("Many crops in one process: one JSONL record per box on stdin, each image decoded once.",
          "printf '%s\\n' '{\"image\": \"photo.jpg\", \"box\": [0, 0, 0.5, 0.5]}' "
          "'{\"image\": \"photo.jpg\", \"bbox_2d\": [500, 500, 1000, 1000]}' | mars crop --artifacts crops"),
    ],
    "search": [
        E("Index a corpus, then search it.", "mars index text corpus.jsonl -o wiki-idx\n"
          "mars search --index wiki-idx -k 3 \"eiffel tower height\""),
        E("Queries one per line on stdin; one record per query with its results.",
          "printf 'eiffel tower height\\nnile length\\n' | mars search --index wiki-idx --group"),
        E("A Search-R1 retrieval server.",
          "mars search -b retriever --retriever-url http://127.0.0.1:8000/retrieve \"who wrote hamlet\"", False),
        E("Serve an index to Search-R1, verl or `-b retriever` clients; one JSON line with its URL once listening.",
          "mars search --serve --index wiki-idx --port 8001", False),
    ],
    "image-search": [
        E("Index a folder of images, then find the ones like a photo.",
          "mars index images photos/ -o photo-idx\nmars image-search --image-index photo-idx photo.jpg"),
        E("SenseNova-MARS tasks carry their image-search results: answer from them.",
          "head -1 sensenova/tasks.jsonl | mars image-search -b precomputed", False),
    ],
    "index": [
        E("A text index for mars search.", "mars index text corpus.jsonl -o wiki-idx"),
        E("An image index for mars image-search.", "mars index images photos/ -o photo-idx"),
    ],
    "index text": [
        E("BM25 over a FlashRAG-style corpus ({id, contents} per line).", "mars index text corpus.jsonl -o wiki-idx"),
        E("Also a dense index with a local embedding model.",
          "mars index text wiki-18.jsonl -o wiki-idx --dense-model models/e5-base-v2", False),
    ],
    "index images": [
        E("Index a folder (titles from titles.tsv in it, when present).", "mars index images photos/ -o photo-idx --thumb-size 128"),
    ],
    "data": [
        E("The offline synthetic benchmark.", "mars data synth --tasks 4 -o synth"),
        E("A published benchmark; the format is told from its columns.", "mars data convert fvqa.parquet -o fvqa"),
    ],
    "data convert": [
        E("Convert a benchmark file; image paths in the tasks are absolute, so they run from anywhere.",
          "mars data convert fvqa.parquet -o fvqa"),
        E("Name the format, and convert only the first tasks.", "mars data convert fvqa.parquet -f fvqa --limit 1 -o fvqa-1"),
        E("V* Bench from its folder of per-image JSON files.", "mars data convert --format vstar vstar_bench/ -o vstar", False),
    ],
    "data fetch": [
        E("Download two benchmarks into the Hugging Face cache, then convert one by its Hub name.",
          "mars data fetch vstar hr-bench\nmars data convert craigwu/vstar_bench -f vstar -o vstar/", False),
    ],
    "data synth": [
        E("Four tasks, their corpus and reference trajectories.", "mars data synth --tasks 4 --seed 0 -o synth"),
        E("Search tasks only, written in the mars protocol, with validation and test splits.",
          "mars data synth --tasks 40 --kinds search --protocol mars --val-fraction 0.1 --test-fraction 0.2 -o synth40"),
        E("The offline demo's kind: word names, one indexed search result per reference, and a teacher "
          "that searches vaguely in half of them.",
          "mars data synth --tasks 60 --kinds search --names words --attributes city,founder --search-k 1 "
          "--vague-fraction 0.5 --protocol mars -o words60"),
    ],
    "tiny-model": [
        E("A tiny Qwen2.5-VL for tests and demos.", "mars tiny-model tiny/"),
        E("A tiny Qwen3-VL with a 4096-token vocabulary (trains much faster on a CPU).",
          "mars tiny-model -o tiny3 --arch qwen3-vl --vocab 4096", False),
        E("A wider, deeper tiny policy.", "mars tiny-model -o tiny96 --vocab 8192 --layers 4 --width 96", False),
    ],
    "rollout": [
        E("Eight samples per task with the local search tools.",
          "mars rollout --policy ckpt/ -n 8 --index synth/index < synth/tasks.jsonl > traj.jsonl", False),
        E("Evaluate an API model; a file output can be resumed after Ctrl-C.",
          "mars rollout --engine openai --model gpt-4o -o runs/gpt4o.jsonl tasks.jsonl", False),
        E("Check that stored tokens re-tokenize exactly.", "mars rollout --check --policy ckpt/ traj.jsonl", False),
        E("A released checkpoint as the official inference/eval.py runs it (served by vLLM).",
          "mars rollout --engine openai --base-url http://127.0.0.1:8000/v1 --model SenseNova-MARS-8B "
          "--protocol sensenova-eval --sampling official --seed 3407 -o runs/eval.jsonl tasks.jsonl", False),
    ],
    "ask": [
        E("One question, the trace on stderr, the answer on stdout.",
          "mars ask photo.jpg \"What is written on the small sign?\" --policy ckpt/", False),
        E("An image from the web (public addresses only).",
          "mars ask https://example.com/street.jpg \"Which shop is this?\" --policy ckpt/", False),
    ],
    "judge": [
        E("Rule-judge trajectories (offline, llm-scored records get the official exact match).",
          "mars judge synth/reference.jsonl -o judged.jsonl"),
        E("An LLM judge at an OpenAI-compatible endpoint.",
          "mars judge traj.jsonl --judge-base-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-72b -o judged.jsonl", False),
    ],
    "advantage": [
        E("BN-GSPO advantages for a judged batch.", "mars judge synth/reference.jsonl | mars advantage > batch.jsonl"),
        E("Plain GRPO, dropping groups whose rewards are all equal.",
          "mars judge synth/reference.jsonl | mars advantage --algo grpo --drop-constant-groups > grpo.jsonl"),
    ],
    "update": [
        E("One GSPO step.", "mars update batch.jsonl --policy ckpt/ --out ckpt-next/", False),
        E("ZeRO-3 over 8 GPUs with a reference model for the KL term.",
          "mars update batch.jsonl --policy ckpt/ --ref base/ --out ckpt-next/ --zero 3 --nproc 8", False),
    ],
    "sft": [
        E("Cold-start SFT on reference trajectories.", "mars sft synth/reference.jsonl --policy tiny/ --out tiny-sft/ --epochs 2", False),
    ],
    "eval": [
        E("Pass@1 and tool use of judged trajectories.", "mars judge synth/reference.jsonl | mars eval"),
        E("Per category, tagged, into a metrics file.",
          "mars judge synth/reference.jsonl | mars eval --by type --label reference -o metrics.jsonl"),
        E("A released checkpoint scored as the paper scored it: the official eval.py's rollout and scoring rules.",
          "mars rollout --engine openai --base-url http://127.0.0.1:8000/v1 --model SenseNova-MARS-8B "
          "--protocol sensenova-eval --sampling official --seed 3407 -o runs/eval.jsonl tasks.jsonl\n"
          "mars judge runs/eval.jsonl --judge-base-url http://127.0.0.1:8001/v1 --judge-model gpt-4o-2024-11-20 "
          "| mars eval --by difficulty", False),
    ],
    "show": [
        E("A page of episodes to open in a browser.", "mars show synth/reference.jsonl -o page.html"),
        E("One portable file with the images inlined.", "mars show synth/reference.jsonl --embed -o page-embed.html"),
    ],
    "env": [
        E("Paste this into a bug report.", "mars env"),
        E("The same as one JSON record.", "mars env --json"),
    ],
    "prompt": [
        E("The first prompt of each task, as the released checkpoints see it.",
          "mars prompt synth/tasks.jsonl | jq -r .prompt", False),
        E("What the official eval.py shows: the first image only, its dataset prompt required.",
          "mars prompt --protocol sensenova-eval synth/tasks.jsonl | jq -r .prompt", False),
        E("The mars profile, rendered with a checkpoint's tokenizer and pixel limits.",
          "mars prompt --policy tiny/ --protocol mars synth/tasks.jsonl"),
    ],
    "serve": [
        E("Keep a policy resident on the CPU; prints its URL when ready.", "mars serve --policy tiny/ --engine hf --port 8000", False),
        E("Rollout against it, then train one step and load the new weights into it.",
          "mars rollout --server http://127.0.0.1:8000 -n 4 < synth/tasks.jsonl | mars judge | mars advantage > batch.jsonl\n"
          "mars update batch.jsonl --policy tiny/ --out tiny-2/ --push http://127.0.0.1:8000", False),
        E("vLLM on 8 GPUs: tensor parallel 2, data parallel 4, official pixel limits.",
          "mars serve --policy ckpt/ --engine vllm --tp 2 --dp 4 --min-pixels 65536 --max-pixels 8294400", False),
    ],
    "plot": [
        E("Training curves of a run: the metrics records update prints, evaluations interleaved.",
          "mars plot rl-metrics.jsonl -o run.html", False),
        E("Two runs overlaid, as a PNG.", "mars plot baseline.jsonl tuned.jsonl -o compare.png", False),
    ],
}
