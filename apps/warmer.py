"""tabby-warmer: build the shared image with Tabby's models baked in, then prove they are there.

    make warm-cache            # = modal run -m apps.warmer

Building the image downloads each model into its own cached layer (see shared/image.py). The server and the
maintenance app use the identical image, so a deploy after this downloads nothing.
"""

import modal

from shared.image import build_image
from shared.settings import load_settings

# Resolved here, on your machine; the container gets the same values through `env=` below.
settings = load_settings()

app = modal.App(settings.warmer_app)
image = build_image(settings)


# CPU only: checking files needs no GPU. `env=` carries the resolved settings into the container.
@app.function(image=image, cpu=1.0, memory=1024, timeout=600, env=settings.container_env())
def check_models() -> dict:
    """Every configured model under the model cache: `tabby.json` and `ggml/*.gguf`, with sizes."""
    from shared import models

    here = load_settings()
    report = models.check_models(here.models(), here.model_cache)
    print(models.format_table(report))
    if not report["ok"]:
        bad = ", ".join(r["model"] for r in report["models"] if r["problems"])
        raise RuntimeError(f"models missing or incomplete in the image: {bad}")
    return report


@app.local_entrypoint()
def main() -> None:
    from shared import models

    print(models.format_table(check_models.remote()))
    print("image ready: every model is baked in")
