"""Warm hours (`TABBY_MODAL_WARM_HOURS`): when the GPU server keeps one container up, parsed and evaluated.

    Mon-Fri 08:00-19:00 Europe/Berlin          weekdays, Berlin wall-clock time (DST included)
    Mon-Fri 22:00-06:00 UTC                    overnight: each window starts on a listed day, ends the next
    Mon,Wed,Fri 09:00-12:00; Sat 10:00-14:00 America/New_York
    08:00-18:00                                every day, UTC

Grammar: `WINDOW[; WINDOW ...] [TIME_ZONE]`, WINDOW = `[DAYS] HH:MM-HH:MM`; DAYS is a comma list of days
(Mon..Sun, or full names) and day ranges (`Mon-Fri`, `Sat-Mon` wraps); no DAYS means every day; `24:00` may end
a window. The time zone is an IANA name (stdlib zoneinfo) and defaults to UTC. Times compare on the local wall
clock, so a 02:30 start on the spring-forward day simply begins at 03:00.

A base module (stdlib only): settings validates the value with `parse`, the maintenance app evaluates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
DAY_MINUTES = 24 * 60


class WarmHoursError(ValueError):
    """Bad warm hours: the message is one line saying what is wrong and how to write it."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday; the days the window *starts* on
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight of the start day, or of the next day when end <= start

    @property
    def overnight(self) -> bool:
        return self.end <= self.start


@dataclass(frozen=True)
class WarmHours:
    windows: tuple[Window, ...]
    tz_name: str
    text: str

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.tz_name)

    def is_warm(self, at: datetime) -> bool:
        """Whether `at` (timezone-aware) falls inside a window, on this schedule's wall clock."""
        if at.tzinfo is None:
            raise ValueError("is_warm needs a timezone-aware datetime")
        local = at.astimezone(self.tz)
        day, minute = local.weekday(), local.hour * 60 + local.minute
        for w in self.windows:
            if w.overnight:
                if (day in w.days and minute >= w.start) or ((day - 1) % 7 in w.days and minute < w.end):
                    return True
            elif day in w.days and w.start <= minute < w.end:
                return True
        return False

    def next_change(self, at: datetime, horizon_days: int = 8) -> datetime | None:
        """The first whole minute after `at` at which `is_warm` flips (UTC), or None if it never does."""
        now = self.is_warm(at)
        t = at.astimezone(UTC).replace(second=0, microsecond=0)
        for _ in range(horizon_days * DAY_MINUTES):
            t += timedelta(minutes=1)
            if self.is_warm(t) != now:
                return t
        return None


def _day(token: str, text: str) -> int:
    t = token.strip().lower()
    if t in DAYS:
        return DAYS.index(t)
    if t in _FULL:
        return _FULL.index(t)
    raise WarmHoursError(f"unknown day {token.strip()!r} in {text!r} (use Mon..Sun, Mon-Fri or Mon,Wed)")


def _days(spec: str, text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.split(","):
        if not part.strip():
            raise WarmHoursError(f"empty day in {text!r} (use Mon..Sun, Mon-Fri or Mon,Wed)")
        first, sep, last = part.partition("-")
        a = _day(first, text)
        if not sep:
            out.add(a)
            continue
        b = _day(last, text)
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Sat-Mon wraps over the week's end
    return frozenset(out)


def _minutes(token: str, text: str, *, end: bool) -> int:
    m = _TIME.match(token)
    if not m:
        raise WarmHoursError(f"bad time {token!r} in {text!r} (use HH:MM-HH:MM, e.g. 08:00-19:00)")
    hour, minute = int(m.group(1)), int(m.group(2))
    if (hour, minute) == (24, 0) and end:
        return DAY_MINUTES
    if hour > 23 or minute > 59:
        raise WarmHoursError(f"bad time {token!r} in {text!r} (00:00..23:59; 24:00 only as an end)")
    return hour * 60 + minute


def _window(spec: str, text: str) -> Window:
    tokens = spec.split()
    if not tokens or len(tokens) > 2:
        raise WarmHoursError(f"bad window {spec.strip()!r} in {text!r} (use [DAYS] HH:MM-HH:MM)")
    *day_spec, span = tokens
    first, sep, last = span.partition("-")
    if not sep:
        raise WarmHoursError(f"bad time range {span!r} in {text!r} (use HH:MM-HH:MM, e.g. 08:00-19:00)")
    start, end = _minutes(first, text, end=False), _minutes(last, text, end=True)
    if start == end % DAY_MINUTES and end != DAY_MINUTES:
        raise WarmHoursError(f"empty window {span!r} in {text!r} (a whole day is 00:00-24:00)")
    days = _days(day_spec[0], text) if day_spec else frozenset(range(7))
    return Window(days, start, end)


def parse(text: str) -> WarmHours | None:
    """The schedule in `text`, or None when it is empty (warm hours off). Raises WarmHoursError."""
    text = " ".join(text.split())
    if not text:
        return None
    body, tz_name = text, "UTC"
    last = text.rsplit(" ", 1)
    if (
        len(last) == 2
        and re.search("[A-Za-z]", last[1])
        and ":" not in last[1]
        and not _looks_like_days(last[1])
    ):
        body, tz_name = last
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise WarmHoursError(
            f"unknown time zone {tz_name!r} in {text!r} (an IANA name like Europe/Berlin or UTC)"
        ) from None
    windows = tuple(_window(part, text) for part in body.split(";"))
    return WarmHours(windows, tz_name, text)


def _looks_like_days(token: str) -> bool:
    return all(p.strip().lower() in DAYS + _FULL for p in re.split(r"[,-]", token) if p.strip())


def describe(hours: WarmHours | None, at: datetime) -> dict[str, object]:
    """For status views: {configured, warm, schedule, local_time, next_change}."""
    if hours is None:
        return {"configured": False, "warm": False, "schedule": "", "local_time": None, "next_change": None}
    change = hours.next_change(at)
    return {
        "configured": True,
        "warm": hours.is_warm(at),
        "schedule": hours.text,
        "local_time": at.astimezone(hours.tz).strftime("%a %H:%M %Z"),
        "next_change": None if change is None else change.astimezone(hours.tz).strftime("%a %H:%M %Z"),
    }
