"""Safe Tabby upgrades with rollback: `tabby-modal upgrade --image tabbyml/tabby:X.Y.Z [--local DIR]`.

    refuse an unpinned tag  ->  stop the server (its last state is persisted)
    snapshot `pre-upgrade-<old>-to-<new>`, verified  ->  deploy the new image (locally: restart `serve --local`
    with the new binary)  ->  wait for readiness  ->  smoke checks (with a token)
    ok:      record {image, version, schema} in the store's tabby-versions.json; write the tag to .env
    failed:  stop, restore the pre-upgrade snapshot (maintenance rules: server stopped, leases), redeploy the old
             image (locally: the old binary), wait, smoke; record the failure; .env keeps the old tag

`--rollback` runs the second half for the last recorded upgrade. The deploy target is a seam: `LocalTarget` (serve
--local restarts) or `ModalTarget` (`modal app stop`, `modal deploy -m apps.server --strategy recreate`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.operations import local_server, versions
from shared.operations.smoke import smoke
from shared.state import database
from shared.state.atomic import write_bytes
from shared.state.errors import StateError

if TYPE_CHECKING:
    from shared.settings import Settings

IMAGE_VAR = "TABBY_MODAL_TABBY_IMAGE"
Say = Callable[[str], None]


class Target(Protocol):
    """Where Tabby runs: stop it, deploy an image, wait until it answers (returns its URL)."""

    def stop(self) -> None: ...
    def deploy(self, image: str) -> None: ...
    def ready(self) -> str: ...
    def running_schema(self) -> dict[str, Any] | None: ...


# --- settings stay the single source ---------------------------------------------------------------------------


def write_env(path: Path, key: str, value: str) -> None:
    """Set `key=value` in the .env file at `path`: other lines kept as they are, the file replaced atomically."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        lines, mode = [], 0o644
    line = f"{key}={value}\n"
    out, done = [], False
    for ln in lines:
        name = ln.strip().removeprefix("export ").split("=", 1)[0].strip()
        if name == key and not ln.lstrip().startswith("#"):
            if not done:
                out.append(line)
                done = True
            continue  # a duplicate would win or lose depending on the reader: keep one
        out.append(ln)
    if not done:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(line)
    write_bytes(path, "".join(out).encode(), mode=mode)


# --- the two targets -------------------------------------------------------------------------------------------


class LocalTarget:
    """`serve --local DIR`: a deploy is a restart of the serve process with the image's Tabby binary."""

    def __init__(
        self, settings: Settings, local: str, binaries: dict[str, str], port: int | None = None
    ) -> None:
        self.settings = settings
        self.root = settings.local_dirs(local)["root"]
        self.binaries = binaries  # image -> Tabby binary
        self.port = port or settings.local_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.timeout = float(settings.startup_timeout) + 60

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)
        local_server.stop(self.root, timeout=120)

    def deploy(self, image: str) -> None:
        binary = self.binaries.get(image)
        if not binary:
            raise StateError(
                f"no Tabby binary known for {image}: set TABBY_BIN to it and start "
                f"`tabby-modal serve --local {shlex.quote(str(self.root))}`"
            )
        self.proc = local_server.start(self.root, tabby_bin=binary, port=self.port, image=image)

    def ready(self) -> str:
        return local_server.wait_ready(self.root, self.proc, self.timeout)["url"]

    def running_schema(self) -> dict[str, Any] | None:
        return database.read_schema_version(
            self.settings.local_dirs(str(self.root))["live"] / "ee" / "db.sqlite"
        )


