"""Bad input to every `tabby-modal` command ends in one `error:` line and exit 2, never a traceback (issue 13 items
5 and 6, and "Also"): unknown options (with `--json`: `{"ok": false, "error": ...}` on stdout), a `.env` that is not
UTF-8, a `--local DIR` that does not exist (refused, and nothing created), hostile archives, out-of-range values.
Real subprocesses of .venv/bin/tabby-modal, two at a time.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.cli import cli
from tests.conftest import run_cli
from tests.tabby_root import make_root, tree_state

ALLOW = {"TABBY_MODAL_ALLOW_DESTRUCTIVE": "1"}
CREATORS = {"persist", "import", "serve"}  # the commands that start a new --local DIR on purpose
REPORTS = {"doctor", "status"}  # they report what is wrong (exit 1) instead of refusing


def all_commands() -> dict[str, object]:
    from shared.cli import maintenance, serve, setup, state, status, upgrade, warm  # noqa: F401

    return dict(cli.commands)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persisted DIR with one snapshot, and a few hostile archives."""
    tmp = tmp_path_factory.mktemp("bad-input")
    make_root(tmp / "live", size_mb=0.2, seed=8)
    for args in (["persist", "--local", "box", "--root", "live"], ["snapshot", "--local", "box"]):
        assert run_cli(args, tmp).returncode == 0
    archive(tmp / "hardlink-up.tar.gz", link="../../etc/passwd")
    archive(tmp / "hardlink-abs.tar.gz", link="/etc/passwd")
    archive(tmp / "hardlink-missing.tar.gz", link="ee/not-there.txt")
    (tmp / "garbage.tar.gz").write_bytes(b"not a tar archive at all\n")
    (tmp / "a-file").write_text("x")
    return tmp


