"""Test plumbing for split mode (issue 20): a baked model cache Tabby-shaped enough for `shared/serving/inference.py`,
and `llama-server` / `tabby` wrappers that run the stand-ins with the test's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.harness import tabby_wrapper

LLAMA = Path(__file__).resolve().parent / "standin_llama_server.py"
# StarCoder's FIM template as in its tabby.json (TabbyML registry); Qwen2's chat template is a stand-in string.
PROMPT_TEMPLATE = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
MODELS = {
    "TabbyML/StarCoder-1B": {"prompt_template": PROMPT_TEMPLATE},
    "TabbyML/Qwen2-1.5B-Instruct": {"chat_template": CHAT_TEMPLATE},
    "TabbyML/Nomic-Embed-Text": {},
}


def bake_models(cache: Path) -> Path:
    """`<cache>/<Org>/<Name>/{tabby.json, ggml/model-00001-of-00001.gguf}` for the three default models."""
    for model, info in MODELS.items():
        directory = cache / model
        (directory / "ggml").mkdir(parents=True, exist_ok=True)
        (directory / "ggml" / "model-00001-of-00001.gguf").write_bytes(b"GGUF")
        (directory / "tabby.json").write_text(json.dumps({"name": model.split("/")[1], **info}))
    return cache


def llama_wrapper(directory: Path) -> Path:
    """An executable `llama-server` next to the `tabby` wrapper, as the image ships it in /opt/tabby/bin."""
    tabby_wrapper(directory)
    path = directory / "llama-server"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{LLAMA}" "$@"\n')
    path.chmod(0o755)
    return path