class ModalTarget:
    """The server app on Modal, driven through modal's CLI (`run` is the seam tests replace)."""

    def __init__(
        self,
        settings: Settings,
        *,
        run: Callable[[list[str], dict[str, str]], None] | None = None,
        server_info: Callable[[], dict[str, Any]] | None = None,
        containers: Callable[[], int] | None = None,
        probe: Callable[[str], int | None] | None = None,
        poll: float = 5.0,
    ) -> None:
        from shared.operations import maintenance, status

        self.settings = settings
        self.run = run or _run_modal
        self.server_info = server_info or (lambda: status.server_info(settings))
        self.containers = containers or maintenance.server_containers(settings)
        self.probe = probe or local_server.probe
        self.poll = poll
        self.timeout = float(settings.startup_timeout) + 600

    def _modal(self, words: list[str], rest: list[str]) -> list[str]:
        env = ["-e", self.settings.modal_environment] if self.settings.modal_environment else []
        return [str(Path(sys.executable).parent / "modal"), *words, *env, *rest]

    def stop(self) -> None:
        try:
            self.run(self._modal(["app", "stop"], [self.settings.server_app]), {})
        except StateError:
            if self.containers():
                raise  # it runs and would not stop
        deadline = time.monotonic() + 300
        while self.containers():  # the exit hook persists; restore refuses until the container is gone
            if time.monotonic() > deadline:
                raise StateError("the server app still has a running container 5 min after `modal app stop`")
            time.sleep(self.poll)

    def deploy(self, image: str) -> None:
        self.run(self._modal(["deploy"], ["-m", "apps.server", "--strategy", "recreate"]), {IMAGE_VAR: image})
        self.apply_warm_hours()

    def apply_warm_hours(self) -> None:
        """A deploy resets min_containers (both classes in split mode): the warm hours are put back at once."""
        from shared.operations import warm

        warm.apply_schedule(self.settings)

    def ready(self) -> str:
        url = self.server_info()["url"]
        deadline = time.monotonic() + self.timeout
        while True:  # the first request starts a container; the proxy answers 503 until Tabby listens
            code = self.probe(url)
            if code is not None and code != 503:
                return url
            if time.monotonic() > deadline:
                raise StateError(f"{url} was not ready within {self.timeout:.0f}s (last answer: {code})")
            time.sleep(self.poll)

    def running_schema(self) -> dict[str, Any] | None:
        return None  # read from /data by `inspect` after the server's next persist


