"""`tabby-modal warm` / `cold`: keep one server container up, or let it scale to zero, by hand.

Both set the deployed server's `min_containers` (Modal's `update_autoscaler`); a server deploy resets it, and with
warm hours set the maintenance app's scheduled run puts back what the hours say within a few minutes.
"""

from __future__ import annotations

from typing import Any

from shared.cli.common import cli, emit, get_settings, handled, json_option, require_modal_credentials, say
from shared.cli.state import run_op
from shared.operations import warm


def _set(n: int, as_json: bool) -> None:
    require_modal_credentials()
    settings = get_settings()
    result = run_op(lambda: warm.set_min_containers(settings, n))
    hours = warm.wanted(settings)
    if hours["configured"] and hours["min_containers"] != n:
        say(
            f"note: warm hours ({hours['schedule']}) say min_containers={hours['min_containers']} now: "
            f"the scheduled run sets that again within {warm.CHECK_MINUTES} minutes"
        )

    def human(r: dict[str, Any]) -> str:
        gpus = (
            f"; inference keeps {r['inference_min_containers']} GPU container(s) up"
            if "inference_min_containers" in r
            else ""
        )
        if n:
            return (
                f"warm: {r['server_app']} keeps {r['min_containers']} container up (until `tabby-modal cold`)"
                + gpus
            )
        return f"cold: {r['server_app']} scales to zero when idle" + gpus

    emit({**result, "warm_hours": hours}, as_json, human)


@cli.command("warm")
@json_option
@handled
def warm_cmd(as_json: bool) -> None:
    """Keep one server container running (min_containers=1) until `cold` or the next server deploy."""
    _set(warm.WARM_CONTAINERS, as_json)


@cli.command("cold")
@json_option
@handled
def cold_cmd(as_json: bool) -> None:
    """Let the server scale to zero when idle (min_containers=0)."""
    _set(0, as_json)


@cli.command("apply-warm-hours")
@json_option
@handled
def apply_warm_hours_cmd(as_json: bool) -> None:
    """Set min_containers to what the warm hours say now (every toolkit deploy runs it: a deploy resets it)."""
    require_modal_credentials()
    settings = get_settings()
    result = run_op(lambda: warm.apply_schedule(settings))

    def human(r: dict[str, Any]) -> str:
        if not r["applied"]:
            return "warm hours are off: min_containers left as deployed"
        return f"warm hours {'on' if r['warm'] else 'off'} ({r['schedule']}): min_containers={r['min_containers']}"

    emit(result, as_json, human)
