"""Named points in the state code where a test can make the process die for real (SIGKILL, SIGINT), at a chosen step.

The crash tests of restore and reset need an interruption at an exact step of a real `tabby-modal` process: polling
from outside cannot hit a window of microseconds on a few hundred files. `TM_TEST_FAULT=NAME:N:SIGNAL` (e.g.
`restore:120:KILL`) makes the process send itself SIGNAL at the Nth call of `reached(NAME)`; with `NAME:count:FILE`
it writes how many times each point was reached to FILE at exit (to spread the faults evenly). Unset (always, outside
tests), `reached` is one dict lookup. The variable is not `TABBY_MODAL_*`: it is no setting.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
from pathlib import Path

ENV = "TM_TEST_FAULT"

_counts: dict[str, int] = {}
_plan: tuple[str, int, int] | None = None
_count_file: Path | None = None


def _load() -> None:
    global _plan, _count_file
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    name, at, what = [*spec.split(":", 2), "", ""][:3]
    if at == "count":
        _count_file = Path(what)
        atexit.register(lambda: _count_file.write_text(json.dumps(_counts)) if _count_file else None)
        _plan = (name, -1, 0)
        return
    _plan = (name, int(at), int(getattr(signal, f"SIG{what or 'KILL'}")))


_load()


def reached(name: str) -> None:
    """A step of `name` is about to happen; dies here if the test asked for this step."""
    if _plan is None:
        return
    n = _counts[name] = _counts.get(name, 0) + 1
    if _plan[0] == name and _plan[1] == n:
        os.kill(os.getpid(), _plan[2])
