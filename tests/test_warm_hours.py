"""Warm hours: the parser (time zones, DST, overnight windows, day ranges and lists, bad input), the setting, the
scheduled run against a stand-in of the deployed class, and the maintenance app's schedule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from modal.exception import NotFoundError

from shared import warm_hours
from shared.operations import warm
from shared.settings import SettingsError, load_settings
from shared.state.errors import StateError
from tests.conftest import run_cli
from tests.test_warmer_app import import_fresh


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_weekdays_in_berlin_follow_daylight_saving():
    h = warm_hours.parse("Mon-Fri 08:00-19:00 Europe/Berlin")
    assert h is not None and h.tz_name == "Europe/Berlin"
    # Winter (CET, UTC+1): Monday 2026-03-23.
    assert not h.is_warm(utc(2026, 3, 23, 6, 59))  # 07:59 in Berlin
    assert h.is_warm(utc(2026, 3, 23, 7, 0))  # 08:00
    assert h.is_warm(utc(2026, 3, 23, 17, 59))  # 18:59
    assert not h.is_warm(utc(2026, 3, 23, 18, 0))  # 19:00
    # Summer (CEST, UTC+2) after the switch on Sunday 2026-03-29: the same wall clock, an hour earlier in UTC.
    assert h.is_warm(utc(2026, 3, 30, 6, 0))  # 08:00
    assert not h.is_warm(utc(2026, 3, 30, 17, 0))  # 19:00
    # The weekend, and a weekday judged by Berlin's date, not UTC's: Friday 23:30 UTC is Saturday in Berlin.
    assert not h.is_warm(utc(2026, 3, 28, 10, 0))
    assert not h.is_warm(utc(2026, 3, 27, 23, 30))


def test_a_window_across_the_spring_forward_gap_and_the_fall_back_hour():
    h = warm_hours.parse("02:30-03:30 Europe/Berlin")
    assert h is not None
    assert h.is_warm(utc(2026, 3, 29, 1, 0))  # 03:00 CEST: 02:30 never happened, the window still holds
    assert not h.is_warm(utc(2026, 3, 29, 1, 30))  # 03:30 CEST
    assert h.is_warm(utc(2026, 10, 25, 0, 45))  # 02:45 CEST, first pass
    assert h.is_warm(utc(2026, 10, 25, 1, 45))  # 02:45 CET, second pass


def test_overnight_windows_start_on_the_listed_days():
    h = warm_hours.parse("Mon-Fri 22:00-06:00")
    assert h is not None and h.tz_name == "UTC"
    assert h.is_warm(utc(2026, 3, 27, 23, 0))  # Friday night
    assert h.is_warm(utc(2026, 3, 28, 5, 59))  # ... into Saturday morning
    assert not h.is_warm(utc(2026, 3, 28, 6, 0))
    assert not h.is_warm(utc(2026, 3, 23, 3, 0))  # Monday early: Sunday night is not listed
    assert h.is_warm(utc(2026, 3, 24, 3, 0))  # Tuesday early: Monday night
    assert not h.is_warm(utc(2026, 3, 24, 12, 0))


def test_day_lists_wrapping_ranges_several_windows_and_every_day():
    h = warm_hours.parse("Mon,Wed 09:00-12:00; Sat-Mon 10:00-11:00 America/New_York")
    assert h is not None and h.tz_name == "America/New_York"
    assert [sorted(w.days) for w in h.windows] == [[0, 2], [0, 5, 6]]
    assert h.is_warm(utc(2026, 3, 22, 14, 30))  # Sunday 10:30 EDT
    assert h.is_warm(utc(2026, 3, 25, 13, 0))  # Wednesday 09:00 EDT
    assert not h.is_warm(utc(2026, 3, 24, 13, 0))  # Tuesday
    every = warm_hours.parse("  08:00-18:00   Asia/Tokyo ")
    assert every is not None and every.text == "08:00-18:00 Asia/Tokyo" and len(every.windows[0].days) == 7
    whole = warm_hours.parse("Saturday,sunday 00:00-24:00")
    assert whole is not None and whole.is_warm(utc(2026, 3, 29, 23, 59))
    assert warm_hours.parse("") is None and warm_hours.parse("   ") is None


def test_next_change_and_describe():
    h = warm_hours.parse("Mon-Fri 08:00-19:00 Europe/Berlin")
    at = utc(2026, 3, 27, 12, 0)  # Friday 13:00 CET
    assert h.next_change(at) == utc(2026, 3, 27, 18, 0)
    doc = warm_hours.describe(h, at)
    assert doc["warm"] and doc["local_time"] == "Fri 13:00 CET" and doc["next_change"] == "Fri 19:00 CET"
    # Off until Monday 08:00, which is summer time by then.
    assert warm_hours.describe(h, utc(2026, 3, 27, 18, 0))["next_change"] == "Mon 08:00 CEST"
    assert warm_hours.describe(None, at) == {
        "configured": False,
        "warm": False,
        "schedule": "",
        "local_time": None,
        "next_change": None,
    }


@pytest.mark.parametrize(
    "text, words",
    [
        ("Mox-Fri 08:00-19:00", "unknown day 'Mox'"),
        ("Mon-Fri 8-19", "bad time '8'"),
        ("Mon-Fri 0800", "bad time range '0800'"),
        ("Mon-Fri 08:00-25:00", "bad time '25:00'"),
        ("Mon-Fri 08:61-19:00", "bad time '08:61'"),
        ("Mon-Fri 24:00-06:00", "bad time '24:00'"),
        ("Mon-Fri 08:00-08:00", "empty window '08:00-08:00'"),
        ("Mon-Fri 08:00-19:00 Europe/Berlim", "unknown time zone 'Europe/Berlim'"),
        ("Mon-Fri 08:00-19:00 ../../etc/passwd", "unknown time zone"),
        ("Mon,,Fri 08:00-19:00", "empty day"),
        ("Mon-Fri 08:00-19:00;", "bad window"),
        ("Mon Tue 08:00-19:00 extra UTC", "bad window"),
    ],
)
def test_bad_input_is_one_line_naming_the_variable(no_modal_env, text, words):
    with pytest.raises(warm_hours.WarmHoursError) as err:
        warm_hours.parse(text)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SettingsError) as err:
        load_settings(None, warm_hours=text)
    assert str(err.value).startswith("TABBY_MODAL_WARM_HOURS: ") and words in str(err.value)


def test_bad_warm_hours_stop_the_cli_with_exit_2(tmp_path):
    (tmp_path / ".env").write_text("TABBY_MODAL_WARM_HOURS=Mon-Fri 08:00-19:00 Mars/Olympus\n")
    proc = run_cli(["config"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: TABBY_MODAL_WARM_HOURS: unknown time zone 'Mars/Olympus' in "
        "'Mon-Fri 08:00-19:00 Mars/Olympus' (an IANA name like Europe/Berlin or UTC)"
    ]


class DeployedTabby:
    """Stands in for `modal.Cls.from_name(app, "Tabby")()`: the autoscaler override Modal keeps per class."""

    def __init__(self, deployed: bool = True) -> None:
        self.deployed = deployed
        self.calls: list[int] = []

    def __call__(self, settings):
        if not self.deployed:
            raise NotFoundError("Lookup failed for Cls 'Tabby' from the 'tabby-server' app")
        return self

    def update_autoscaler(self, *, min_containers=None, **_):
        self.calls.append(min_containers)
        return type("FunctionAutoscalerSettings", (), {"min_containers": min_containers})()


def test_the_scheduled_run_sets_what_the_hours_say_now(no_modal_env):
    s = load_settings(None, warm_hours="Mon-Fri 08:00-19:00 Europe/Berlin")
    tabby = DeployedTabby()
    on = warm.apply_schedule(s, utc(2026, 3, 23, 9, 0), instance=tabby)
    off = warm.apply_schedule(s, utc(2026, 3, 28, 9, 0), instance=tabby)
    assert tabby.calls == [1, 0]
    assert on["warm"] and on["min_containers"] == 1 and on["applied"]
    assert not off["warm"] and off["min_containers"] == 0
    # Off: the run touches nothing (a hand-made `tabby-modal warm` stays until `cold`).
    assert not warm.apply_schedule(load_settings(None), instance=tabby)["applied"]
    assert tabby.calls == [1, 0]
    with pytest.raises(StateError, match="not deployed: run `make deploy-server`"):
        warm.apply_schedule(s, utc(2026, 3, 23, 9, 0), instance=DeployedTabby(deployed=False))


def test_the_maintenance_app_schedules_the_run_only_with_warm_hours(no_modal_env, monkeypatch):
    app = import_fresh("apps.maintenance")
    assert app.warm_hours.info().schedule is None
    monkeypatch.setenv("TABBY_MODAL_WARM_HOURS", "Mon-Fri 08:00-19:00 Europe/Berlin")
    app = import_fresh("apps.maintenance")
    info = app.warm_hours.info()
    assert info.schedule is not None and "*/5 * * * *" in repr(info.schedule)
    assert info.gpus == [] and info.volumes == {}
    assert "TABBY_MODAL_WARM_HOURS" in info.secrets[0]  # the resolved settings, carried as the function's env


def test_warm_and_cold_need_credentials(tmp_path):
    for cmd in ("warm", "cold"):
        proc = run_cli([cmd], tmp_path)
        assert proc.returncode == 2 and "No Modal credentials" in proc.stderr
