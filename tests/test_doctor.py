import json

from tests.conftest import run_cli


def test_doctor_json_offline_without_credentials(tmp_path):
    proc = run_cli(["doctor", "--json"], tmp_path)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert checks["settings"]["ok"] and checks["modal"]["ok"] and checks["python"]["ok"]
    assert checks["credentials"]["ok"] is False
    assert set(checks) == {"settings", "modal", "python", "credentials"}  # nothing online without a token


def test_doctor_reports_bad_settings(tmp_path):
    proc = run_cli(["doctor", "--json"], tmp_path, TABBY_MODAL_GPU="X1")
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["settings"]["ok"] is False
    assert checks["settings"]["detail"].startswith("TABBY_MODAL_GPU: unknown GPU")


def test_credentials_from_env_are_seen_offline(tmp_path):
    proc = run_cli(
        ["doctor", "--json", "--offline"], tmp_path, MODAL_TOKEN_ID="ak-x", MODAL_TOKEN_SECRET="as-y"
    )
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["credentials"]["ok"] is True
    assert proc.returncode == 0


def test_check_credentials(tmp_path):
    assert run_cli(["check-credentials"], tmp_path).returncode == 2
    assert (
        run_cli(["check-credentials"], tmp_path, MODAL_TOKEN_ID="a", MODAL_TOKEN_SECRET="b").returncode == 0
    )