def _run_modal(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StateError(f"`{' '.join(cmd[1:4])} ...` failed (exit {proc.returncode}): {last[0]}")


# --- the upgrade -------------------------------------------------------------------------------------------------


def label_for(old: str, new: str) -> str:
    return f"pre-upgrade-{versions.tag_of(old)}-to-{versions.tag_of(new)}"


class Upgrade:
    """One upgrade (or rollback) of one instance: `ops` is the maintenance facade (local or remote), `recorder`
    reads and writes tabby-versions.json in the backups store."""

    def __init__(
        self,
        settings: Settings,
        *,
        ops: Any,
        target: Target,
        recorder: Recorder,
        env_file: Path | None,
        token: str | None,
        say: Say = print,
    ) -> None:
        self.settings = settings
        self.ops = ops
        self.target = target
        self.recorder = recorder
        self.env_file = env_file
        self.token = token
        self.say = say

    def _check(self, url: str) -> list[str]:
        """Readiness passed; the smoke checks with a token (without one, readiness is all we can check)."""
        if not self.token:
            self.say("upgrade: no --token: smoke checks skipped, readiness only")
            return []
        checks = smoke(url, self.token)
        for c in checks:
            self.say(f"upgrade: smoke {c.name}: {'ok' if c.ok else 'FAIL'} {c.detail}")
        return [f"{c.name}: {c.detail}" for c in checks if not c.ok]

    def _bring_up(self, image: str) -> tuple[str | None, list[str]]:
        try:
            self.target.deploy(image)
            url = self.target.ready()
        except StateError as err:
            return None, [str(err)]
        return url, self._check(url)

    def _schema(self) -> dict[str, Any] | None:
        schema = self.target.running_schema()
        if schema is None:
            with contextlib.suppress(StateError):
                db = self.ops.inspect().get("db") or {}
                schema = {"version": db.get("schema_version"), "migrations": db.get("migrations")}
        return schema

    def _entry(self, image: str, outcome: str, **extra: Any) -> dict[str, Any]:
        schema = self._schema() if outcome == "ok" else None
        return {
            "image": image,
            "version": versions.tag_of(image),
            "schema_version": (schema or {}).get("version"),
            "migrations": (schema or {}).get("migrations"),
            "outcome": outcome,
            **extra,
        }

    def upgrade(self, new: str) -> dict[str, Any]:
        old = self.settings.tabby_image
        if new == old:
            raise StateError(f"already on {old}: nothing to upgrade")
        label = label_for(old, new)
        self.say(f"upgrade: {old} -> {new}: stopping the server (its state is persisted)")
        self.target.stop()
        snap = self.ops.snapshot(label)
        check = self.ops.verify(snap["id"])
        if not check["ok"]:
            raise StateError(f"the pre-upgrade snapshot {snap['id']} did not verify: {check['problems'][:1]}")
        self.say(f"upgrade: snapshot {snap['id']} taken and verified; deploying {new}")
        url, failures = self._bring_up(new)
        if not failures:
            self.recorder.record(self._entry(new, "ok", previous_image=old, snapshot=snap["id"]))
            if self.env_file is not None:
                write_env(self.env_file, IMAGE_VAR, new)
            self.say(
                f"upgrade: {new} is up at {url}"
                + (f"; {IMAGE_VAR}={new} written to {self.env_file}" if self.env_file else "")
            )
            return {
                "upgraded": True,
                "from": old,
                "to": new,
                "snapshot": snap["id"],
                "url": url,
                "failures": [],
            }
        reason = failures[0]
        self.say(f"upgrade: {new} failed ({reason}): rolling back to {old}")
        self.recorder.record(
            self._entry(new, "failed", previous_image=old, snapshot=snap["id"], reason=reason)
        )
        back = self._roll_back(old, snap["id"])
        return {
            "upgraded": False,
            "from": old,
            "to": new,
            "snapshot": snap["id"],
            "failures": failures,
            **back,
        }

    def rollback(self) -> dict[str, Any]:
        """Back to the image before the last recorded upgrade, with its pre-upgrade snapshot."""
        current = self.recorder.read().get("current") or {}
        if not current.get("previous_image") or not current.get("snapshot"):
            raise StateError("no upgrade recorded to roll back (tabby-versions.json has none)")
        old, snap = current["previous_image"], current["snapshot"]
        self.say(f"rollback: {current.get('image')} -> {old} with snapshot {snap}")
        self.target.stop()
        return {"from": current.get("image"), "to": old, "snapshot": snap, **self._roll_back(old, snap)}

    def _roll_back(self, old: str, snapshot_id: str) -> dict[str, Any]:
        self.target.stop()
        restored = self.ops.restore(snapshot_id, confirm=self.settings.data_volume)
        self.say(
            f"rollback: restored {restored['restored']} (safety snapshot {restored.get('safety_snapshot')})"
        )
        url, failures = self._bring_up(old)
        outcome = "ok" if not failures else "failed"
        self.recorder.record(self._entry(old, outcome, rolled_back_to=True, snapshot=snapshot_id))
        if self.env_file is not None:
            write_env(self.env_file, IMAGE_VAR, old)
        if failures:
            self.say(f"rollback: {old} did not come back either ({failures[0]}): a person must look")
        else:
            self.say(f"rollback: {old} is up again at {url} with the pre-upgrade state")
        return {
            "rolled_back": True,
            "restored": restored["restored"],
            "url": url,
            "rollback_failures": failures,
        }


# --- where the record lives --------------------------------------------------------------------------------------


class Recorder(Protocol):
    def read(self) -> dict[str, Any]: ...
    def record(self, entry: dict[str, Any]) -> dict[str, Any]: ...


class LocalRecorder:
    def __init__(self, backups_dir: Path) -> None:
        self.backups_dir = Path(backups_dir)

    def read(self) -> dict[str, Any]:
        return versions.read(self.backups_dir)

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        return versions.record(self.backups_dir, entry)


class VolumeRecorder:
    """The record in the backups Volume, read and written from here (`read_file_into_fileobj`, `batch_upload`)."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume

    def read(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tabby-modal-versions-") as work:
            try:
                with open(Path(work) / versions.RECORD, "wb") as f:
                    self.volume.read_file_into_fileobj(versions.RECORD, f)
            except Exception:  # not there yet (NotFoundError on Modal, FileNotFoundError in fakes)
                return {"current": None, "history": []}
            return versions.read(Path(work))

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tabby-modal-versions-") as work:
            path = Path(work) / versions.RECORD
            doc = versions.render(self.read(), entry)
            path.write_text(json.dumps(doc, indent=1, sort_keys=True))
            with self.volume.batch_upload(force=True) as batch:
                batch.put_file(str(path), versions.RECORD)
            return doc


def check_binary(binary: str) -> str:
    found = shutil.which(binary) if "/" not in binary else (binary if os.access(binary, os.X_OK) else None)
    if not found:
        raise StateError(f"Tabby binary {binary!r} not found or not executable (set TABBY_BIN)")
    return found
