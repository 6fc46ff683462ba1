"""One view of an instance: is it up, is it safe, and the exact next command for anything that is wrong.

Each line is an item {name, state, detail, next}: state `ok`, `info`, `problem` (a person should act: exit 1) or
`unknown` (could not be checked, and why). Sources are asked once each and may fail alone:
- settings (always; bad settings never get here: the CLI exits 2 first) and the warm hours, computed here;
- the server: locally the `serve` holding DIR (its serve.lock record) and its proxy's answer; on Modal the deployed
  `Tabby` class's stats (`web.get_current_stats()`, the lookup the maintenance checks use) and its URL;
- the state: `inspect` of the data dir and store (locally in-process, on Modal through the maintenance app):
  users and owner, schema, last persist, newest snapshot, leases, and the upgrade record.
"""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import warm_hours
from shared.operations import cron, local_server, versions
from shared.state.errors import StateError
from shared.state.locks import serve_lock

if TYPE_CHECKING:
    from shared.settings import Settings

OK, INFO, PROBLEM, UNKNOWN = "ok", "info", "problem", "unknown"


def item(name: str, state: str, detail: str, next_cmd: str | None = None) -> dict[str, Any]:
    return {"name": name, "state": state, "detail": detail, "next": next_cmd}


def age_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def snapshot_time(snapshot_id: str) -> float | None:
    """The time in a snapshot id (`20260101T030000Z-ab12-label`)."""
    try:
        return datetime.strptime(snapshot_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class Commands:
    """The next commands, spelled for the form in use: each runs as printed (`--local DIR` carries the real DIR)."""

    def __init__(self, local: str | None, setup_token: str | None = None) -> None:
        self.local = local
        self.flag = f" --local {shlex.quote(local)}" if local is not None else ""
        self.setup_token = setup_token

    def tm(self, args: str) -> str:
        return f"tabby-modal {args}{self.flag}"

    def start_server(self) -> str:
        return self.tm("serve") if self.local is not None else "make deploy-server"

    def claim(self, url: str | None) -> str:
        """How to register the owner. Locally the real link, or first the .env line that makes one possible; on
        Modal the token sits in the Modal secret, which this machine may not have."""
        if self.local is None:
            return (
                f"open {url or '<server URL>'}/_setup?token=<TABBY_MODAL_SETUP_TOKEN> and register the owner"
            )
        if self.setup_token:
            return f"open {url}/_setup?token={self.setup_token} and register the owner"
        token = uuid.uuid4()
        return (
            f"add the line TABBY_MODAL_SETUP_TOKEN={token} to .env, (re)start `{self.start_server()}`, then open "
            f"{url}/_setup?token={token} and register the owner"
        )

    def backup(self) -> str:
        return self.tm("snapshot --label manual") if self.local is not None else "make backup-volume"


# --- the parts ------------------------------------------------------------------------------------------------


def warm_item(
    settings: Settings, now: float, containers: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = warm_hours.describe(warm_hours.parse(settings.warm_hours), datetime.fromtimestamp(now, UTC))
    if not doc["configured"]:
        return item(
            "warm hours", INFO, "off (TABBY_MODAL_WARM_HOURS is empty): scales to zero when idle"
        ), doc
    detail = (
        f"{'on' if doc['warm'] else 'off'} now ({doc['local_time']}; {doc['schedule']}); "
        f"next change {doc['next_change']}"
    )
    if doc["warm"] and containers == 0:
        detail += "; no container runs yet (the scheduled run starts one within 5 min)"
    return item("warm hours", INFO, detail), doc


def tabby_items(settings: Settings, report: dict[str, Any] | None, c: Commands) -> list[dict[str, Any]]:
    configured = versions.tag_of(settings.tabby_image)
    recorded = ((report or {}).get("tabby") or {}).get("recorded")
    db = (report or {}).get("db") or {}
    schema = db.get("schema_version")
    bits = [f"image {settings.tabby_image}"]
    if recorded:
        bits.append(
            f"last upgrade deployed {recorded.get('version')} ({recorded.get('outcome', 'ok')}, {recorded.get('time')})"
        )
    if schema is not None:
        written = versions.written_by({"history": [recorded] if recorded else []}, schema)
        bits.append(f"database schema {schema}" + (f" (Tabby {written['version']})" if written else ""))
    state, nxt = INFO, None
    if recorded and recorded.get("outcome", "ok") == "ok" and recorded.get("version") != configured:
        state = PROBLEM
        bits.append(f"settings say {configured} but the record says {recorded.get('version')} runs")
        nxt = (
            f"make upgrade TABBY_IMAGE={settings.tabby_image}"
            if c.local is None
            else c.tm(f"upgrade --image {settings.tabby_image}")
        )
    return [item("tabby", state, "; ".join(bits), nxt)]


def state_items(
    settings: Settings, report: dict[str, Any], now: float, c: Commands, url: str | None
) -> list[dict[str, Any]]:
    out = []
    if cut := report.get("interrupted"):  # the lines below describe a mix of two states until this is done
        back = f"; `{cut['rollback']}` goes back to the state before it" if cut.get("rollback") else ""
        out.append(item("data dir", PROBLEM, f"holds {cut['describe']}{back}", cut["finish"]))
    db = report.get("db") or {}
    if not db.get("present"):
        out.append(
            item(
                "users",
                PROBLEM,
                "no database yet: a fresh instance, nobody owns it",
                c.claim(url),
            )
        )
    else:
        integrity = db.get("integrity")
        if integrity not in (None, "ok"):
            out.append(
                item(
                    "database",
                    PROBLEM,
                    f"integrity {integrity}",
                    restore_hint(report, c),
                )
            )
        users, owner = db.get("users", 0), db.get("owner")
        if owner:
            out.append(item("users", OK, f"{users} user(s); the owner exists"))
        else:
            out.append(
                item(
                    "users",
                    PROBLEM,
                    f"{users} user(s) and no owner: anyone with the setup token can claim it",
                    c.claim(url),
                )
            )
    last = report.get("last_persist")
    if report.get("manifest_problem"):
        out.append(item("last persist", PROBLEM, report["manifest_problem"], c.tm("verify")))
    elif last and last.get("age_seconds") is not None:
        out.append(item("last persist", OK, f"{last['time']} ({age_text(last['age_seconds'])} ago)"))
    else:
        out.append(item("last persist", INFO, "none yet (the server persists while it runs)"))
    out.append(backup_item(settings, report.get("snapshots") or {}, now, c))
    out.extend(lease_items(report.get("locks") or {}, c))
    return out


def restore_hint(report: dict[str, Any], c: Commands) -> str:
    """A restore command that runs as printed: the newest snapshot by its id (`snapshots` lists the others)."""
    newest = (report.get("snapshots") or {}).get("newest")
    return c.tm(f"restore {newest}") if newest else c.tm("snapshots")


def backup_item(settings: Settings, snaps: dict[str, Any], now: float, c: Commands) -> dict[str, Any]:
    newest = snaps.get("newest")
    if not newest:
        return item("backups", PROBLEM, "no snapshot yet", c.backup())
    taken = snapshot_time(newest)
    if taken is None:
        return item("backups", INFO, f"newest {newest} ({snaps.get('count')} snapshots)")
    age = now - taken
    detail = f"newest {newest}, {age_text(age)} old; {snaps.get('count')} snapshots"
    if not settings.backup_schedule:
        return item("backups", INFO, detail + "; scheduled backups are off (TABBY_MODAL_BACKUP_SCHEDULE)")
    gap = cron.max_gap_seconds(settings.backup_schedule, datetime.fromtimestamp(now, UTC))
    if gap is not None and age > 2 * gap:
        nxt = c.backup()
        if c.local is None:
            nxt += f"; then check the schedule: modal app logs {settings.maintenance_app}"
        return item(
            "backups",
            PROBLEM,
            f"{detail}: older than twice the schedule ({settings.backup_schedule!r}, every {age_text(gap)})",
            nxt,
        )
    return item("backups", OK, detail)


def lease_items(locks: dict[str, Any], c: Commands) -> list[dict[str, Any]]:
    out = []
    for key, rec in sorted(locks.items()):
        if not rec:
            continue
        if rec.get("live"):
            out.append(item(f"{key} lease", INFO, f"held: {rec.get('describe')}"))
        else:
            out.append(
                item(
                    f"{key} lease",
                    INFO,
                    f"expired, left by a run that ended: {rec.get('describe') or rec}",
                    c.tm("unlock"),
                )
            )
    if not out:
        out.append(item("leases", OK, "none held"))
    return out


def summary(items: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    problems = [i for i in items if i["state"] == PROBLEM]
    return {
        "ok": not problems,
        "problems": len(problems),
        "unchecked": [i["name"] for i in items if i["state"] == UNKNOWN],
        "items": items,
        **facts,
    }


# --- the two forms ----------------------------------------------------------------------------------------------


def local_status(settings: Settings, local: str, *, now: float | None = None) -> dict[str, Any]:
    """Status of `--local DIR`: the `serve` holding DIR, and DIR's data and backups."""
    from shared.operations.maintenance import for_local

    now = time.time() if now is None else now
    c = Commands(local, settings.setup_token.get_secret_value() if settings.setup_token else None)
    root = settings.local_dirs(local)["root"]
    items = [item("settings", OK, f"valid; local form on {root}")]
    run = local_server.running(root)
    url = run["url"] if run else f"http://127.0.0.1:{settings.local_port}"
    stray = serve_lock.orphan(root) if run is None else None
    if stray is not None:  # a `serve` killed with SIGKILL left its Tabby (own process group) holding the port
        items.append(
            item(
                "server",
                PROBLEM,
                f"not running, but the Tabby (pid {stray['pid']}) of a `serve` that died still runs"
                f" (it keeps its port): the next serve ends it first",
                c.tm("serve"),
            )
        )
    # Not running is information, not a problem: a stopped local server is a normal state (after a restore, say).
    elif run is None:
        items.append(item("server", INFO, f"not running (nothing serves {root})", c.start_server()))
    else:
        code = local_server.probe(run["url"]) if run["url"] else None
        if code is None or code == 503:
            why = "starting (503)" if code == 503 else "its proxy does not answer"
            items.append(item("server", INFO, f"pid {run['pid']} since {run.get('started')}: {why}"))
        else:
            items.append(
                item("server", OK, f"up at {run['url']} (pid {run['pid']}, since {run.get('started')})")
            )
    warm, hours = warm_item(settings, now, None)
    items.append({**warm, "detail": warm["detail"] + " (applies on Modal only)"})
    report: dict[str, Any] | None = None
    try:
        report = for_local(settings, local).inspect()
    except StateError as err:
        items.append(item("state", PROBLEM if Path(root).exists() else UNKNOWN, str(err), c.start_server()))
    items[2:2] = tabby_items(settings, report, c)
    if report is not None:
        items.extend(state_items(settings, report, now, c, url))
    return summary(
        items, {"form": "local", "url": url, "server": run, "warm_hours": hours, "inspect": report}
    )


def remote_status(
    settings: Settings,
    *,
    credentials: bool,
    now: float | None = None,
    ops: Any = None,
    server: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Status on Modal. `server()` returns {containers, url} or raises NotFoundError; `ops` is a RemoteOps."""
    now = time.time() if now is None else now
    c = Commands(None)
    items = [item("settings", OK, "valid")]
    warm, hours = warm_item(settings, now, None)
    if not credentials:
        items.append(
            item(
                "credentials",
                PROBLEM,
                "none: Modal was not asked",
                "modal token new (or set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET)",
            )
        )
        for name in ("server", "users", "last persist", "backups", "leases"):
            items.append(item(name, UNKNOWN, "not checked: no Modal credentials"))
        items.extend([warm, *tabby_items(settings, None, c)])
        return summary(
            items, {"form": "modal", "url": None, "server": None, "warm_hours": hours, "inspect": None}
        )
    items.append(item("credentials", OK, "token found"))
    info: dict[str, Any] | None = None
    try:
        info = (server or (lambda: server_info(settings)))()
    except Exception as err:
        from modal.exception import NotFoundError

        if isinstance(err, NotFoundError):
            items.append(item("server", PROBLEM, f"{settings.server_app} is not deployed", c.start_server()))
        else:
            items.append(item("server", UNKNOWN, f"could not ask Modal: {type(err).__name__}: {err}"))
    url = (info or {}).get("url")
    if info is not None:
        n = info.get("containers")
        running = (
            f"{n} container(s) running" if n else "deployed, scaled to zero (starts on the first request)"
        )
        items.append(item("server", OK, f"{url}: {running}"))
        if "inference" in info:
            items.append(inference_item(settings, info["inference"]))
    warm, hours = warm_item(settings, now, (info or {}).get("containers"))
    items.append(warm)
    report = None
    try:
        report = ops.inspect() if ops is not None else None
    except StateError as err:
        nxt = "make deploy-maintenance" if "not deployed" in str(err) else None
        items.append(item("state", PROBLEM if nxt else UNKNOWN, str(err), nxt))
    items.extend(tabby_items(settings, report, c))
    if report is not None:
        items.extend(state_items(settings, report, now, c, url))
    return summary(
        items, {"form": "modal", "url": url, "server": info, "warm_hours": hours, "inspect": report}
    )


def server_info(settings: Settings) -> dict[str, Any]:
    """{containers, url} of the deployed server (NotFoundError when it is not deployed)."""
    import modal

    cls = modal.Cls.from_name(settings.server_app, "Tabby", environment_name=settings.modal_environment)
    web = cls().web
    stats = web.get_current_stats()
    info: dict[str, Any] = {
        "containers": int(stats.num_total_runners),
        "backlog": int(stats.backlog),
        "url": web.get_web_url(),
    }
    if settings.inference == "split":  # split mode (issue 20): the GPU side too
        info["inference"] = inference_info(settings)
    return info


def inference_info(settings: Settings) -> dict[str, Any]:
    """{containers, backlog, url} of split mode's Inference class, or {error} when Modal cannot say."""
    import modal

    try:
        cls = modal.Cls.from_name(
            settings.server_app, "Inference", environment_name=settings.modal_environment
        )
        web = cls().web
        stats = web.get_current_stats()
        return {
            "containers": int(stats.num_total_runners),
            "backlog": int(stats.backlog),
            "url": web.get_web_url(),
        }
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def inference_item(settings: Settings, info: dict[str, Any]) -> dict[str, Any]:
    """Split mode's status line for the GPU side."""
    if "error" in info:
        if "NotFound" in info["error"]:
            return item(
                "inference",
                PROBLEM,
                f"{settings.server_app} has no Inference class (TABBY_MODAL_INFERENCE=split)",
                "make deploy-server",
            )
        return item("inference", UNKNOWN, f"could not ask Modal: {info['error']}")
    n = info.get("containers")
    limit = settings.inference_max_containers
    running = f"{n} GPU container(s) of at most {limit} running" if n else "scaled to zero (starts on demand)"
    backlog = f", {info['backlog']} request(s) waiting" if info.get("backlog") else ""
    return item("inference", OK, f"{info.get('url')}: {running}{backlog}")
