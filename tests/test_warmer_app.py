import importlib
import warnings

import modal
from modal.exception import DeprecationError


def import_fresh(name: str):
    import sys

    for mod in [m for m in sys.modules if m == name]:
        del sys.modules[mod]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationError)
        return importlib.import_module(name)


def test_warmer_is_a_cpu_function_on_the_shared_image(no_modal_env):
    warmer = import_fresh("apps.warmer")
    assert warmer.app.name == "tabby-warmer"
    info = warmer.check_models.info()
    assert info.gpus == []
    assert info.timeout == 600
    assert info.cpu == 1.0
    assert info.volumes == {}  # models come from the image, not from a Volume
    # The resolved settings travel as the function's env: exactly the container_env() keys.
    (env_secret,) = info.secrets
    expected = warmer.settings.container_env()
    assert env_secret == f"Secret.from_dict([{', '.join(expected)}])"
    assert isinstance(warmer.image, modal.Image)


def test_warmer_takes_settings_from_env(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_WARMER_APP", "my-warmer")
    assert import_fresh("apps.warmer").app.name == "my-warmer"
