"""Every next command `tabby-modal` prints in the `--local DIR` form runs as printed (issue 17 item 4).

A sequence of real local commands (import, restore, an unknown snapshot, a held and an expired lease, unlock,
inspect, status) on a DIR whose name has a space; every `tabby-modal ...` hint they print is collected and
then RUN exactly as printed (plus the two signals where it is destructive): none may ask Modal ("No Modal
credentials") or be a usage error, and each must carry `--local` with the real DIR.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from shared.state.locks.lease import DirDict, Lease
from tests.conftest import BIN, clean_env, run_cli
from tests.harness import free_port, poll, tabby_wrapper
from tests.tabby_root import make_root
from tests.test_serve_local import get

ALLOW = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}
BACKTICKED = re.compile(r"`(tabby-modal [^`]*)`")
STATUS_NEXT = re.compile(r"^\s+-> (tabby-modal .*)$", re.M)


def hints(text: str) -> list[str]:
    return BACKTICKED.findall(text) + STATUS_NEXT.findall(text)


def run_hint(command: str, tmp: Path, local: Path) -> subprocess.CompletedProcess[str]:
    """`command` as printed, with `--yes` + TABBY_MODAL_ALLOW_DESTRUCTIVE=1 where destructive; `serve` is started
    with the stand-in Tabby and stopped (SIGTERM) once it answers."""
    argv = shlex.split(command)
    assert argv[0] == "tabby-modal"
    assert argv[argv.index("--local") + 1] == str(local), command  # the real DIR, quoted right
    args = argv[1:]
    if args[0] == "serve":
        port = free_port()
        proc = subprocess.Popen(
            [str(BIN / "tabby-modal"), *args, "--port", str(port)],
            cwd=tmp,
            env=clean_env(
                tmp, TABBY_BIN=str(tabby_wrapper(tmp / "bin")), TABBY_MODAL_INTERNAL_PORT=str(free_port())
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def answers() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return get(f"http://127.0.0.1:{port}/")[0] in (403, 200)
            except OSError:
                return False

        try:
            poll(answers, 30, 0.05, f"{command} to serve")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if args[0] in ("restore", "reset") and "--yes" not in args:
        args.append("--yes")
    return run_cli(args, tmp, **ALLOW)


def test_every_printed_next_command_runs_as_printed(tmp_path):
    local = tmp_path / "my state"  # a space: the hint must quote DIR for the shell
    d = str(local)
    make_root(tmp_path / "live", size_mb=0.2, seed=5, wal_rows=3)
    with tarfile.open(tmp_path / "root.tar.gz", "w:gz") as tar:
        for path in sorted((tmp_path / "live").rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tmp_path / "live")), recursive=False)
    seen: dict[str, str] = {}  # hint -> the command that printed it

    def collect(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        proc = run_cli(args, tmp_path, **env)
        for hint in hints(proc.stdout + proc.stderr):
            seen.setdefault(hint, " ".join(args))
        return proc

    imported = collect(["import", str(tmp_path / "root.tar.gz"), "--local", d])
    assert imported.returncode == 0, imported.stderr
    snapshot_id = imported.stdout.split()[4].rstrip(":")
    restore = f"tabby-modal restore {snapshot_id} --local '{d}'"
    assert f"restore it with `{restore}`" in imported.stdout
    # As the person would, right away: the import's hint, as printed (it used to fail: "No Modal credentials").
    restored = run_hint(restore, tmp_path, local)
    assert restored.returncode == 0, restored.stderr
    assert collect(["restore", "no-such-id", "--local", d, "--yes"], **ALLOW).returncode == 2
    # A live maintenance lease (held by this test's process): unlock names `unlock --yes`.
    held = Lease(DirDict(local / "locks"), "maintenance", "restore", ttl=600, owner="ops").acquire()
    try:
        assert collect(["unlock", "--local", d]).returncode == 2
    finally:
        held.release()
    # An expired lease left behind: status and inspect name `unlock`.
    record = {**held.record(), "since": time.time() - 7200, "expires": time.time() - 3600}
    DirDict(local / "locks").put("maintenance", record)
    collect(["status", "--local", d])
    collect(["inspect", "--local", d])

    printed = set(seen)
    assert {
        restore,
        f"tabby-modal snapshots --local '{d}'",
        f"tabby-modal unlock --yes --local '{d}'",
        f"tabby-modal unlock --local '{d}'",
        f"tabby-modal serve --local '{d}'",
    } <= printed, printed
    for hint in sorted(printed - {restore}):  # the restore ran above
        proc = run_hint(hint, tmp_path, local)
        said = proc.stdout + proc.stderr
        assert "No Modal credentials" not in said, (hint, seen[hint], said)
        assert "Usage:" not in said and "No such option" not in said, (hint, said)
        assert proc.returncode == 0, (hint, seen[hint], said)
