"""Run `tabby serve` as a child process: build its command, start it, wait until it listens, stop it cleanly.

Tabby binds its port only after its models are loaded and its database is migrated, so "the port accepts a TCP
connection" is the readiness signal. We poll it with a short backoff (a few ms), which detects the bind within
~10 ms where the seed's 1 s poll wasted half a second on average. Tabby installs no signal handlers and its
llama-server children outlive a signal death, so it runs in its own process group and stopping signals the group:
SIGTERM, a grace period, then SIGKILL, until no member is left.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from shared.settings import ENV_PREFIX, Settings

log = logging.getLogger("tabby_modal.supervisor")
tabby_log = logging.getLogger("tabby_modal.tabby")

TAIL_LINES = 50
LOG_LINE_MAX = 400  # our logs get short lines; the ring buffer keeps them whole up to this length too
POLL_FIRST = 0.001
POLL_MAX = 0.01  # cap of the readiness backoff: the bind is seen within ~10 ms
GRACE = 10.0
JWT_ENV = "TABBY_WEBSERVER_JWT_TOKEN_SECRET"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Spinner glyphs (braille, |/-\), numbers and whitespace: what changes between two frames of one progress line.
_VOLATILE = re.compile(r"[\u2800-\u28ff|/\\\-]+|\d+(?:\.\d+)?|\s+")


class TabbyStartError(RuntimeError):
    """Tabby exited or hung while starting: the message names why; `tail` holds its last log lines."""

    def __init__(self, message: str, *, exit_code: int | None = None, tail: Sequence[str] = ()) -> None:
        self.reason = message
        self.exit_code = exit_code
        self.tail = list(tail)
        text = message if not self.tail else message + "\n" + "\n".join(f"  | {line}" for line in self.tail)
        super().__init__(text)


# --- command and environment ----------------------------------------------------------------------------------


def model_arg(model: str, model_cache: str) -> str:
    """A baked model's directory (skips Tabby's registry fetches at start), else the id or path as given."""
    if model.startswith("/"):
        return model
    baked = Path(model_cache) / model
    return str(baked) if baked.is_dir() else model


def build_command(settings: Settings, tabby_bin: str, *, skip: Collection[str] = ()) -> list[str]:
    """`tabby serve ...`; `skip` names model roles (`completion`, `chat`) that the user's config.toml sets: a flag
    would override it (see tabby_config)."""
    cmd = [tabby_bin, "serve"]
    if "completion" not in skip:
        cmd += ["--model", model_arg(settings.completion_model, settings.model_cache)]
    if settings.chat_model and "chat" not in skip:
        cmd += ["--chat-model", model_arg(settings.chat_model, settings.model_cache)]
    cmd += [
        "--device",
        "cpu" if settings.inference == "split" else settings.device,  # split mode: no GPU, models over HTTP
        "--parallelism",
        str(settings.parallelism),
        "--host",
        "127.0.0.1",  # only the proxy reaches Tabby
        "--port",
        str(settings.internal_port),
    ]
    return cmd


def build_env(
    settings: Settings,
    live_root: Path,
    jwt_secret: str | None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Tabby's environment: ours minus our own settings and secrets, plus Tabby's variables."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(ENV_PREFIX)}
    env["TABBY_ROOT"] = str(live_root)
    env["TABBY_DISABLE_USAGE_COLLECTION"] = "1"
    env["TABBY_EMBEDDING_ENABLED"] = "yes"  # Tabby 0.33 runs no embedding model without it; 0.32 ignores it
    # A missing cache dir (a local run without baked models) lets Tabby use TABBY_ROOT/models, which the mirror skips.
    if Path(settings.model_cache).is_dir():
        env["TABBY_MODEL_CACHE_ROOT"] = settings.model_cache
    else:
        env.pop("TABBY_MODEL_CACHE_ROOT", None)
    if jwt_secret:
        env[JWT_ENV] = jwt_secret
    return env


def find_tabby(tabby_bin: str) -> str | None:
    """An executable path for `tabby_bin` (a path or a name on PATH), or None."""
    if os.sep in tabby_bin:
        return tabby_bin if os.access(tabby_bin, os.X_OK) and Path(tabby_bin).is_file() else None
    return shutil.which(tabby_bin)


# --- log handling ---------------------------------------------------------------------------------------------


def _key(line: str) -> str:
    return _VOLATILE.sub("", line)


class LogTail:
    """Tabby's output as lines: a ring buffer of the last N, with spinner frames collapsed into one line.

    Tabby redraws a progress line every ~80 ms (with `\\r` on a TTY, one line each otherwise); consecutive lines
    that differ only in spinner glyphs and numbers replace each other instead of flooding the buffer and our logs.
    """

    def __init__(self, size: int = TAIL_LINES, sink: Callable[[str], None] | None = None) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=size)
        self._last_key: str | None = None
        self._repeats = 0
        self._sink = sink
        self._lock = threading.Lock()

    def add(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip()
        if not line.strip():
            return
        line = line[:LOG_LINE_MAX]
        key = _key(line)
        with self._lock:
            if key == self._last_key and self._lines:
                self._lines[-1] = line  # the latest frame stands for the run
                self._repeats += 1
                return
            self._flush_repeats()
            self._last_key = key
            self._lines.append(line)
        if self._sink:
            self._sink(line)

    def _flush_repeats(self) -> None:
        if self._repeats and self._sink and self._lines:
            self._sink(f"{self._lines[-1]} (x{self._repeats + 1})")
        self._repeats = 0

    def close(self) -> None:
        with self._lock:
            self._flush_repeats()

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def _pump(stream, tail: LogTail) -> None:
    """Read Tabby's output in chunks (spinners end frames with `\\r`, not `\\n`) and feed whole lines to `tail`."""
    buf = b""
    try:
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            buf += chunk
            *parts, buf = re.split(rb"\r\n|\r|\n", buf)
            for part in parts:
                tail.add(part.decode("utf-8", "replace"))
            if len(buf) > 65536:  # a line without end: take it as it is
                tail.add(buf.decode("utf-8", "replace"))
                buf = b""
    except (OSError, ValueError):
        pass
    finally:
        if buf:
            tail.add(buf.decode("utf-8", "replace"))
        tail.close()


