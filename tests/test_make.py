"""Every Makefile target that talks to Modal stops at once, with one line, when there are no credentials."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env

NEEDS_MODAL = [
    "secrets",
    "warm-cache",
    "deploy-server",
    "deploy-maintenance",
    "deploy",
    "stop-server",
    "backup-volume",
    "snapshots",
    "inspect-volume",
    "verify-backups",
    "restore-volume",
    "reset-volume",
    "prune-backups",
    "rotate-jwt-secret",
    "warm",
    "cold",
    "upgrade",
]
LINE = "No Modal credentials: run `modal token new` or set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"


@pytest.mark.parametrize("target", NEEDS_MODAL)
def test_no_credentials_exits_2_with_one_line(tmp_path, target):
    proc = subprocess.run(
        ["make", "--no-print-directory", target, "SNAPSHOT=x", "SCOPE=all"],
        cwd=REPO,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,  # a connection attempt would take ~60 s: the check is offline, so this never trips
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0] == f"error: {LINE}"


def test_config_and_doctor_work_offline(tmp_path):
    env = clean_env(tmp_path)
    config = subprocess.run(
        ["make", "-s", "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert config.returncode == 0 and "TABBY_MODAL_GPU" in config.stdout
    doctor = subprocess.run(
        ["make", "-s", "doctor"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert doctor.returncode != 0  # no credentials is a problem worth a non-zero exit
    assert "BAD  credentials" in doctor.stdout and "ok   settings" in doctor.stdout


# --- `make install` on a stock machine: no uv on PATH, a Debian-style (externally managed) python3 ---------------

INSTALL_FILES = ["Makefile", "pyproject.toml", "uv.lock", "README.md", "scripts", "shared", "apps"]


def _scratch_repo(tmp_path: Path) -> Path:
    """The files `make install` needs, copied: the test never touches this worktree's .venv."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in INSTALL_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    return repo


def _path_without_uv(tmp_path: Path) -> str:
    """/usr/bin:/bin, plus this machine's python3 first when /usr/bin has none (or an old one)."""
    system = Path("/usr/bin/python3")
    good = (
        system.exists()
        and subprocess.run(
            [str(system), "-c", "import sys; sys.exit(sys.version_info < (3, 11))"], check=False
        ).returncode
        == 0
    )
    dirs = ["/usr/bin", "/bin"]
    if not good:
        bindir = tmp_path / "pybin"
        bindir.mkdir()
        (bindir / "python3").symlink_to(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
        dirs.insert(0, str(bindir))
    path = os.pathsep.join(dirs)
    if shutil.which("uv", path=path) or shutil.which("pipx", path=path):
        pytest.skip(f"uv or pipx is on {path}: cannot stage a machine without them")
    return path


def test_install_without_uv_bootstraps_it(tmp_path):
    repo = _scratch_repo(tmp_path)
    env = {**os.environ, "PATH": _path_without_uv(tmp_path)}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        ["make", "--no-print-directory", "install"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unrecognized option" not in proc.stderr
    assert "installed: .venv/bin/tabby-modal" in proc.stdout
    assert (repo / ".uv-bootstrap" / "bin" / "uv").exists()
    # uv used the machine's python3, not a downloaded one
    version = subprocess.run(
        [str(repo / ".venv" / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ".local/share/uv/python" not in version
    help_ = subprocess.run(
        [str(repo / ".venv" / "bin" / "tabby-modal"), "--help"], env=env, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "Usage: tabby-modal" in help_.stdout
    # a second run reuses the bootstrapped uv (no second pip install)
    again = subprocess.run(
        ["make", "-s", "install"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "installing uv" not in again.stdout


def test_install_without_uv_nor_venv_says_what_to_install(tmp_path):
    """Debian without python3-venv: `python3 -m venv` cannot work. One line, exit 2, nothing run that was not found."""
    repo = _scratch_repo(tmp_path)
    # python3 with no importable `venv` module, as on a Debian without python3-venv
    shadow = tmp_path / "no-venv"
    (shadow / "venv").mkdir(parents=True)
    (shadow / "venv" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'venv'\")\n")
    env = {**os.environ, "PATH": _path_without_uv(tmp_path), "PYTHONPATH": str(shadow)}
    proc = subprocess.run(
        ["bash", "scripts/install.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: uv is missing and python3 cannot create a venv (no venv/ensurepip module): run "
        "`apt-get install python3-venv` (or `pipx install uv`), then `make install` again"
    ]
    assert not (repo / ".venv").exists() and not (repo / ".uv-bootstrap").exists()
    made = subprocess.run(["make", "install"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 2
    assert "apt-get install python3-venv" in made.stderr
    assert "unrecognized option" not in made.stderr + made.stdout
