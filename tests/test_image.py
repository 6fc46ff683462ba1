import modal
import pytest

from shared.image import PYTHON_PACKAGES, build_image, layers
from shared.settings import load_settings


def kinds(settings):
    return [layer.kind for layer in layers(settings)]


def model_layers(settings):
    return {layer.kind: layer for layer in layers(settings) if layer.kind.startswith("model:")}


def test_layer_order(no_modal_env):
    assert kinds(load_settings()) == [
        "from_registry",
        "entrypoint",
        "env",
        "model:embedding",
        "model:completion",
        "model:chat",
        "pip_install",
        "add_local_python_source",
    ]


def test_base_is_the_pinned_tabby_image_with_models_outside_data(no_modal_env):
    first, entry, env = layers(load_settings())[:3]
    assert dict(first.key) == {"image": "tabbyml/tabby:0.32.0", "python": "3.11"}
    assert dict(entry.key) == {"entrypoint": "[]"}
    assert dict(env.key) == {"TABBY_MODEL_CACHE_ROOT": "/models", "TABBY_DISABLE_USAGE_COLLECTION": "1"}


def test_model_layer_keyed_by_model_id(no_modal_env):
    layer = model_layers(load_settings())["model:completion"]
    assert dict(layer.key) == {"model_id": "TabbyML/StarCoder-1B", "cache_root": "/models"}


@pytest.mark.parametrize(
    "changes",
    [
        {"gpu": "H100"},
        {"scaledown_window": 600, "request_timeout": 60, "startup_timeout": 60},
        {"server_app": "other-server", "data_volume": "other-data", "secret_name": "s2"},
        {"max_inputs": 3, "parallelism": 4, "device": "cpu", "persist_interval": 5},
        {"backup_schedule": "", "keep_last": 1},
    ],
)
def test_unrelated_settings_leave_every_layer_before_our_code_alone(no_modal_env, changes):
    base, other = load_settings(), load_settings(**changes)
    assert layers(base)[:-2] == layers(other)[:-2]


def test_changing_the_chat_model_keeps_the_earlier_model_layers(no_modal_env):
    base, other = load_settings(), load_settings(chat_model="TabbyML/Qwen2.5-Coder-7B-Instruct")
    prefix = kinds(base).index("model:chat")
    assert layers(base)[:prefix] == layers(other)[:prefix]
    assert model_layers(base)["model:chat"] != model_layers(other)["model:chat"]


def test_disabled_chat_and_local_paths_get_no_layer(no_modal_env):
    s = load_settings(chat_model="", completion_model="/models/mine/StarCoder")
    assert list(model_layers(s)) == ["model:embedding"]


def test_python_dependencies_are_pinned():
    assert all("==" in p for p in PYTHON_PACKAGES)


def test_build_image_offline(no_modal_env):
    assert isinstance(build_image(load_settings()), modal.Image)
