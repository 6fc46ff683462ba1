"""tabby-server: Tabby on a GPU, behind our proxy, with its state on the /data Volume.

    make deploy-server        # = modal deploy -m apps.server --strategy recreate

One container at most (one SQLite writer), deployed with `--strategy recreate` so an old and a new container never
write /data together. When the container starts, it hydrates Tabby's working root on local disk from /data and
starts `tabby serve` on 127.0.0.1; requests reach it through the proxy, which carries websockets, SSE, client
cancellation and the owner-claim guard. Every `persist_interval` seconds and once more at shutdown the state is
mirrored back into /data and the Volume committed. Everything that runs lives in `shared/serving/` (server.py, and
modal_container.py for this wiring).
"""

import modal

from shared.image import build_image
from shared.logs import setup_logging
from shared.serving import inference, modal_container
from shared.settings import load_settings

# Resolved here, on your machine; the container gets the same values through `env=settings.container_env()`.
settings = load_settings()

app = modal.App(settings.server_app)
image = build_image(settings)

# Tabby's state (a mirror of its root, written by the persister) and the secrets: the JWT secret, so browser
# logins survive restarts, and the setup token that unlocks the owner claim on a fresh instance.
data = modal.Volume.from_name(
    settings.data_volume, create_if_missing=True, environment_name=settings.modal_environment
)
secret = modal.Secret.from_name(settings.secret_name, environment_name=settings.modal_environment)


@app.cls(image=image, **modal_container.function_options(settings, volume=data, secret=secret))
@modal.concurrent(max_inputs=settings.max_inputs)  # one long chat stream must not hold up everyone else
class Tabby:
    @modal.enter()
    def start(self) -> None:
        # Blocks until Tabby listens (requests wait meanwhile); a failure is served as a 503 with the reason
        # instead of crashing, so a broken start does not become a loop of GPU containers.
        setup_logging()
        self.runtime = modal_container.for_modal(load_settings(), commit=data.commit)
        self.runtime.start()

    @modal.exit()
    def stop(self) -> None:
        # Stop Tabby, persist once more, commit. Modal commits the Volume again after this hook.
        self.runtime.stop()

    @modal.asgi_app(label=settings.server_app)
    def web(self):
        return self.runtime.app()


# --- Split mode (TABBY_MODAL_INFERENCE=split, docs/split-mode.md): the models on GPU containers Modal scales ----------
# The Tabby class above then runs without a GPU and finds this class's web URL through Modal's client at each start.
if settings.inference == "split":

    @app.cls(image=image, **inference.function_options(settings, secret=secret))
    @modal.concurrent(**inference.concurrency(settings))  # one request per llama-server slot, then scale out
    class Inference:
        @modal.enter(snap=settings.inference_gpu_snapshot)
        def load(self) -> None:
            # Starts the llama-servers and returns: requests wait in the front (bounded) while models load. With
            # the GPU snapshot on, this runs before the snapshot and waits, so the snapshot holds loaded models.
            setup_logging()
            self.inference = inference.for_modal(load_settings())
            self.inference.start()
            if settings.inference_gpu_snapshot:
                self.inference.wait_ready(settings.startup_timeout)

        @modal.exit()
        def stop(self) -> None:
            self.inference.stop()

        @modal.asgi_app(label=inference.web_label(settings))
        def web(self):
            return self.inference.app()
