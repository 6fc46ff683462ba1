"""The one wait loop of the polling locks (the store lock file and the leases): try to take the lock; when someone
holds it, break that holder if it is gone, else wait, saying who we wait for every `report` seconds, and give up
after `wait` seconds naming the holder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

WAIT_REPORT = 5.0  # seconds between "waiting for ..." lines
UNLOCK_HINT = "if that run is dead, `tabby-modal unlock --yes` breaks it"

Holder = TypeVar("Holder")


def take_or_wait(
    take: Callable[[], bool],
    look: Callable[[], Holder | None],
    why_gone: Callable[[Holder], str | None],
    break_gone: Callable[[Holder, str], object],
    *,
    wait: float,
    report: float,
    on_wait: Callable[[str], None],
    waiting_line: Callable[[Holder], str],
    give_up: Callable[[Holder], Exception],
    sleep: Callable[[float], object],
    poll: float,
) -> None:
    """Return once `take()` succeeds. Between tries: `look()` is the holder (None: it went meanwhile, try again at
    once); a holder `why_gone` gives a reason for is broken with `break_gone(holder, why)` and we try again at once;
    a live one is waited for, `poll` seconds at a time, up to `wait` seconds in all, with `on_wait(waiting_line(h))`
    every `report` seconds; then `give_up(holder)` is raised."""
    start = time.monotonic()
    deadline, next_report = start + wait, start + report
    while True:
        if take():
            return
        held = look()
        if held is None:
            continue  # released between our try and our look
        why = why_gone(held)
        if why is not None:
            break_gone(held, why)
            continue
        now = time.monotonic()
        if now >= deadline:
            raise give_up(held)
        if now >= next_report:
            next_report = now + report
            on_wait(waiting_line(held))
        sleep(poll)
