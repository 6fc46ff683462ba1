import json
import subprocess
import sys

import pytest

from shared.settings import GPU_TYPES, Settings, SettingsError, load_settings
from tests.conftest import REPO, clean_env, run_cli


def test_defaults_deploy_a_working_tabby(no_modal_env):
    s = load_settings()
    assert s.tabby_image == "tabbyml/tabby:0.32.0"
    assert s.models() == {
        "embedding": "TabbyML/Nomic-Embed-Text",
        "completion": "TabbyML/StarCoder-1B",
        "chat": "TabbyML/Qwen2-1.5B-Instruct",
    }
    assert (s.gpu_spec(), s.device, s.max_inputs, s.scaledown_window) == ("L4", "cuda", 10, 120)
    assert (s.warmer_app, s.server_app, s.maintenance_app) == (
        "tabby-warmer",
        "tabby-server",
        "tabby-maintenance",
    )
    assert (s.data_volume, s.backups_volume, s.data_mount, s.backups_mount) == (
        "tabby-data",
        "tabby-backups",
        "/data",
        "/backups",
    )
    assert (s.model_cache, s.secret_name, s.persist_interval, s.local_root) == (
        "/models",
        "tabby-secrets",
        30,
        ".local",
    )
    assert s.modal_environment is None and s.backup_schedule == "0 3 * * *"


def test_every_field_is_documented():
    assert all(f.description for f in Settings.model_fields.values())


def test_env_overrides_dotenv_overrides_default(no_modal_env, monkeypatch):
    (no_modal_env / ".env").write_text("TABBY_MODAL_GPU=A10G\nTABBY_MODAL_PARALLELISM=4\n")
    assert load_settings().gpu == "A10G"
    assert load_settings().parallelism == 4
    monkeypatch.setenv("TABBY_MODAL_GPU", "H100:2")
    assert load_settings().gpu_spec() == "H100:2"


