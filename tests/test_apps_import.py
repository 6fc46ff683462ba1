"""Every app module imports with no Modal token and no network, and without a single DeprecationError warning."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

APPS = sorted(p.stem for p in (REPO / "apps").glob("*.py") if p.stem != "__init__")

PROBE = """
import importlib, warnings
from modal.exception import DeprecationError
warnings.simplefilter("error", DeprecationError)
importlib.import_module("apps.{name}")
print("imported")
"""


def test_the_three_apps_are_here():
    assert set(APPS) == {"warmer", "server", "maintenance"}


@pytest.mark.parametrize("name", APPS)
def test_app_imports_offline_without_deprecations(tmp_path, name):
    # An unroutable server URL: any RPC during import would fail instead of passing silently.
    env = clean_env(tmp_path, MODAL_SERVER_URL="http://127.0.0.1:9", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(name=name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"


def test_a_deprecated_idiom_would_fail(tmp_path):
    """The probe is not a rubber stamp: a seed-era idiom in an app module makes it fail."""
    bad = tmp_path / "apps_bad.py"
    bad.write_text("import modal\napp = modal.App('x')\n@app.function(max_inputs=1)\ndef f():\n    pass\n")
    env = clean_env(tmp_path, PYTHONPATH=f"{REPO}:{tmp_path}")
    probe = PROBE.replace('importlib.import_module("apps.{name}")', 'importlib.import_module("apps_bad")')
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "DeprecationError" in proc.stderr