def archive(path: Path, link: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        data = b"hello"
        member = tarfile.TarInfo("ee/a.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
        hard = tarfile.TarInfo("ee/link")
        hard.type = tarfile.LNKTYPE
        hard.linkname = link
        tar.addfile(hard)


def valid_args(name: str) -> list[str]:
    """A well-formed call of each command on DIR `box` (what the bad `.env` run uses)."""
    local = ["--local", "box"]
    return {
        "export": ["latest", "--out", "out.tar.gz", *local],
        "hydrate": ["--root", "live2", *local],
        "import": ["hardlink-up.tar.gz", *local],
        "persist": ["--root", "live", *local],
        "reset": ["--scope", "index", "--yes", *local],
        "restore": ["latest", "--yes", *local],
        "prune": ["--yes", *local],
        "serve": local,
        "upgrade": ["--image", "tabbyml/tabby:0.33.0", "--yes", *local],
        "config": [],
        "doctor": ["--offline"],
    }.get(name, local if has_param(name, "local") else [])


def has_param(name: str, param: str) -> bool:
    return any(p.name == param for p in all_commands()[name].params)  # type: ignore[attr-defined]


def one_line_refusal(proc: subprocess.CompletedProcess[str], code: int = 2) -> str | None:
    """What is wrong with a refused run, or None: exit `code`, one `error:` line, no traceback; with --json on
    stdout exactly `{"ok": false, "error": <that line>}`."""
    if "Traceback" in proc.stderr:
        return f"traceback: {proc.stderr[-300:]}"
    if proc.returncode != code:
        return f"exit {proc.returncode}: {proc.stderr[-200:]}"
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    if len(errors) != 1 or lines[-1] != errors[0]:
        return f"not one closing error line: {lines}"
    if "--json" in proc.args:
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            return f"--json but stdout is {proc.stdout!r}"
        if doc != {"ok": False, "error": errors[0].removeprefix("error: ")}:
            return f"--json refusal is {doc}"
    return None


def run_all(
    cases: list[tuple[list[str], dict[str, str]]],
    cwd: Path,
    check: Callable[..., str | None] = one_line_refusal,
) -> list[str]:
    def one(case: tuple[list[str], dict[str, str]]) -> str | None:
        args, env = case
        problem = check(run_cli(args, cwd, timeout=60, **env))
        return f"{' '.join(args)}: {problem}" if problem else None

    with ThreadPoolExecutor(2) as pool:
        return [p for p in pool.map(one, cases) if p]


def test_every_command_refuses_an_unknown_option_in_one_line(work):
    cases = [([name, "--no-such-option", "--json"], {}) for name in sorted(all_commands())]
    assert run_all(cases, work) == []


def test_every_command_refuses_a_utf16_env_file_in_one_line(work, tmp_path):
    (tmp_path / "box").symlink_to(work / "box")
    for name in ("live", "hardlink-up.tar.gz"):
        (tmp_path / name).symlink_to(work / name)
    (tmp_path / ".env").write_bytes("TABBY_MODAL_GPU=T4\r\n".encode("utf-16"))  # PowerShell 5's `>`
    before = tree_state(work / "box")
    cases = [([name, *valid_args(name)], ALLOW) for name in sorted(all_commands()) if name not in REPORTS]
    assert run_all(cases, tmp_path) == []
    assert tree_state(work / "box") == before
    # The line says what it is and how to fix it; a report command lists it as a problem instead.
    proc = run_cli(["config"], tmp_path)
    assert proc.stderr.startswith(
        "error: .env is UTF-16 text (PowerShell's `>` writes that): save it as UTF-8"
    )
    doctor = run_cli(["doctor", "--offline"], tmp_path)
    assert doctor.returncode == 1 and "UTF-16" in doctor.stdout + doctor.stderr
    assert "Traceback" not in doctor.stderr


def test_a_non_utf8_env_file_is_named_and_a_utf8_bom_is_fine(tmp_path):
    (tmp_path / ".env").write_bytes(b"TABBY_MODAL_SERVER_APP=caf\xe9\n")  # Latin-1
    proc = run_cli(["config", "--json"], tmp_path)
    assert one_line_refusal(proc) is None
    assert "is not UTF-8 text (byte 0xe9 at offset 26)" in proc.stderr
    (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfTABBY_MODAL_SERVER_APP=from-bom\n")  # Notepad's UTF-8
    assert (
        json.loads(run_cli(["config", "--json"], tmp_path).stdout)["settings"]["server_app"]["value"]
        == "from-bom"
    )


def test_unknown_settings_get_one_warning_naming_the_closest(tmp_path):
    (tmp_path / ".env").write_text("TABBY_MODAL_GPUU=T4\nTABBY_MODAL_ZZZ=1\n")
    proc = run_cli(
        ["config", "--json"], tmp_path, TABBY_MODAL_LOCAL_ROTT="x", TABBY_MODAL_ALLOW_DESTRUCTIVE="1"
    )
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        "warning: unknown setting TABBY_MODAL_GPUU (in .env) is ignored; did you mean TABBY_MODAL_GPU?",
        "warning: unknown setting TABBY_MODAL_LOCAL_ROTT (in environment) is ignored; "
        "did you mean TABBY_MODAL_LOCAL_ROOT?",
        "warning: unknown setting TABBY_MODAL_ZZZ (in .env) is ignored",
    ]
    json.loads(proc.stdout)  # stdout stays one JSON object


def test_a_missing_local_dir_is_refused_and_never_created(work, tmp_path):
    missing = tmp_path / "no/such/dir"
    cases = []
    for name in sorted(all_commands()):
        if not has_param(name, "local") or name in CREATORS | REPORTS:
            continue
        args = [a if a != "box" else str(missing) for a in valid_args(name)]
        cases.append(([name, *args, "--json"] if has_param(name, "as_json") else [name, *args], ALLOW))
    assert {c[0][0] for c in cases} >= {
        "verify",
        "snapshot",
        "snapshots",
        "reset",
        "restore",
        "prune",
        "unlock",
    }
    # The commands that create a DIR on purpose create nothing when they then fail.
    cases += [
        (["persist", "--root", str(tmp_path / "no-live"), "--local", str(missing)], {}),
        (["import", str(work / "garbage.tar.gz"), "--local", str(missing)], {}),
        (["import", str(work / "hardlink-up.tar.gz"), "--local", str(missing)], {}),
    ]
    assert run_all(cases, tmp_path) == []
    assert not (tmp_path / "no").exists()
    # An existing folder that is not a tabby-modal DIR (a typo) is refused too; a file is not a DIR at all.
    for local in (tmp_path, work / "a-file"):
        proc = run_cli(["verify", "--local", str(local)], tmp_path)
        assert one_line_refusal(proc) is None and f"--local {local}: not a" in proc.stderr


def test_bad_values_and_hostile_archives_are_one_line(work):
    box = ["--local", "box"]
    cases = [
        ["import", "hardlink-up.tar.gz", *box],
        ["import", "hardlink-abs.tar.gz", *box],
        ["import", "hardlink-missing.tar.gz", *box],
        ["import", "garbage.tar.gz", *box],
        ["import", "no-such.tar.gz", *box],
        ["hydrate", "--root", "a-file", *box],
        ["persist", "--root", "no-such-root", *box],
        ["verify", "--sample", "abc", *box],
        ["verify", "--sample", "5", *box],
        ["verify", "no-such-snapshot", *box],
        ["prune", "--keep-last", "-1", "--yes", *box],
        ["restore", "no-such-snapshot", "--yes", *box],
        ["reset", "--scope", "bogus", "--yes", *box],
        ["export", "latest", "--out", "a-file", *box],
        ["export", "latest", "--out", "no-dir/x.tar.gz", *box],
        ["inspect", "--snapshot", "../../etc", *box],
        ["config", "--get", "no_such_setting"],
    ]
    before = tree_state(work / "box")
    assert run_all([([*c, "--json"], ALLOW) for c in cases], work) == []
    assert tree_state(work / "box") == before
    proc = run_cli(["import", "hardlink-up.tar.gz", *box], work)
    assert proc.stderr.strip() == (
        "error: import refused: ee/link: hard link to '../../etc/passwd' leaves the archive's root"
    )
    assert not os.path.exists(work / "out.tar.gz")


def test_a_nul_byte_in_the_env_file_is_named_as_such(tmp_path):
    """A stray NUL in UTF-8 text is not UTF-16: the line says NUL; BOM-less UTF-16 is still recognised."""
    (tmp_path / ".env").write_bytes(b"TABBY_MODAL_GPU=T4\nTABBY_MODAL_SERVER_APP=x\x00y\n")
    proc = run_cli(["config"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: .env has a NUL byte (offset 43, line 2): a settings file is plain text; remove that byte"
    ]
    # No BOM: NULs in every other byte.
    (tmp_path / ".env").write_bytes("TABBY_MODAL_GPU=T4\n".encode("utf-16-be"))
    proc = run_cli(["config"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: .env is UTF-16 text")
