"""apps/server.py offline: no token, no network, no DeprecationError; its Modal options from settings."""

from __future__ import annotations

import importlib
import sys
import warnings

import modal
from modal.exception import DeprecationError

from shared.serving.modal_container import STARTUP_MARGIN, function_options
from shared.settings import load_settings


def import_server():
    sys.modules.pop("apps.server", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationError)
        return importlib.import_module("apps.server")


def service_info(module):
    # An @app.cls is one Modal function underneath; its FunctionInfo is built locally, without an RPC.
    return module.Tabby._get_class_service_function().info()


def test_server_app_options_offline(no_modal_env):
    server = import_server()
    settings = server.settings
    assert server.app.name == "tabby-server"
    info = service_info(server)
    assert info.gpus == [("L4", 1)]
    assert info.timeout == settings.request_timeout == 3600
    assert info.startup_timeout == settings.startup_timeout + STARTUP_MARGIN
    assert info.concurrency_info.max_inputs == settings.max_inputs == 10
    assert info.volumes["/data"].name == "tabby-data" and not info.volumes["/data"].read_only
    assert info.secrets[0] == "modal.Secret.from_name('tabby-secrets')"
    assert info.secrets[1] == f"Secret.from_dict([{', '.join(settings.container_env())}])"
    assert info.method_names == ["web"]
    assert info.method_details["web"].unauthenticated is True  # Tabby's own auth applies; clients send Bearer
    assert isinstance(server.image, modal.Image)


def test_server_app_follows_settings(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_GPU", "L4,A10G")
    monkeypatch.setenv("TABBY_MODAL_MAX_INPUTS", "4")
    monkeypatch.setenv("TABBY_MODAL_SERVER_APP", "my-tabby")
    monkeypatch.setenv("TABBY_MODAL_DATA_MOUNT", "/state")
    server = import_server()
    info = service_info(server)
    assert server.app.name == "my-tabby"
    assert info.gpus == [("L4", 1), ("A10G", 1)]
    assert info.concurrency_info.max_inputs == 4
    assert list(info.volumes) == ["/state"]


def test_function_options_from_settings(no_modal_env):
    settings = load_settings(env_file=None, scaledown_window=300, request_timeout=7200, startup_timeout=1200)
    options = function_options(settings)
    assert set(options) == {
        "gpu",
        "cpu",
        "volumes",
        "secrets",
        "max_containers",
        "scaledown_window",
        "timeout",
        "startup_timeout",
        "env",
    }
    assert options["max_containers"] == 1
    assert options["scaledown_window"] == 300
    assert options["timeout"] == 7200
    assert options["startup_timeout"] == 1200 + STARTUP_MARGIN
    assert options["gpu"] == "L4"
    assert options["cpu"] == settings.server_cpu == 2.0
    assert options["env"] == settings.container_env()
    assert "TABBY_MODAL_SETUP_TOKEN" not in options["env"]  # secrets come from the Modal secret only
    assert list(options["volumes"]) == ["/data"]


def test_modal_accepts_the_options(no_modal_env):
    settings = load_settings(env_file=None, gpu="H100,A100-80GB")
    app = modal.App("options-check")

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationError)

        @app.cls(image=modal.Image.debian_slim(), serialized=True, **function_options(settings))
        @modal.concurrent(max_inputs=settings.max_inputs)
        class Probe:
            @modal.asgi_app()
            def web(self):
                return None

    info = Probe._get_class_service_function().info()
    assert info.gpus == [("H100", 1), ("A100-80GB", 1)]
    assert info.startup_timeout == settings.startup_timeout + STARTUP_MARGIN

    # And as a plain function (what app.function would take, too).
    fn = app.function(image=modal.Image.debian_slim(), serialized=True, **function_options(settings))(len)
    assert fn.info().timeout == settings.request_timeout


def test_container_resolves_the_same_settings(no_modal_env, monkeypatch):
    """The container sees only `env=container_env()` (plus the secret): the same values must come out."""
    here = load_settings(env_file=None, gpu="A10G", persist_interval=17, internal_port=9001)
    for key, value in here.container_env().items():
        monkeypatch.setenv(key, value)
    there = load_settings(env_file=None)
    assert there.model_dump(exclude={"jwt_secret", "setup_token"}) == here.model_dump(
        exclude={"jwt_secret", "setup_token"}
    )
