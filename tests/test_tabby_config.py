"""Tabby's config.toml written from settings into the live root, merged with the user's own (theirs wins)."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest

from shared.serving import tabby_config
from shared.serving.supervisor import build_command
from shared.serving.tabby_config import BEGIN, END, TabbyConfigError
from shared.settings import load_settings

EMBED = "TabbyML/Nomic-Embed-Text"


@pytest.fixture
def settings(no_modal_env: Path, tmp_path: Path):
    return load_settings(env_file=None, model_cache=str(tmp_path / "models"))


def bake(settings, model: str = EMBED) -> Path:
    path = Path(settings.model_cache) / model
    (path / "ggml").mkdir(parents=True)
    return path


def test_fresh_root_gets_the_baked_embedding_model_by_its_path(settings, tmp_path):
    baked = bake(settings)
    live = tmp_path / "live"
    live.mkdir()
    plan = tabby_config.write(settings, live)
    text = (live / "config.toml").read_text()
    assert text == plan.text
    assert tomllib.loads(text) == {"model": {"embedding": {"local": {"model_id": str(baked)}}}}
    assert text.splitlines()[0] == BEGIN and text.splitlines()[-1] == END
    assert plan.skip_flags == frozenset()


def test_unbaked_embedding_model_is_named_by_its_registry_id(settings, tmp_path):
    plan = tabby_config.plan(settings, None)
    assert tomllib.loads(plan.text)["model"]["embedding"]["local"]["model_id"] == EMBED


def test_path_with_quotes_and_backslashes_is_escaped(tmp_path, no_modal_env):
    odd = tmp_path / 'we"ird\\cache'
    s = load_settings(env_file=None, model_cache=str(odd))
    (odd / EMBED).mkdir(parents=True)
    model_id = tomllib.loads(tabby_config.plan(s, None).text)["model"]["embedding"]["local"]["model_id"]
    assert model_id == str(odd / EMBED)


def test_users_text_is_kept_verbatim_and_ours_appended(settings, tmp_path):
    baked = bake(settings)
    live = tmp_path / "live"
    live.mkdir()
    user = (
        "# my settings\n"
        "[server]\ncompletion_timeout = 60  # slow GPU\n\n"
        '[[repositories]]\ngit_url = "https://github.com/TabbyML/tabby.git"\n'
    )
    (live / "config.toml").write_text(user)
    tabby_config.write(settings, live)
    text = (live / "config.toml").read_text()
    assert text.startswith(user)
    doc = tomllib.loads(text)
    assert doc["server"] == {"completion_timeout": 60}
    assert doc["repositories"] == [{"git_url": "https://github.com/TabbyML/tabby.git"}]
    assert doc["model"]["embedding"]["local"]["model_id"] == str(baked)


def test_rewriting_is_stable_and_replaces_only_our_block(settings, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.toml").write_text("[server]\ncompletion_timeout = 60\n")
    tabby_config.write(settings, live)
    first = (live / "config.toml").read_bytes()
    mtime = (live / "config.toml").stat().st_mtime_ns
    tabby_config.write(settings, live)  # the next start, from the file persisted back to /data
    assert (live / "config.toml").read_bytes() == first
    assert (live / "config.toml").stat().st_mtime_ns == mtime  # not rewritten: nothing new to persist
    # The setting changes: our block follows it; the user's part, and what they added after our block, stay.
    (live / "config.toml").write_text(first.decode() + "\n[answer]\npresence_penalty = 0.1\n")
    other = load_settings(env_file=None, model_cache=settings.model_cache, embedding_model="Org/Other-Embed")
    tabby_config.write(other, live)
    text = (live / "config.toml").read_text()
    doc = tomllib.loads(text)
    assert doc["model"]["embedding"]["local"]["model_id"] == "Org/Other-Embed"
    assert doc["server"] == {"completion_timeout": 60} and doc["answer"] == {"presence_penalty": 0.1}
    assert text.count(BEGIN) == 1 and EMBED not in text


def test_users_embedding_model_wins_with_one_log_line(settings, tmp_path, caplog):
    bake(settings)
    live = tmp_path / "live"
    live.mkdir()
    user = '[model.embedding.http]\nkind = "llama.cpp/embedding"\napi_endpoint = "http://10.0.0.2:8080"\n'
    (live / "config.toml").write_text(user)
    with caplog.at_level(logging.INFO, logger="tabby_modal.config"):
        plan = tabby_config.write(settings, live)
    assert (live / "config.toml").read_text() == user  # untouched
    assert plan.ours == {}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "config.toml sets model.embedding: it wins over TABBY_MODAL_EMBEDDING_MODEL (not written)"
    ]


def test_users_completion_and_chat_models_win_over_the_flags(settings, tmp_path, caplog):
    bake(settings, "TabbyML/StarCoder-1B")
    user = (
        '[model.completion.http]\nkind = "llama.cpp/completion"\napi_endpoint = "http://10.0.0.2:8080"\n'
        '[model.chat.local]\nmodel_id = "/mnt/my-chat"\n'
    )
    with caplog.at_level(logging.WARNING, logger="tabby_modal.config"):
        live = tmp_path / "live"
        live.mkdir()
        (live / "config.toml").write_text(user)
        plan = tabby_config.write(settings, live)
    assert plan.skip_flags == {"completion", "chat"}
    cmd = build_command(settings, "tabby", skip=plan.skip_flags)
    assert "--model" not in cmd and "--chat-model" not in cmd
    assert "--device" in cmd  # the rest stays
    assert len([r for r in caplog.records if "wins over" in r.getMessage()]) == 2
    doc = tomllib.loads((live / "config.toml").read_text())
    assert doc["model"]["chat"] == {"local": {"model_id": "/mnt/my-chat"}}
    assert doc["model"]["embedding"]["local"]["model_id"] == EMBED  # ours still added beside theirs


def test_a_model_table_closed_to_ours_is_refused_with_a_log_line(settings, tmp_path, caplog):
    user = 'model = { completion = { local = { model_id = "/mnt/c" } } }\n'
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.toml").write_text(user)
    with caplog.at_level(logging.WARNING, logger="tabby_modal.config"):
        plan = tabby_config.write(settings, live)
    assert (live / "config.toml").read_text() == user
    assert plan.ours == {} and plan.skip_flags == {"completion"}
    assert any("cannot add [model.embedding.local]" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("raw", [b"[model\nbroken", b"\xff\xfe not utf-8"])
def test_invalid_user_file_is_one_line_error_and_left_alone(settings, tmp_path, raw):
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.toml").write_bytes(raw)
    with pytest.raises(TabbyConfigError) as err:
        tabby_config.write(settings, live)
    assert "\n" not in str(err.value) and "config.toml" in str(err.value)
    assert (live / "config.toml").read_bytes() == raw


def test_our_block_with_its_end_line_deleted_is_still_replaced(settings, tmp_path):
    text = tabby_config.plan(settings, "[server]\ncompletion_timeout = 5\n").text
    cut = text.replace(END + "\n", "")
    again = tabby_config.plan(settings, cut).text
    assert again == text
