"""Tabby's models in the image: download them at build time, check them at run time.

Stdlib only: `download_model` runs inside Modal's image builder, which imports this module before any of our
Python dependencies are installed (they come after the model layers so that they do not invalidate them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

TABBY_BIN = "/opt/tabby/bin/tabby"


class ModelDownloadError(RuntimeError):
    pass


def download_model(
    model_id: str,
    cache_root: str = "/models",
    tabby_bin: str = TABBY_BIN,
    attempts: int = 4,
    backoff: float = 10.0,
) -> None:
    """`tabby download --model ID`, retried with backoff; raise (failing the image build) naming the model.

    The seed ran this without a check, so a failed download silently built an image without models.
    """
    if model_id.startswith("/"):
        print(f"model {model_id}: a local path, nothing to download")
        return
    env = {**os.environ, "TABBY_MODEL_CACHE_ROOT": cache_root, "TABBY_DISABLE_USAGE_COLLECTION": "1"}
    # --prefer-local-file: a present model is not fetched again (Tabby's integrity check uses a relative path).
    cmd = [tabby_bin, "download", "--model", model_id, "--prefer-local-file"]
    last = ""
    for attempt in range(1, attempts + 1):
        print(f"model {model_id}: download attempt {attempt}/{attempts}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            problems = check_model(model_id, cache_root)["problems"]
            if not problems:
                print(f"model {model_id}: ready", flush=True)
                return
            last = "; ".join(problems)
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            last = f"exit {proc.returncode}: " + " | ".join(tail)
        print(f"model {model_id}: attempt {attempt} failed ({last})", flush=True)
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    raise ModelDownloadError(f"could not download model {model_id} after {attempts} attempts: {last}")


def model_dir(model_id: str, cache_root: str) -> Path:
    """Where Tabby keeps a registry model: `$TABBY_MODEL_CACHE_ROOT/<Org>/<Name>`; a path is itself."""
    return Path(model_id) if model_id.startswith("/") else Path(cache_root) / model_id


def check_model(model_id: str, cache_root: str) -> dict[str, object]:
    """What a baked model looks like: `tabby.json` plus at least one non-empty `ggml/*.gguf`."""
    root = model_dir(model_id, cache_root)
    problems: list[str] = []
    files = sorted((root / "ggml").glob("*.gguf")) if root.is_dir() else []
    size = sum(f.stat().st_size for f in files)
    if not root.is_dir():
        problems.append(f"{root} is missing")
    else:
        meta = root / "tabby.json"
        if not meta.is_file():
            problems.append(f"{meta} is missing")
        else:
            try:
                json.loads(meta.read_text())
            except (OSError, ValueError):
                problems.append(f"{meta} is not valid JSON")
        if not files:
            problems.append(f"no ggml/*.gguf under {root}")
        problems += [f"{f} is empty" for f in files if f.stat().st_size == 0]
        problems += [f"{p} is a partial download" for p in (root / "ggml").glob("*.tmp")]
    return {"model": model_id, "path": str(root), "files": len(files), "bytes": size, "problems": problems}


def check_models(models: dict[str, str], cache_root: str) -> dict[str, object]:
    """Check every configured model; `ok` is False if any is missing or incomplete."""
    rows = [{"role": role, **check_model(model, cache_root)} for role, model in models.items()]
    return {"ok": all(not r["problems"] for r in rows), "models": rows}


def format_table(report: dict[str, object]) -> str:
    rows = report["models"]
    assert isinstance(rows, list)
    lines = [f"{'role':<11} {'model':<32} {'files':>5} {'size':>10}  status"]
    for r in rows:
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(f"{r['role']:<11} {r['model']:<32} {r['files']:>5} {_size(r['bytes']):>10}  {status}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
