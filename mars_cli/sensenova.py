"""The released SenseNova-MARS protocol, as data: prompts, tool schemas, result strings.

These strings are what the released checkpoints were trained and evaluated on, so they
are reproduced byte for byte from the official code (OpenSenseNova/SenseNova-MARS):

- the system prompt every dataset of the official manifests (test_all.json,
  train_qwen3_vl_8b.json) carries in `input_template.arguments.system_prompt`;
- the tools block that `inference/eval.py` builds by hand (`load_tool_config`): each
  `tool_schema` of the tool YAML as `json.dumps(schema, ensure_ascii=False)`, one per
  line, inside Qwen's "# Tools" text. The schemas are those of the official tool YAML
  (config/tool_config/tools_{train,val}.yaml; their `tool_schema` parts are identical);
- the tool results of the official tools (verl/tools/*.py and eval.py) and the agent
  loop's cut of long tool text (max_tool_response_length 8192, truncate side "right",
  which keeps the END of the text behind a "(truncated)..." marker).

eval.py sends system = dataset system prompt + "\\n\\n" + tools block, then a user turn
holding the image and the question (the manifest row's user text with "<image>" removed,
stripped); the chat template renders them as plain ChatML. `mars prompt` prints that text.
"""

from __future__ import annotations

import json

SYSTEM_PROMPT = (
    "#Role\nYou are a step-by-step reasoning assistant. \nGiven a question, your task is to solve the "
    "problem **one substep at a time**.  \n\n## Guiding Principles  \nAt each turn, you must **either**:  \n"
    "1. Issue **one specific tool** enclosed in <tool_call> </tool_call> tags,  \n"
    "2. Or provide the **final answer** enclosed in <answer> </answer> tags.  \n\n"
    "All outputs **must begin with a thought** enclosed in <thinking> </thinking> tags, explaining your "
    "current reasoning and what to do next.  \n\n## Output Format (strict):  \n"
    "Always start with <thinking>. Do not output the previous reasoning chain. Then, depending on the case, "
    "output one of the following:\n\n1. If reasoning continues:  \n"
    "<thinking> Your current reasoning and next plan </thinking>  \n"
    "<tool_call> One precise, tool call to assist your reasoning </tool_call>\n\n"
    "2. If ready to conclude:  \n<thinking> Summarize all reasoning and derive the answer </thinking>  \n"
    "<answer> Final answer </answer>"
)

# Key order as YAML loads them (json.dumps keeps insertion order).
TOOL_SCHEMAS: list[dict] = [
    {"type": "function", "function": {
        "name": "image_zoom_in_tool",
        "description": "Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) "
                       "and an optional object label",
        "parameters": {"type": "object", "properties": {
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                        "description": "The bounding box of the region to zoom in, as [x1, y1, x2, y2], where "
                                       "(x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner"},
            "label": {"type": "string", "description": "The name or label of the object in the specified bounding box"},
            "img_idx": {"type": "number", "description": "The index of the zoomed-in image (starting from 0)"}},
            "required": ["bbox_2d", "label", "img_idx"]}}},
    {"type": "function", "function": {
        "name": "text_search_tool",
        "description": "Search the web for text information related to your query. Use this when you need to find "
                       "facts, news, or information.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "The search query to find relevant information"}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "image_search_tool",
        "description": "Perform a reverse image search to find similar images and related information. This can "
                       "help identify objects, places, or find more context about the image.",
        "parameters": {"type": "object", "properties": {}, "required": []}}},
]

TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
              "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def tools_block(schemas: list[dict] | None = None) -> str:
    """The "# Tools" section, rendered as eval.py renders it."""
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in (schemas or TOOL_SCHEMAS))
    return TOOLS_HEAD + lines + TOOLS_TAIL


def system_text(dataset_prompt: str | None) -> str:
    """The official system message: the dataset's system prompt, a blank line, the tools."""
    return (dataset_prompt if dataset_prompt else SYSTEM_PROMPT) + "\n\n" + tools_block()


def manifest_question(user_text: str) -> str:
    """The question eval.py reads from a manifest row's user message."""
    return user_text.replace("<image>", "").strip()


# --- tool results ---------------------------------------------------------------------

ZOOM_TEXT = "Here is the zoomed image:"
IMAGE_SEARCH_HEAD = "Reverse Image Search Results:"
IMAGE_SEARCH_EMPTY = "No matching images were found."
IMAGE_SEARCH_MAX = 5  # eval.py keeps the first five stored results


def image_search_entry(n: int, title: str) -> str:
    """The text before the n-th thumbnail (n from 1)."""
    return f"\n\nTitle {n}: {title}\nThumbnail {n}: "


def text_search_result(query: str, summary: str) -> str:
    return f"Final summary generated for query: {query}\n{summary}"


def text_search_empty(query: str) -> str:
    return f"No search results found for query: {query}"


def text_search_failed(query: str) -> str:
    return f"Error: Failed to generate final summary for query: {query}"


# The agent loop's cut: texts longer than this many characters keep their last part.
TOOL_TEXT_LIMIT = 8192
TRUNCATED_MARK = "(truncated)..."


def cut_tool_text(text: str, limit: int = TOOL_TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return TRUNCATED_MARK + text[-limit:]


UNKNOWN_TOOL = "Error: Unknown tool '{}'"
SEARCH_UNAVAILABLE = "Error: Search not available."


def unknown_tool(name: object) -> str:
    return UNKNOWN_TOOL.format(name)


def zoom_error(raw_args: dict, n_images: int) -> str | None:
    """The official zoom tool's message for bad arguments, or None when they are fine."""
    bbox = raw_args.get("bbox") or raw_args.get("bbox_2d")
    if not bbox or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "Error: bbox parameter is missing or not a list of 4 numbers."
    idx = raw_args.get("img_idx") if raw_args.get("img_idx") is not None else 0
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n_images:
        return f"Error: Image at index {idx} not found. Available images: {n_images}"
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return f"Error: Bbox coordinates must be numeric: {bbox}"
    if not all(0 <= v <= 1000 for v in (x1, y1, x2, y2)):
        return f"Error: In relative mode, coordinates must be in [0, 1000.0]. Got: {bbox}"
    if not (x1 < x2 and y1 < y2):
        return f"Error: Invalid bbox coordinates: x1 must be < x2, y1 must be < y2. Got: {bbox}"
    return None


# --- images ---------------------------------------------------------------------------

MIN_PIXELS = 65536  # 256 × 256
MAX_PIXELS = 8294400  # 3840 × 2160
CROP_MIN_SIDE = 28  # a crop narrower than this is first stretched to it (LANCZOS)


def smart_resize(height: int, width: int, *, factor: int = 32, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as the official code sizes an image (eval.py's smart_resize).

    It differs from qwen-vl-utils' only in truncating to an integer before rounding up when
    an image grows, which changes a side by one factor in rare cases; kept for exactness.
    """
    import math

    from mars_cli.errors import MarsError

    if height <= 0 or width <= 0 or max(height, width) / min(height, width) > 200:
        raise MarsError(f"cannot resize a {width}x{height} image (empty, or aspect ratio over 200)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(int(height / beta) / factor) * factor
        w = math.floor(int(width / beta) / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(int(height * beta) / factor) * factor
        w = math.ceil(int(width * beta) / factor) * factor
    return h, w


# --- sampling and the judge -------------------------------------------------------------

# eval.py's defaults and the RL recipe's val_kwargs (seed 3407 there too).
EVAL_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
