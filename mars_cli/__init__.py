"""mars: multimodal search agents as small Unix commands over JSONL."""

__version__ = "0.1.0"
