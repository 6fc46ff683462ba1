"""The one image recipe every app uses: Tabby's release image, Python, one layer per model, our code last.

Modal caches image layers as a chain: a layer is rebuilt when its own definition or any layer before it changes.
So the model layers come right after the base and depend on nothing but the Tabby image, the Python version, the
model cache path and the model ids before them; GPU, timeouts, app names and every other knob come later or not
at all. Models are ordered by how rarely they change (embedding, completion, chat): switching the chat model
rebuilds only the chat layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import modal

from shared.models import download_model
from shared.settings import Settings

# Our runtime dependencies (pinned as in uv.lock), after the models so a bump never re-downloads a model.
# Modal mounts its own client into every container, so `modal` itself is not installed here. `tzdata`: the image
# (CUDA Ubuntu base, standalone Python) may lack /usr/share/zoneinfo, which warm hours' time zones need.
PYTHON_PACKAGES = ("pydantic-settings==2.16.3", "aiohttp==3.14.5", "tzdata==2026.6")
DOWNLOAD_TIMEOUT = 3600


@dataclass(frozen=True)
class Layer:
    """One image step, described by everything that keys its cache entry."""

    kind: str
    key: tuple[tuple[str, str], ...]


def base_env(settings: Settings) -> dict[str, str]:
    # Models live outside TABBY_ROOT (/data in the image), so the /data Volume never hides them.
    return {"TABBY_MODEL_CACHE_ROOT": settings.model_cache, "TABBY_DISABLE_USAGE_COLLECTION": "1"}


def layers(settings: Settings) -> list[Layer]:
    """The recipe as data: what tests check, and what `build_image` turns into Modal calls, in order."""
    out = [
        Layer("from_registry", (("image", settings.tabby_image), ("python", settings.python_version))),
        Layer("entrypoint", (("entrypoint", "[]"),)),
        Layer("env", tuple(sorted(base_env(settings).items()))),
    ]
    for role, model in settings.models().items():
        if not model.startswith("/"):  # a local path is not downloaded
            out.append(Layer(f"model:{role}", (("model_id", model), ("cache_root", settings.model_cache))))
    out.append(Layer("pip_install", tuple(("package", p) for p in PYTHON_PACKAGES)))
    out.append(Layer("add_local_python_source", (("modules", "shared,apps"),)))
    return out


def build_image(settings: Settings) -> modal.Image:
    image: modal.Image | None = None
    for layer in layers(settings):
        key = dict(layer.key)
        if layer.kind == "from_registry":
            image = modal.Image.from_registry(key["image"], add_python=key["python"])
        elif layer.kind == "entrypoint":
            image = image.entrypoint([])
        elif layer.kind == "env":
            image = image.env(key)
        elif layer.kind.startswith("model:"):
            # kwargs (not globals) carry the id, so the layer's cache key is the function source plus this id.
            image = image.run_function(download_model, kwargs=key, timeout=DOWNLOAD_TIMEOUT)
        elif layer.kind == "pip_install":
            image = image.pip_install(*PYTHON_PACKAGES)
        elif layer.kind == "add_local_python_source":
            # Last: added at container start, so editing our code never rebuilds a layer.
            image = image.add_local_python_source("shared", "apps")
    assert image is not None
    return image
