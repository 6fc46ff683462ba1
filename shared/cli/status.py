"""`tabby-modal status [--local DIR] [--json]`: is it up, is it safe, and what to do next.

Exit 0 when all is well (a local DIR that nothing serves is well: "not running" is information), 1 when something
needs a person (each such line carries the command to run, as it runs), 2 on bad input (a `--local` path that is not
such a DIR). Without Modal credentials it still prints what it knows (settings, warm hours, image) and says what
it could not check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.cli.common import (
    EXIT_PROBLEMS,
    CommandError,
    cli,
    emit,
    get_settings,
    handled,
    has_modal_credentials,
    json_option,
    local_option,
)
from shared.cli.state import check_local
from shared.operations import local_server, status

MARK = {"ok": "ok ", "info": "   ", "problem": "BAD", "unknown": " ? "}


def render(r: dict[str, Any]) -> str:
    width = max(len(i["name"]) for i in r["items"])
    lines = []
    for i in r["items"]:
        lines.append(f"{MARK[i['state']]}  {i['name']:<{width}}  {i['detail']}")
        if i["next"]:
            lines.append(f"     {'':<{width}}  -> {i['next']}")
    if r["ok"]:
        tail = "all well" + (f" (not checked: {', '.join(r['unchecked'])})" if r["unchecked"] else "")
    else:
        tail = f"{r['problems']} thing(s) need a person"
    lines.append(tail)
    return "\n".join(lines)


@cli.command("status")
@local_option
@json_option
@handled
def status_cmd(local: str | None, as_json: bool) -> None:
    """One screen: server URL and containers, warm hours, Tabby versions, owner, last persist, backups, leases."""
    settings = get_settings()
    if local is not None:
        if (wrong := local_server.layout_error(Path(local))) is not None:
            raise CommandError(wrong)
        check_local(local)  # no such DIR, or a folder that is not one: exit 2 as for the state commands
        try:
            result = status.local_status(settings, local)
        except OSError as err:  # unreadable DIR and the like: one line, not a traceback
            raise CommandError(f"cannot read {local}: {err.strerror or err}: {err.filename}") from None
    else:
        credentials = has_modal_credentials()
        ops = None
        if credentials:
            from shared.operations.remote import RemoteOps

            ops = RemoteOps(settings)
        result = status.remote_status(settings, credentials=credentials, ops=ops)
    emit(result, as_json, render)
    if not result["ok"]:
        raise SystemExit(EXIT_PROBLEMS)
