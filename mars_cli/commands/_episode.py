"""Options `mars rollout` and `mars ask` share: the prompt, the turn budgets and the tools.

One declaration each, so a policy asked a question sees the prompt and the search it was
trained with (`ask --system-prompt` is `rollout --system-prompt`, and both read
MARS_SYSTEM_PROMPT). Light to import: typer only.

Defaults suit GPUs and the released checkpoints (2,048 new tokens a turn, 10 turns); on a
CPU each generated token costs milliseconds per episode, so small models want far less
(the offline demo runs 48 tokens and 3 turns).
"""

from __future__ import annotations

import typer

E = "MARS_"

SYSTEM_PROMPT = typer.Option(None, "--system-prompt", envvar=E + "SYSTEM_PROMPT", help="Replace the system prompt text (mars: {tools} places the tool schemas; sensenova: the part before the tools block).")
SEARCH_K = typer.Option(5, "--search-k", envvar=E + "SEARCH_K", min=1, help="Results per text search.")
PROTOCOL = typer.Option(None, "--protocol", envvar=E + "PROTOCOL", help="Protocol profile: sensenova (the training loop) | sensenova-eval (the official eval.py) | mars. [default: sensenova]")
ON_MALFORMED = typer.Option(None, "--on-malformed", help="end | observe (default: the profile's).")
WORKFLOW = typer.Option("agent", "--workflow", help="agent | direct (no tools) | rag (search results, then answer).")
MAX_TURNS = typer.Option(10, "--max-turns", min=1, help="Turns per episode (the paper's 10; sensenova-eval: 50; a small model on a CPU wants 2-3).")
MAX_NEW_TOKENS = typer.Option(2048, "--max-new-tokens", min=1, help="Tokens per turn (GPU-sized; sensenova-eval: 4096; on a CPU a small model wants 32-128).")
MAX_PROMPT_TOKENS = typer.Option(16384, "--max-prompt-tokens", help="Budget of the first prompt (images counted expanded) [sensenova-eval: none].")
MAX_RESPONSE_TOKENS = typer.Option(16384, "--max-response-tokens", help="Budget of everything after it: turns and tool results [sensenova-eval: none].")
MAX_TOTAL_TOKENS = typer.Option(None, "--max-total-tokens", help="Optional cap on prompt + response (off by default).")
MIN_PIXELS = typer.Option(None, "--min-pixels", help="Image resize floor in pixels (default: the checkpoint's; sensenova-eval: 65536).")
MAX_PIXELS = typer.Option(None, "--max-pixels", help="Image resize ceiling in pixels (default: the checkpoint's; sensenova-eval: 8294400).")
SEARCH_BACKEND = typer.Option(None, "--search-backend", help="local | serper | searxng | retriever [default: MARS_SEARCH_BACKEND or local].")
INDEX = typer.Option(None, "--index", help="Local text index directory (MARS_INDEX); without one, text search is off.")
IMAGE_SEARCH_BACKEND = typer.Option(None, "--image-search-backend", help="local | precomputed | serper [default: MARS_IMAGE_SEARCH_BACKEND or local].")
IMAGE_INDEX = typer.Option(None, "--image-index", help="Local image index directory (MARS_IMAGE_INDEX).")
CACHE = typer.Option(None, "--cache", help="Tool record/replay cache directory.")
