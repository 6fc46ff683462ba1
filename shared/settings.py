"""Every knob of the toolkit, in one pydantic-settings class.

Resolved once on the operator's machine (env vars `TABBY_MODAL_*`, then `.env`, then defaults) and handed to Modal
containers explicitly through `Settings.container_env()`: a container sees neither your shell nor your `.env`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import warm_hours as _warm_hours

ENV_PREFIX = "TABBY_MODAL_"

# Modal accepts any GPU string until deploy time, so we check against what Modal sells.
GPU_TYPES = (
    "T4",
    "L4",
    "A10G",
    "L40S",
    "A100",
    "A100-40GB",
    "A100-80GB",
    "H100",
    "H100!",
    "H200",
    "B200",
    "ANY",
)
_GPU_RE = re.compile(r"^(?P<name>[A-Za-z0-9!-]+?)(?::(?P<count>[1-9][0-9]?))?$")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CRON_FIELD_RE = re.compile(r"^[0-9A-Za-z*/,\-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SettingsError(ValueError):
    """A bad setting: the message is one line naming the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8-sig",  # a UTF-8 BOM (Notepad) is read as nothing, not as part of the first key
        extra="ignore",
        validate_default=True,
    )

    # --- Tabby and its models -------------------------------------------------------------------------------
    tabby_image: str = Field(
        "tabbyml/tabby:0.32.0", description="Tabby container image, pinned to a release tag."
    )
    python_version: str = Field(
        "3.11", description="Python added to the Tabby image for Modal (3.11 or newer)."
    )
    completion_model: str = Field(
        "TabbyML/StarCoder-1B", description="Completion model: `Org/Name` or an absolute path."
    )
    chat_model: str = Field(
        "TabbyML/Qwen2-1.5B-Instruct",
        description="Chat model: `Org/Name` or an absolute path; empty disables chat.",
    )
    embedding_model: str = Field(
        "TabbyML/Nomic-Embed-Text", description="Embedding model Tabby loads at start."
    )
    model_cache: str = Field(
        "/models", description="Where models are baked in the image (TABBY_MODEL_CACHE_ROOT)."
    )
    device: Literal["cuda", "cpu", "rocm", "metal", "vulkan"] = Field(
        "cuda", description="`tabby serve --device`."
    )
    parallelism: int = Field(1, ge=1, le=64, description="`tabby serve --parallelism` (llama-server slots).")

    # --- The GPU server -------------------------------------------------------------------------------------
    gpu: str = Field(
        "L4", description="GPU type, optional `:N` count; a comma list is a fallback order (`L4,A10G`)."
    )
    max_inputs: int = Field(10, ge=1, le=1000, description="Concurrent requests per server container.")
    scaledown_window: int = Field(
        120, description="Idle seconds before the server container stops (2..3600)."
    )
    startup_timeout: int = Field(
        900, ge=10, le=3600, description="Seconds Tabby may take to load models and bind."
    )
    request_timeout: int = Field(
        3600, ge=10, le=86400, description="Longest single request (Modal function timeout)."
    )
    connect_timeout: float = Field(5.0, gt=0, le=120, description="Proxy: connect timeout to Tabby, seconds.")
    idle_timeout: float = Field(
        300.0, gt=0, le=3600, description="Proxy: longest silence inside a stream, seconds."
    )
    internal_port: int = Field(8081, description="Port Tabby listens on, on 127.0.0.1 only.")
    local_port: int = Field(8000, description="Port of the proxy for local serve (`make serve-local`).")
    persist_interval: int = Field(
        30, ge=1, le=3600, description="Seconds between persists of Tabby's state to /data."
    )
    full_scan_minutes: int = Field(
        10,
        ge=0,
        le=1440,
        description="Minutes between full scans of Tabby's root by the persister (changes in between come from "
        "inotify); 0 = a full scan every persist.",
    )
    restart_limit: int = Field(
        3, ge=0, le=100, description="Restarts of a crashed Tabby within RESTART_WINDOW before it gives up."
    )
    restart_window: int = Field(
        600, ge=10, le=86400, description="Seconds over which RESTART_LIMIT counts Tabby's restarts."
    )
    stop_grace: float = Field(
        5.0, gt=0, le=60, description="Seconds Tabby gets after SIGTERM at shutdown, then SIGKILL."
    )
    exit_budget: float = Field(
        25.0,
        ge=5,
        le=3600,
        description="Seconds a shutdown may take (stop Tabby, final persist, commit); Modal allows ~30.",
    )
    tabby_bin: str = Field("tabby", description="Tabby binary for local runs (also read from TABBY_BIN).")
    warm_hours: str = Field(
        "",
        description="Keep one server container warm in these hours, e.g. `Mon-Fri 08:00-19:00 Europe/Berlin`; "
        "empty = off.",
    )

    # --- Split mode (issue 20; docs/split-mode.md) ------------------------------------------------------------
    inference: Literal["local", "split"] = Field(
        "local",
        description="`local`: Tabby and its models on one GPU container; `split`: Tabby's webserver on a CPU "
        "container, its models on GPU containers Modal scales 0..N.",
    )
    inference_max_containers: int = Field(
        4, ge=1, le=100, description="Split mode: most GPU inference containers Modal may run at once."
    )
    inference_min_containers: int = Field(
        0, ge=0, le=100, description="Split mode: GPU inference containers kept up even when idle."
    )
    inference_scaledown_window: int = Field(
        300, description="Split mode: idle seconds before an inference container stops (2..3600)."
    )
    inference_parallelism: int = Field(
        4,
        ge=1,
        le=64,
        description="Split mode: llama-server slots (`-np`) per model per inference container.",
    )
    inference_wait: float = Field(
        120.0,
        gt=0,
        le=140,
        description="Split mode: seconds a model request waits for a cold inference container, then a clear "
        "503 (Modal's web endpoints answer within 150 s).",
    )
    inference_rate_limit: int = Field(
        6000,
        ge=60,
        le=1000000,
        description="Split mode: Tabby's `rate_limit.request_per_minute` per model kind (Tabby's own default "
        "for its local models).",
    )
    inference_gpu_snapshot: bool = Field(
        False, description="Split mode: GPU memory snapshot of the inference class (Modal alpha; unmeasured)."
    )
    server_cpu: float = Field(
        2.0,
        gt=0,
        le=64,
        description="CPU cores reserved for the Tabby container (both modes): its webserver, and the copy pools "
        "of hydrate and persist (two threads per core).",
    )
    server_memory: int = Field(
        4096, ge=512, le=262144, description="Split mode: memory (MiB) of the Tabby (webserver) container."
    )

    # --- Modal names ----------------------------------------------------------------------------------------
    warmer_app: str = Field("tabby-warmer", description="Modal app that builds and checks the model image.")
    server_app: str = Field("tabby-server", description="Modal app that serves Tabby on a GPU.")
    maintenance_app: str = Field("tabby-maintenance", description="Modal app for backups and maintenance.")
    data_volume: str = Field("tabby-data", description="Volume holding Tabby's state.")
    backups_volume: str = Field("tabby-backups", description="Volume holding snapshots.")
    data_mount: str = Field("/data", description="Where the data Volume is mounted.")
    backups_mount: str = Field("/backups", description="Where the backups Volume is mounted.")
    secret_name: str = Field("tabby-secrets", description="Modal secret with the JWT secret and setup token.")
    lock_dict: str = Field("tabby-maintenance-lock", description="modal.Dict holding the maintenance lock.")
    modal_environment: str | None = Field(
        None, description="Modal environment (`-e`); unset uses your default."
    )

    # --- Backups --------------------------------------------------------------------------------------------
    backup_schedule: str = Field(
        "0 3 * * *", description="Cron (UTC) for scheduled snapshots; empty switches off."
    )
    keep_last: int = Field(7, ge=0, le=10000, description="Retention: newest snapshots always kept.")
    keep_daily: int = Field(
        14, ge=0, le=10000, description="Retention: one snapshot per day for this many days."
    )
    keep_weekly: int = Field(
        8, ge=0, le=10000, description="Retention: one snapshot per ISO week for this many weeks."
    )
    keep_safety: int = Field(
        3,
        ge=0,
        le=10000,
        description="Retention: safety (pre-restore, pre-reset, pre-upgrade) snapshots kept, counted apart.",
    )
    maintenance_timeout: int = Field(
        3600,
        ge=60,
        le=86400,
        description="Timeout of each maintenance function (snapshot, restore, ...), seconds.",
    )
    lock_ttl: int = Field(
        300,
        ge=60,
        le=86400,
        description="Seconds a lease outlives its holder's last heartbeat (sent every third of it) on Modal.",
    )
    progress_interval: float = Field(
        5.0, ge=0, le=3600, description="Seconds between progress lines of long runs (export, restore, ...)."
    )
    lock_wait: int = Field(
        600,
        ge=0,
        le=86400,
        description="Seconds a run waits for another run's store lock before it gives up.",
    )

    # --- Local runs -----------------------------------------------------------------------------------------
    local_root: str = Field(
        ".local", description="Folder for `--local` runs: DIR/data, DIR/backups, DIR/live."
    )

    # --- Secrets (local runs; on Modal they come from the Modal secret) ---------------------------------------
    jwt_secret: SecretStr | None = Field(
        None, description="TABBY_WEBSERVER_JWT_TOKEN_SECRET for local serve (UUID)."
    )
    setup_token: SecretStr | None = Field(None, description="Token that unlocks the owner claim (UUID).")
    inference_key: SecretStr | None = Field(
        None, description="Split mode: key Tabby sends to the inference endpoint (from the Modal secret)."
    )

    # ------------------------------------------------------------------------------------------------------------
    @field_validator("tabby_image")
    @classmethod
    def _pinned_image(cls, v: str) -> str:
        name, _, tag = v.rpartition(":")
        if "@sha256:" in v:
            return v
        if not name or not tag or "/" in tag or tag == "latest":
            raise ValueError(f"must be pinned to a release tag like tabbyml/tabby:0.32.0, got {v!r}")
        return v

    @field_validator("python_version")
    @classmethod
    def _python(cls, v: str) -> str:
        m = re.fullmatch(r"3\.(\d+)", v)
        if not m or int(m.group(1)) < 11:
            raise ValueError(f"must be 3.11 or newer (pydantic-settings needs it), got {v!r}")
        return v

    @field_validator("completion_model", "embedding_model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _check_model(v, allow_empty=False)

    @field_validator("chat_model")
    @classmethod
    def _chat(cls, v: str) -> str:
        return _check_model(v, allow_empty=True)

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts:
            raise ValueError("must name a GPU, e.g. L4")
        for part in parts:
            m = _GPU_RE.match(part)
            if not m or m.group("name").upper() not in GPU_TYPES:
                raise ValueError(f"unknown GPU {part!r} (allowed: {', '.join(GPU_TYPES)}, optional :N count)")
        return ",".join(parts)

    @field_validator("scaledown_window", "inference_scaledown_window")
    @classmethod
    def _scaledown(cls, v: int) -> int:
        if not 2 <= v <= 3600:
            raise ValueError(f"must be between 2 and 3600 seconds, got {v}")
        return v

    @field_validator("internal_port", "local_port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"must be a TCP port 1..65535, got {v}")
        return v

    @field_validator("backup_schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        v = " ".join(v.split())
        if v and (len(v.split(" ")) != 5 or not all(_CRON_FIELD_RE.match(f) for f in v.split(" "))):
            raise ValueError(f"must be a 5-field cron expression like '0 3 * * *' (or empty), got {v!r}")
        return v

    @field_validator("warm_hours")
    @classmethod
    def _warm(cls, v: str) -> str:
        hours = _warm_hours.parse(v)  # WarmHoursError is a ValueError: one line, named by `one_line`
        return "" if hours is None else hours.text

    @field_validator(
        "warmer_app",
        "server_app",
        "maintenance_app",
        "data_volume",
        "backups_volume",
        "secret_name",
        "lock_dict",
    )
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"must be 1-64 letters, digits, '.', '_' or '-', got {v!r}")
        return v

    @field_validator("data_mount", "backups_mount", "model_cache")
    @classmethod
    def _abs_path(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") == "" or ".." in v.split("/"):
            raise ValueError(f"must be an absolute path other than /, got {v!r}")
        return v.rstrip("/")

    @field_validator("jwt_secret", "setup_token")
    @classmethod
    def _uuid(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or v.get_secret_value() == "":
            return None
        try:
            uuid.UUID(v.get_secret_value().strip())
        except ValueError:
            raise ValueError(
                "must be a UUID (generate one with `python -c 'import uuid; print(uuid.uuid4())'`)"
            ) from None
        return SecretStr(v.get_secret_value().strip())

    @model_validator(mode="after")
    def _distinct(self) -> Settings:
        if self.data_mount == self.backups_mount:
            raise ValueError(
                f"{ENV_PREFIX}BACKUPS_MOUNT: must differ from the data mount {self.data_mount!r}"
            )
        if self.data_volume == self.backups_volume:
            raise ValueError(
                f"{ENV_PREFIX}BACKUPS_VOLUME: must differ from the data volume {self.data_volume!r}"
            )
        return self

    # --- Derived values -------------------------------------------------------------------------------------
    def models(self) -> dict[str, str]:
        """Models to bake, role -> id, in layer order: least likely to change first (see shared/image.py)."""
        roles = {
            "embedding": self.embedding_model,
            "completion": self.completion_model,
            "chat": self.chat_model,
        }
        return {role: model for role, model in roles.items() if model}

    def gpu_spec(self) -> str | list[str]:
        """The value for Modal's `gpu=`: one type, or a list as a fallback order."""
        parts = self.gpu.split(",")
        return parts[0] if len(parts) == 1 else parts

    def local_dirs(self, local: str | os.PathLike[str] | None = None) -> LocalDirs:
        """The `--local DIR` layout of DIR (default: `local_root`)."""
        return LocalDirs.at(local or self.local_root)

    def container_env(self) -> dict[str, str]:
        """Resolved non-secret settings as env vars, for a Modal function's `env=`.

        Secrets are left out on purpose: on Modal they come from the Modal secret, never from a laptop's env.
        """
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude={"jwt_secret", "setup_token", "inference_key"}).items():
            if value is None:
                continue
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


@dataclass(frozen=True)
class LocalDirs:
    """The `--local DIR` layout, known here only: DIR/data stands for the data Volume, DIR/backups for the backups
    Volume, DIR/locks holds the leases (the modal.Dict's stand-in), DIR/live is the root `serve --local` runs Tabby
    in. `dirs["data"]` reads like `dirs.data` for the callers written against the former dict."""

    root: Path
    data: Path
    backups: Path
    locks: Path
    live: Path

    # The folders that make DIR a tabby-modal folder (a DIR with none of them is a typo or the wrong folder).
    STORE_PARTS = ("data", "backups", "locks")

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> LocalDirs:
        root = Path(root)
        return cls(root, root / "data", root / "backups", root / "locks", root / "live")

    def __getitem__(self, name: str) -> Path:
        path: Path = getattr(self, name)
        return path


def _check_model(v: str, *, allow_empty: bool) -> str:
    v = v.strip()
    if not v:
        if allow_empty:
            return ""
        raise ValueError("must not be empty")
    if v.startswith("/"):
        if ".." in v.split("/"):
            raise ValueError(f"must not contain '..', got {v!r}")
        return v.rstrip("/")
    if not _MODEL_ID_RE.match(v):
        raise ValueError(f"must be a registry id like TabbyML/StarCoder-1B or an absolute path, got {v!r}")
    return v


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def one_line(err: ValidationError) -> str:
    """The first validation error as one line naming its environment variable."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "__root__"]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return f"{env_name(loc[0])}: {msg}"
    return msg  # model-level errors already name their variable


# TABBY_MODAL_* names read on purpose outside the settings: the second signal of destructive commands.
NOT_SETTINGS = frozenset({"TABBY_MODAL_ALLOW_DESTRUCTIVE"})
_warned: set[str] = set()


def _looks_utf16(raw: bytes) -> bool:
    """A UTF-16 byte order mark, or NULs in (nearly) every other byte: how UTF-16 spells mostly-ASCII text."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    if len(raw) < 4:
        return False
    return any(half.count(0) >= 0.9 * len(half) for half in (raw[1::2], raw[0::2]))


def check_env_file(env_file: str | os.PathLike[str] | None) -> str | None:
    """The `.env` file's text (None when there is none), or SettingsError with one line when it cannot be read as
    UTF-8: a PowerShell `>` writes UTF-16, which would otherwise end in a traceback or in silently ignored keys."""
    if not env_file:
        return None
    path = Path(env_file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise SettingsError(f"{path}: is a directory, not a settings file") from None
    except OSError as err:
        raise SettingsError(f"{path}: cannot be read ({err.strerror or err})") from None
    fix = "save it as UTF-8 (PowerShell: `(Get-Content .env) | Set-Content -Encoding utf8 .env`)"
    if _looks_utf16(raw):
        raise SettingsError(f"{path} is UTF-16 text (PowerShell's `>` writes that): {fix}")
    if (nul := raw.find(b"\x00")) >= 0:  # a stray NUL in UTF-8 text: saying "UTF-16" would send people astray
        line = raw.count(b"\n", 0, nul) + 1
        raise SettingsError(
            f"{path} has a NUL byte (offset {nul}, line {line}): a settings file is plain text; remove that byte"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SettingsError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): {fix}"
        ) from None


def unknown_names(env_file: str | os.PathLike[str] | None = ".env") -> list[tuple[str, str, str | None]]:
    """`TABBY_MODAL_*` names in the environment and `.env` that no setting has: (name, where, closest known)."""
    from dotenv import dotenv_values

    known = {env_name(f) for f in Settings.model_fields} | NOT_SETTINGS
    text = check_env_file(env_file)
    found = {k: "environment" for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    if text is not None:
        import io

        for k in dotenv_values(stream=io.StringIO(text)):
            if k.upper().startswith(ENV_PREFIX):
                found.setdefault(k, str(env_file))
    out = []
    for name, where in sorted(found.items()):
        if name.upper() in known:
            continue
        # Compared without the shared prefix, which would make every name look close to every other.
        suffixes = {k.removeprefix(ENV_PREFIX): k for k in known}
        close = difflib.get_close_matches(
            name.upper().removeprefix(ENV_PREFIX), sorted(suffixes), n=1, cutoff=0.6
        )
        out.append((name, where, suffixes[close[0]] if close else None))
    return out


def warn_unknown(env_file: str | os.PathLike[str] | None = ".env") -> None:
    """One line on stderr per unknown `TABBY_MODAL_*` name (once per process), naming the closest known one."""
    for name, where, close in unknown_names(env_file):
        if name in _warned:
            continue
        _warned.add(name)
        hint = f"; did you mean {close}?" if close else ""
        print(f"warning: unknown setting {name} (in {where}) is ignored{hint}", file=sys.stderr, flush=True)


def load_settings(env_file: str | os.PathLike[str] | None = ".env", **overrides: Any) -> Settings:
    """Resolve settings (env, then `.env`, then defaults) or raise SettingsError with one line; unknown
    `TABBY_MODAL_*` names get a warning line."""
    warn_unknown(env_file)
    if (
        "tabby_bin" not in overrides
        and env_name("tabby_bin") not in os.environ
        and os.environ.get("TABBY_BIN")
    ):
        overrides["tabby_bin"] = os.environ["TABBY_BIN"]
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as err:
        raise SettingsError(one_line(err)) from None


def sources(env_file: str | os.PathLike[str] | None = ".env") -> dict[str, str]:
    """Where each field's value came from: `env`, `.env` or `default`."""
    from dotenv import dotenv_values

    dotenv = (
        {k.upper(): v for k, v in dotenv_values(env_file, encoding="utf-8-sig").items()}
        if env_file and check_env_file(env_file) is not None
        else {}
    )
    out: dict[str, str] = {}
    for name in Settings.model_fields:
        key = env_name(name)
        if key in os.environ or (name == "tabby_bin" and "TABBY_BIN" in os.environ):
            out[name] = "env"
        elif key in dotenv:
            out[name] = ".env"
        else:
            out[name] = "default"
    return out
