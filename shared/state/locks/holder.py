"""Who holds a lock: the record of a process (pid, host, process start time, time) and whether it is gone.

One model for every lock: a holder on this host whose process is gone (or whose pid was reused by another process,
told by its start time in /proc) is dead; a holder on another host (another Modal container: its pid means nothing
here) cannot be judged by its process.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None without /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc, or None where there is no /proc."""
    fields = _stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[19]))


def proc_pgrp(pid: int) -> tuple[str, int] | None:
    """(state, process group) from /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[2]))


def host_id() -> str:
    """Where a pid means something: the Modal task (every container has its own pids and may share a host name
    with others), else the host name."""
    return os.environ.get("MODAL_TASK_ID") or socket.gethostname()


def iso(t: Any) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t if isinstance(t, int | float) else 0))


def say(line: str) -> None:
    """A progress line for the person waiting (stderr: stdout stays clean for `--json`)."""
    print(line, file=sys.stderr, flush=True)


def this_process() -> dict[str, Any]:
    stat = proc_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": host_id(),
        "proc_start": stat[1] if stat else None,
        "time": time.time(),
    }


def process_alive(info: dict[str, Any]) -> bool | None:
    """True/False for a process recorded on this host (pid reuse and zombies count as dead); None for another host."""
    if info.get("host") != host_id():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state in ("Z", "X"):
        return False
    recorded = info.get("proc_start")
    return recorded is None or recorded == start
