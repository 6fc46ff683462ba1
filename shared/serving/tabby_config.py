"""Tabby's `config.toml` in the live root: our model settings added to the user's own file, never over it.

`tabby serve` has no embedding flag: Tabby 0.32 reads the embedding model only from `$TABBY_ROOT/config.toml`
(`[model.embedding.local] model_id = ...`, crates/tabby-common/src/config.rs), and without one it asks the model
registry for `Nomic-Embed-Text` at every start. A `model_id` that is an existing directory is loaded from there
(`ggml/` + `tabby.json`, crates/llama-cpp-server/src/lib.rs), so we name the baked model by its path under the
model cache. Completion and chat stay on the command line (`--model`, `--chat-model`, already local paths when
baked; see supervisor.model_arg): those flags also carry `--device` and `--parallelism`.

The user's file (from the data Volume, hydrated into the live root) is kept as written; ours is appended as one
block between two marker lines, stripped and rewritten at every start, so the file persisted back to /data never
mixes our keys into the user's. Conflicts: **the user's keys win**. When their file sets `model.embedding`,
`model.completion` or `model.chat` (local or http), we add nothing for that role and leave its flag off the command
line (Tabby would otherwise override their config.toml with the flag), and say so in one log line per role.
A user file that is not valid TOML stops the start with a one-line reason (Tabby itself would panic on it).

Split mode (TABBY_MODAL_INFERENCE=split, issue 20): our block holds `[model.completion.http]`, `[model.chat.http]`
and `[model.embedding.http]` pointing at the inference endpoint instead, and neither `--model` nor `--chat-model`
goes on the command line. The completion model's `prompt_template` is copied from its `tabby.json` (without it
Tabby sends the prefix alone: no fill-in-the-middle), and the rate limit is Tabby's own for its local servers, not
the `[model.*.http]` default of 1,200/min that would queue a team's completions. The user's keys still win.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.serving.supervisor import model_arg

if TYPE_CHECKING:
    from shared.serving.inference import Endpoint
from shared.settings import Settings, env_name
from shared.state.atomic import write_bytes

log = logging.getLogger("tabby_modal.config")

FILE = "config.toml"
BEGIN = "# >>> tabby-modal: rewritten at each start from TABBY_MODAL_* settings; put your own keys outside this block"
END = "# <<< tabby-modal: end of the generated part"
ROLES = ("embedding", "completion", "chat")
SETTING = {"embedding": "embedding_model", "completion": "completion_model", "chat": "chat_model"}
FLAG = {"completion": "--model", "chat": "--chat-model"}


class TabbyConfigError(ValueError):
    """The user's config.toml cannot be used: the message is one line."""


@dataclass(frozen=True)
class Plan:
    """What to write and what it means for the command line."""

    text: str  # the whole config.toml
    ours: dict[str, str] = field(default_factory=dict)  # dotted key -> value we set
    user_roles: frozenset[str] = frozenset()  # model roles the user's file sets: theirs win
    notes: tuple[str, ...] = ()  # one log line each
    split: bool = False  # split mode: the models are served over HTTP, no model flag at all

    @property
    def skip_flags(self) -> frozenset[str]:
        """Roles whose command-line flag must be left out (`completion`, `chat`)."""
        return frozenset(FLAG) if self.split else self.user_roles & set(FLAG)


