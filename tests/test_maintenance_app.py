"""apps/maintenance.py checked offline: every function's Modal options through `fn.info()`, the schedule, and the
ad hoc `modal run` calls its docstring documents."""

from __future__ import annotations

import ast
import inspect
import re

import pytest

from tests.test_warmer_app import import_fresh

OPERATIONS = [
    "snapshot",
    "snapshots",
    "verify",
    "inspect",
    "restore",
    "reset",
    "prune",
    "export_archive",
    "import_archive",
    "repair",
    "scheduled_backup",
]


@pytest.fixture
def app(no_modal_env):
    return import_fresh("apps.maintenance")


def test_app_name_and_shared_image(app):
    assert app.app.name == "tabby-maintenance"
    server = import_fresh("apps.server")
    assert app.image is not server.image  # built by the same recipe (shared/image.py) ...
    assert app.settings.tabby_image == server.settings.tabby_image  # ... from the same settings


@pytest.mark.parametrize("name", OPERATIONS)
def test_every_function_is_cpu_with_both_volumes(app, name):
    info = getattr(app, name).info()
    assert info.gpus == []
    assert info.cpu == 2.0 and info.memory_mib == 2048
    assert info.timeout == 3600
    mounts = {path: (v.name, v.read_only) for path, v in info.volumes.items()}
    assert mounts == {"/data": ("tabby-data", False), "/backups": ("tabby-backups", False)}
    (env_secret,) = info.secrets  # the resolved settings, carried as the function's env
    assert all(key in env_secret for key in ("TABBY_MODAL_LOCK_DICT", "TABBY_MODAL_KEEP_LAST"))


def test_only_the_scheduled_backup_has_a_schedule(app):
    assert app.scheduled_backup.info().schedule == "Cron('0 3 * * *', UTC)"
    assert all(getattr(app, n).info().schedule is None for n in OPERATIONS if n != "scheduled_backup")


def test_schedule_timeout_and_names_follow_settings(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_BACKUP_SCHEDULE", "30 1 * * 0")
    monkeypatch.setenv("TABBY_MODAL_MAINTENANCE_TIMEOUT", "7200")
    monkeypatch.setenv("TABBY_MODAL_BACKUPS_VOLUME", "team-backups")
    app = import_fresh("apps.maintenance")
    info = app.scheduled_backup.info()
    assert info.schedule == "Cron('30 1 * * 0', UTC)" and info.timeout == 7200
    assert info.volumes["/backups"].name == "team-backups"


def test_empty_schedule_switches_the_scheduled_backup_off(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_BACKUP_SCHEDULE", "")
    app = import_fresh("apps.maintenance")
    assert app.scheduled_backup.info().schedule is None


def test_documented_modal_run_calls_name_real_functions_and_flags(app):
    calls = re.findall(r"modal run -m apps\.maintenance::(\w+)([^\n#]*)", app.__doc__)
    assert {name for name, _ in calls} >= {
        "snapshot",
        "snapshots",
        "verify",
        "inspect",
        "prune",
        "restore",
        "reset",
    }
    tree = ast.parse(inspect.getsource(app))
    defs = {f.name: {a.arg for a in f.args.args} for f in tree.body if isinstance(f, ast.FunctionDef)}
    for name, flags in calls:
        params = defs[name]
        for flag in re.findall(r"--([\w-]+)", flags):
            assert flag.replace("-", "_") in params, f"{name} has no --{flag}"


def test_the_server_start_check_uses_the_same_dict(app):
    server = import_fresh("apps.server")
    assert server.settings.lock_dict == app.settings.lock_dict == "tabby-maintenance-lock"