# --- process group --------------------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`, read from /proc; [] where /proc is missing."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Supervisor:
    """One `tabby serve` process: `start()`, `wait_ready()`, `stop()`; `tail()` for its last log lines."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        port: int,
        host: str = "127.0.0.1",
        startup_timeout: float = 900.0,
        grace: float = GRACE,
        cwd: str | os.PathLike[str] | None = None,
        log_sink: Callable[[str], None] | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ) -> None:
        self.command = list(command)
        self.on_spawn = on_spawn  # told Tabby's pid (its process group) as soon as it runs
        self.env = dict(env)
        self.host, self.port = host, port
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.cwd = cwd
        self.logs = LogTail(TAIL_LINES, log_sink if log_sink is not None else tabby_log.info)
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._started_at = 0.0
        self.ready_at: float | None = None
        self._lock = threading.Lock()

    # --- start ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already started")
        if port_open(self.host, self.port, timeout=0.2):
            raise TabbyStartError(f"port {self.host}:{self.port} is already in use: another Tabby running?")
        log.info("starting: %s", " ".join(self.command))
        try:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals Tabby and its llama-servers
            )
        except OSError as err:
            raise TabbyStartError(f"cannot run {self.command[0]}: {err.strerror or err}") from None
        if self.on_spawn is not None:
            self.on_spawn(self.proc.pid)
        self._started_at = time.monotonic()
        assert self.proc.stdout is not None
        self._pump = threading.Thread(
            target=_pump, args=(self.proc.stdout, self.logs), name="tabby-log", daemon=True
        )
        self._pump.start()

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> float:
        """Block until Tabby's port accepts a connection; return seconds since start. Raise TabbyStartError if it
        exits first (within ~10 ms of the exit) or the startup timeout passes (then it is stopped)."""
        if self.proc is None:
            raise RuntimeError("not started")
        limit = self.startup_timeout if timeout is None else timeout
        deadline = self._started_at + limit
        delay = POLL_FIRST
        while True:
            if self._try_connect():
                self.ready_at = time.monotonic()
                took = self.ready_at - self._started_at
                log.info("tabby ready on %s:%d after %.2fs", self.host, self.port, took)
                return took
            if self._leader_exited():
                self._reap_group(grace=0.5)  # a llama-server child may still hold the log pipe open
                code = self.proc.returncode
                raise TabbyStartError(
                    f"tabby exited with code {code} while starting", exit_code=code, tail=self._final_tail()
                )
            if cancel is not None and cancel.is_set():
                self.stop()
                raise TabbyStartError("start cancelled", tail=self._final_tail())
            if time.monotonic() >= deadline:
                tail = self.logs.lines()
                self.stop()
                raise TabbyStartError(
                    f"tabby did not listen on {self.host}:{self.port} within {limit:g}s "
                    "(TABBY_MODAL_STARTUP_TIMEOUT); stopped it",
                    tail=tail,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX)

    def _try_connect(self) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            return s.connect_ex((self.host, self.port)) == 0
        except OSError:
            return False
        finally:
            s.close()

    def _final_tail(self) -> list[str]:
        if self._pump is not None:
            self._pump.join(timeout=0.5)
        return self.logs.lines()

    # --- state ---------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> bool:
        """Has Tabby exited (crashed)? Cheap, and leaves the exit status for `stop()` to collect."""
        return self.proc is not None and self._leader_exited()

    def tail(self) -> list[str]:
        return self.logs.lines()

    # --- stop ----------------------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM to the group, wait `grace`, then SIGKILL; return when no member is left. Idempotent."""
        with self._lock:
            if self.proc is None:
                return None
            if self.proc.returncode is None or group_members(self.proc.pid):
                self._reap_group(self.grace if grace is None else grace)
            code = self.proc.wait()
            if self._pump is not None:
                self._pump.join(timeout=2.0)
            return code

    def _leader_exited(self) -> bool:
        """Has the leader exited? Checked without reaping it, so its pid (= the group id) cannot be reused."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as err:  # pragma: no cover - another user's process took the group id
            if err.errno != errno.EPERM:
                raise

    def _reap_group(self, grace: float) -> None:
        assert self.proc is not None
        pgid = self.proc.pid
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        delay = POLL_FIRST
        while time.monotonic() < deadline:
            if self._leader_exited() and not [p for p in group_members(pgid) if p != pgid]:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        else:
            log.warning("tabby did not stop within %.1fs of SIGTERM: SIGKILL", grace)
        self._signal_group(signal.SIGKILL)  # whatever is left, children included
        end = time.monotonic() + 5.0
        while time.monotonic() < end and [p for p in group_members(pgid) if p != pgid]:
            time.sleep(0.005)
        self.proc.wait()
        code = self.proc.returncode
        log.info("tabby stopped (exit code %s)", code)