def toml_string(value: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def strip_ours(text: str) -> str:
    """The user's part: `text` without our block (from BEGIN to END, or to the end if END was deleted)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    inside = False
    for line in lines:
        bare = line.strip()
        if not inside and bare == BEGIN:
            inside = True
            continue
        if inside:
            if bare == END:
                inside = False
            continue
        out.append(line)
    return "".join(out)


def parse(text: str, where: str = FILE) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TabbyConfigError(
            f"{where} is not valid TOML ({err}); Tabby would refuse to start: fix or remove it in the data Volume"
        ) from None


def user_roles(doc: dict[str, Any]) -> frozenset[str]:
    model = doc.get("model")
    if not isinstance(model, dict):
        return frozenset()
    return frozenset(role for role in ROLES if role in model)


def http_sections(settings: Settings, endpoint: Endpoint, roles: frozenset[str]) -> dict[str, dict[str, Any]]:
    """Split mode: the `[model.<role>.http]` tables for the roles the user's file leaves to us."""
    from shared.serving.inference import model_dir, model_info

    common: dict[str, Any] = {"api_endpoint": endpoint.url}
    if endpoint.key:
        common["api_key"] = endpoint.key
    rate = {"request_per_minute": settings.inference_rate_limit}
    out: dict[str, dict[str, Any]] = {}
    if "completion" not in roles:
        info = model_info(model_dir(settings.completion_model, settings.model_cache))
        section = {"kind": "llama.cpp/completion", **common}
        if info.get("prompt_template"):
            section["prompt_template"] = info["prompt_template"]
        out["completion"] = {**section, "rate_limit": rate}
    if settings.chat_model and "chat" not in roles:
        info = model_info(model_dir(settings.chat_model, settings.model_cache))
        section = {
            "kind": "openai/chat",
            "model_name": "local",
            **common,
        }  # model_name: as Tabby's own server
        if info.get("chat_template"):
            section["chat_template"] = info["chat_template"]
        out["chat"] = {**section, "rate_limit": rate}
    if "embedding" not in roles:
        out["embedding"] = {"kind": "llama.cpp/embedding", **common, "rate_limit": rate}
    return out


def _toml_table(name: str, table: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    for key, value in table.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {v}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {toml_string(str(value))}")
    return "\n".join(lines) + "\n"


def plan_split(settings: Settings, user: str, roles: frozenset[str], endpoint: Endpoint) -> Plan:
    """Split mode's config.toml: the user's text plus our `[model.*.http]` block."""
    notes = [
        f"config.toml sets model.{role}: it wins over the split-mode inference endpoint"
        for role in ROLES
        if role in roles and (role != "chat" or settings.chat_model)
    ]
    sections = http_sections(settings, endpoint, roles)
    if not sections:
        return Plan(user, {}, roles, tuple(notes), split=True)
    body = "".join(_toml_table(f"model.{role}.http", table) for role, table in sections.items())
    block = f"{BEGIN}\n{body}{END}\n"
    text = f"{user.rstrip()}\n\n{block}" if user.strip() else block
    try:
        merged = tomllib.loads(text)["model"]
        ok = all(merged[role]["http"]["api_endpoint"] == endpoint.url for role in sections)
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise TabbyConfigError(
            "config.toml: cannot add the split-mode [model.*.http] tables to your file (its `model` table is "
            "closed to them); set model.completion, model.chat and model.embedding in it yourself"
        )
    ours = {
        f"model.{role}.http.{key}": ("********" if key == "api_key" else str(value))
        for role, table in sections.items()
        for key, value in table.items()
        if key in ("kind", "api_endpoint", "api_key", "prompt_template")
    }
    return Plan(text, ours, roles, tuple(notes), split=True)


def plan(settings: Settings, user_text: str | None, endpoint: Endpoint | None = None) -> Plan:
    """The config.toml for this start: the user's text (our old block removed) plus our block, if any."""
    user = strip_ours(user_text or "")
    roles = user_roles(parse(user))
    if endpoint is not None:  # split mode
        return plan_split(settings, user, roles, endpoint)
    notes: list[str] = []
    for role in ROLES:
        if role in roles and (role == "embedding" or getattr(settings, SETTING[role])):
            how = "not written" if role == "embedding" else f"{FLAG[role]} left out"
            notes.append(f"config.toml sets model.{role}: it wins over {env_name(SETTING[role])} ({how})")
    ours: dict[str, str] = {}
    block = ""
    if "embedding" not in roles:
        model_id = model_arg(settings.embedding_model, settings.model_cache)
        ours["model.embedding.local.model_id"] = model_id
        block = f"{BEGIN}\n[model.embedding.local]\nmodel_id = {toml_string(model_id)}\n{END}\n"
    if not block:
        return Plan(user, ours, roles, tuple(notes))
    # One blank line between their part and ours, whatever they left at its end: the text is the same each start.
    text = f"{user.rstrip()}\n\n{block}" if user.strip() else block
    try:
        merged = tomllib.loads(text)
        got = merged["model"]["embedding"]["local"]["model_id"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        got = None
    if got != ours.get("model.embedding.local.model_id"):
        # e.g. `model = { completion = ... }`: an inline table cannot be extended by a [model.embedding.local].
        notes.append(
            f"config.toml: cannot add [model.embedding.local] to your file (its `model` table is closed to it); "
            f"Tabby uses its default embedding model: set model.embedding in your config.toml instead of "
            f"{env_name('embedding_model')}"
        )
        return Plan(user, {}, roles, tuple(notes))
    return Plan(text, ours, roles, tuple(notes))


def write(settings: Settings, live_root: Path, endpoint: Endpoint | None = None) -> Plan:
    """Merge our settings into `live_root/config.toml` (written only when it changes) and log what was decided."""
    path = Path(live_root) / FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = None
    try:
        text = None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TabbyConfigError(f"{FILE} is not UTF-8 text; fix or remove it in the data Volume") from None
    result = plan(settings, text, endpoint)
    for note in result.notes:
        log.warning(note)
    if result.text != (text or ""):  # unchanged: not rewritten, so nothing new to persist
        mode = path.stat().st_mode & 0o777 if raw is not None else 0o600
        write_bytes(path, result.text.encode(), mode=mode, durable=False)
    for key, value in result.ours.items():
        log.info("config.toml: %s = %s", key, value)
    return result