def test_chat_model_empty_disables_chat(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_CHAT_MODEL", "")
    assert "chat" not in load_settings().models()


def test_gpu_fallback_list(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_GPU", "H100!, A100-80GB:2")
    assert load_settings().gpu_spec() == ["H100!", "A100-80GB:2"]


@pytest.mark.parametrize("gpu", [*GPU_TYPES, "any", "l4", "A100-80GB:8"])
def test_allowed_gpus(no_modal_env, monkeypatch, gpu):
    monkeypatch.setenv("TABBY_MODAL_GPU", gpu)
    assert load_settings().gpu == gpu


BAD = [
    ("GPU", "nonsense", "unknown GPU"),
    ("GPU", "L4:0", "unknown GPU"),
    ("GPU", "", "must name a GPU"),
    ("SCALEDOWN_WINDOW", "1", "between 2 and 3600"),
    ("SCALEDOWN_WINDOW", "3601", "between 2 and 3600"),
    ("COMPLETION_MODEL", "StarCoder-1B", "registry id"),
    ("COMPLETION_MODEL", "", "must not be empty"),
    ("CHAT_MODEL", "a/b/c", "registry id"),
    ("EMBEDDING_MODEL", "/models/../etc", "'..'"),
    ("BACKUP_SCHEDULE", "0 3 * *", "5-field cron"),
    ("BACKUP_SCHEDULE", "0 3 * * * *", "5-field cron"),
    ("INTERNAL_PORT", "0", "TCP port"),
    ("LOCAL_PORT", "65536", "TCP port"),
    ("JWT_SECRET", "not-a-uuid", "must be a UUID"),
    ("SETUP_TOKEN", "1234", "must be a UUID"),
    ("TABBY_IMAGE", "tabbyml/tabby:latest", "pinned"),
    ("TABBY_IMAGE", "tabbyml/tabby", "pinned"),
    ("PYTHON_VERSION", "3.10", "3.11 or newer"),
    ("DATA_MOUNT", "data", "absolute path"),
    ("BACKUPS_MOUNT", "/data", "must differ"),
    ("BACKUPS_VOLUME", "tabby-data", "must differ"),
    ("DATA_VOLUME", "bad name!", "letters, digits"),
    ("DEVICE", "tpu", "cuda"),
    ("MAX_INPUTS", "0", "greater than or equal to 1"),
    ("PARALLELISM", "many", "valid integer"),
]


@pytest.mark.parametrize(("field", "value", "fragment"), BAD)
def test_bad_values_give_one_line_naming_the_variable(no_modal_env, monkeypatch, field, value, fragment):
    monkeypatch.setenv(f"TABBY_MODAL_{field}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(f"TABBY_MODAL_{field}: ")
    assert fragment in message
    assert "\n" not in message


def test_bad_value_in_dotenv_is_reported_too(no_modal_env):
    (no_modal_env / ".env").write_text("TABBY_MODAL_GPU=Z9\n")
    with pytest.raises(SettingsError, match=r"^TABBY_MODAL_GPU: unknown GPU 'Z9'"):
        load_settings()


def test_tabby_bin_falls_back_to_TABBY_BIN(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_BIN", "/opt/tabby/bin/tabby")
    assert load_settings().tabby_bin == "/opt/tabby/bin/tabby"
    monkeypatch.setenv("TABBY_MODAL_TABBY_BIN", "/usr/local/bin/tabby")
    assert load_settings().tabby_bin == "/usr/local/bin/tabby"


def test_container_resolves_the_same_settings(tmp_path):
    """What a function body reads in a container (only `env=`, no .env, no shell env) equals the local values."""
    local = tmp_path / "laptop"
    local.mkdir()
    (local / ".env").write_text(
        "TABBY_MODAL_GPU=A100-80GB\nTABBY_MODAL_CHAT_MODEL=\nTABBY_MODAL_PERSIST_INTERVAL=7\n"
    )
    code = "import json; from shared.settings import load_settings; s = load_settings(); print(json.dumps({'dump': s.model_dump(mode='json', exclude={'jwt_secret', 'setup_token'}), 'env': s.container_env()}))"
    env = clean_env(
        tmp_path,
        TABBY_MODAL_SCALEDOWN_WINDOW="600",
        TABBY_MODAL_MODAL_ENVIRONMENT="staging",
        PYTHONPATH=str(REPO),
    )
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=local, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert out["dump"]["gpu"] == "A100-80GB" and out["dump"]["scaledown_window"] == 600
    # The "container": a different cwd without .env, and nothing but the env dict handed to Modal's `env=`.
    container = tmp_path / "container"
    container.mkdir()
    bare = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **out["env"]}
    inside = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=container, env=bare, capture_output=True, text=True, check=True
        ).stdout
    )
    assert inside["dump"] == out["dump"]
    # And the env really is needed: without it the container would silently fall back to defaults.
    plain = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    default = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=container, env=plain, capture_output=True, text=True, check=True
        ).stdout
    )
    assert default["dump"] != out["dump"]


def test_config_command_shows_sources_and_redacts_secrets(tmp_path):
    (tmp_path / ".env").write_text(
        "TABBY_MODAL_GPU=T4\nTABBY_MODAL_SETUP_TOKEN=6f1c1f4e-2b7a-4d1e-9a51-1b2f0c3d4e5f\n"
    )
    proc = run_cli(["config", "--json"], tmp_path, TABBY_MODAL_PARALLELISM="2")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["settings"]
    assert got["gpu"] == {"value": "T4", "source": ".env"}
    assert got["parallelism"] == {"value": 2, "source": "env"}
    assert got["device"] == {"value": "cuda", "source": "default"}
    assert got["setup_token"]["value"] == "********"
    assert "6f1c1f4e" not in proc.stdout
    human = run_cli(["config"], tmp_path)
    assert "TABBY_MODAL_GPU" in human.stdout and "(.env)" in human.stdout and "6f1c1f4e" not in human.stdout


def test_config_with_bad_settings_exits_2_with_one_line(tmp_path):
    proc = run_cli(["config", "--json"], tmp_path, TABBY_MODAL_SCALEDOWN_WINDOW="0")
    assert proc.returncode == 2
    message = "TABBY_MODAL_SCALEDOWN_WINDOW: must be between 2 and 3600 seconds, got 0"
    assert json.loads(proc.stdout) == {"ok": False, "error": message}  # --json: the refusal as one object
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


def test_config_get_prints_one_raw_value(tmp_path):
    assert run_cli(["config", "--get", "server_app"], tmp_path).stdout.strip() == "tabby-server"
    assert run_cli(["config", "--get", "jwt_secret"], tmp_path).returncode == 2
