"""How far apart a 5-field cron schedule fires (for "is the newest snapshot too old?").

Minute, hour, day of month, month, day of week with `*`, lists, ranges and `/steps`; as in cron, when both day
fields are restricted a day matches either. Evaluated in UTC (the backup schedule is UTC) over about a year.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

_NAMES = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
    "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12,
    "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6,
}  # fmt: skip
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _value(token: str) -> int:
    return _NAMES[token.lower()] if token.lower() in _NAMES else int(token)


def _field(spec: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in spec.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            first, last = base.split("-", 1)
            a, b = _value(first), _value(last)
        else:
            a = b = _value(base)
            if step:
                b = hi
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise ValueError(f"cron field {spec!r} out of range {lo}-{hi}")
        out.update(range(a, b + 1, int(step) if step else 1))
    return out


def firings(expr: str, start: datetime, days: int = 400) -> list[datetime]:
    """Every firing of `expr` in [start, start + days) (UTC), in order."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"not a 5-field cron expression: {expr!r}")
    minutes, hours, doms, months, dows = (_field(f, *r) for f, r in zip(fields, _RANGES, strict=True))
    dows = {d % 7 for d in dows}  # 7 is Sunday too
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    day0 = start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    out = []
    for i in range(days):
        day = day0 + timedelta(days=i)
        if day.month not in months:
            continue
        dom_ok, dow_ok = day.day in doms, (day.weekday() + 1) % 7 in dows
        if not (dom_ok and dow_ok if dom_any or dow_any else dom_ok or dow_ok):
            continue
        out.extend(day.replace(hour=h, minute=m) for h in sorted(hours) for m in sorted(minutes))
    return [t for t in out if t >= start]


def max_gap_seconds(expr: str, start: datetime | None = None) -> float | None:
    """The longest time between two firings over the next year, or None when it fires less than twice."""
    times = firings(expr, start or datetime.now(UTC))
    if len(times) < 2:
        return None
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))
