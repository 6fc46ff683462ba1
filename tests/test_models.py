import json
import stat
from pathlib import Path

import pytest

from shared import models

# A stand-in for `tabby download`: fails the first $FAILS calls (counted in a file), then writes a model.
FAKE_DOWNLOAD = """#!/usr/bin/env bash
count_file="$TABBY_MODEL_CACHE_ROOT/.calls"
n=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 )); echo $n > "$count_file"
echo "$@" >> "$TABBY_MODEL_CACHE_ROOT/.args"
if [ "$n" -le "${FAILS:-0}" ]; then echo "network is down" >&2; exit 101; fi
dir="$TABBY_MODEL_CACHE_ROOT/$3"; mkdir -p "$dir/ggml"
echo '{"name": "x"}' > "$dir/tabby.json"; head -c 4096 /dev/zero > "$dir/ggml/model-00001-of-00001.gguf"
"""


@pytest.fixture
def fake_tabby(tmp_path: Path) -> Path:
    path = tmp_path / "tabby"
    path.write_text(FAKE_DOWNLOAD)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_download_retries_then_succeeds(tmp_path, fake_tabby, monkeypatch):
    monkeypatch.setenv("FAILS", "2")
    cache = tmp_path / "models"
    cache.mkdir()
    models.download_model("TabbyML/StarCoder-1B", str(cache), str(fake_tabby), attempts=3, backoff=0)
    assert (cache / ".calls").read_text().strip() == "3"
    assert "download --model TabbyML/StarCoder-1B --prefer-local-file" in (cache / ".args").read_text()
    assert models.check_model("TabbyML/StarCoder-1B", str(cache))["problems"] == []


def test_download_failure_fails_the_build_naming_the_model(tmp_path, fake_tabby, monkeypatch):
    monkeypatch.setenv("FAILS", "99")
    cache = tmp_path / "models"
    cache.mkdir()
    with pytest.raises(
        models.ModelDownloadError, match=r"TabbyML/Qwen2-1.5B-Instruct after 2 attempts: exit 101"
    ):
        models.download_model(
            "TabbyML/Qwen2-1.5B-Instruct", str(cache), str(fake_tabby), attempts=2, backoff=0
        )


def test_exit_zero_without_files_is_a_failure(tmp_path, monkeypatch):
    liar = tmp_path / "tabby"
    liar.write_text("#!/bin/sh\nexit 0\n")
    liar.chmod(0o755)
    with pytest.raises(models.ModelDownloadError, match="StarCoder-1B is missing"):
        models.download_model("TabbyML/StarCoder-1B", str(tmp_path), str(liar), attempts=1, backoff=0)


def make_model(cache: Path, model_id: str, gguf_bytes: int = 10) -> Path:
    d = cache / model_id
    (d / "ggml").mkdir(parents=True)
    (d / "tabby.json").write_text(json.dumps({"model": model_id}))
    (d / "ggml" / "model-00001-of-00001.gguf").write_bytes(b"x" * gguf_bytes)
    return d


def test_check_models_reports_each_problem(tmp_path):
    make_model(tmp_path, "TabbyML/StarCoder-1B", 2048)
    empty = make_model(tmp_path, "TabbyML/Nomic-Embed-Text", 0)
    broken = make_model(tmp_path, "TabbyML/Qwen2-1.5B-Instruct")
    (broken / "tabby.json").unlink()
    report = models.check_models(
        {
            "completion": "TabbyML/StarCoder-1B",
            "embedding": "TabbyML/Nomic-Embed-Text",
            "chat": "TabbyML/Qwen2-1.5B-Instruct",
            "other": "TabbyML/Missing",
        },
        str(tmp_path),
    )
    assert report["ok"] is False
    by_role = {r["role"]: r for r in report["models"]}
    assert by_role["completion"]["problems"] == [] and by_role["completion"]["bytes"] == 2048
    assert by_role["embedding"]["problems"] == [f"{empty}/ggml/model-00001-of-00001.gguf is empty"]
    assert by_role["chat"]["problems"] == [f"{broken}/tabby.json is missing"]
    assert "is missing" in by_role["other"]["problems"][0]
    table = models.format_table(report)
    assert "TabbyML/StarCoder-1B" in table and "2.0 KiB" in table and "ok" in table


def test_all_present_is_ok(tmp_path):
    make_model(tmp_path, "TabbyML/StarCoder-1B")
    assert models.check_models({"completion": "TabbyML/StarCoder-1B"}, str(tmp_path))["ok"] is True


def test_models_module_is_stdlib_only():
    """Modal's image builder imports it before our dependencies are installed."""
    import ast

    tree = ast.parse(Path(models.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    import sys

    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    # The package's __init__ is imported first: a docstring only, no imports.
    init = ast.parse((Path(models.__file__).parent / "__init__.py").read_text())
    assert [type(n).__name__ for n in init.body] == ["Expr"]
