"""apps/server.py in split mode, offline: the Tabby class without a GPU (its CPU and memory from settings), the
Inference class on the GPU with Modal's autoscaling options, its concurrency sized to its llama-server slots, and
the optional GPU snapshot; local mode (the default) has no Inference class at all."""

from __future__ import annotations

from shared.serving import inference
from shared.settings import load_settings
from tests.test_server_app import import_server


def test_local_mode_has_one_gpu_class(no_modal_env):
    server = import_server()
    assert not hasattr(server, "Inference")
    assert server.Tabby._get_class_service_function().info().gpus == [("L4", 1)]


def test_split_mode_classes(no_modal_env, monkeypatch):
    monkeypatch.setenv("TABBY_MODAL_INFERENCE", "split")
    monkeypatch.setenv("TABBY_MODAL_SERVER_CPU", "1.5")
    monkeypatch.setenv("TABBY_MODAL_INFERENCE_PARALLELISM", "3")
    server = import_server()
    tabby = server.Tabby._get_class_service_function().info()
    assert tabby.gpus == [] and tabby.cpu == 1.5 and tabby.memory_mib == 4096
    assert list(tabby.volumes) == ["/data"]  # still the one writer of /data
    info = server.Inference._get_class_service_function().info()
    assert info.gpus == [("L4", 1)] and info.volumes == {}
    # Slots: 3 for completion, 3 for chat, 1 for embeddings; Modal aims at one request per slot.
    assert (info.concurrency_info.max_inputs, info.concurrency_info.target_inputs) == (14, 7)
    assert info.method_names == ["web"] and info.method_details["web"].unauthenticated is True
    assert info.secrets[0] == "modal.Secret.from_name('tabby-secrets')"


def test_inference_options_follow_settings(no_modal_env):
    settings = load_settings(
        env_file=None,
        inference="split",
        inference_max_containers=6,
        inference_min_containers=1,
        inference_scaledown_window=90,
    )
    options = inference.function_options(settings, secret=None)
    assert (options["min_containers"], options["max_containers"], options["scaledown_window"]) == (1, 6, 90)
    assert "enable_memory_snapshot" not in options and "experimental_options" not in options
    snap = inference.function_options(
        settings.model_copy(update={"inference_gpu_snapshot": True}), secret=None
    )
    assert snap["enable_memory_snapshot"] is True
    assert snap["experimental_options"] == {"enable_gpu_snapshot": True}
    # Completion and chat on one model: one server, so fewer slots.
    same = settings.model_copy(update={"chat_model": settings.completion_model})
    assert inference.slots(same) == settings.inference_parallelism + 1


class DeployedClasses:
    """Records `modal.Cls.from_name(app, name)().update_autoscaler(...)` per class, as Modal keeps one override
    per class; a class that was not deployed is Modal's NotFoundError."""

    def __init__(self, *deployed: str) -> None:
        self.deployed = set(deployed)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, settings, name="Tabby"):
        from modal.exception import NotFoundError

        if name not in self.deployed:
            raise NotFoundError(f"Lookup failed for Cls '{name}' from the '{settings.server_app}' app")
        outer = self

        class Instance:
            def update_autoscaler(self, *, min_containers=None, **_):
                outer.calls.append((name, min_containers))

        return Instance()


def test_warm_and_cold_cover_both_classes_in_split_mode(no_modal_env):
    import pytest

    from shared.operations import warm
    from shared.state.errors import StateError

    split = load_settings(env_file=None, inference="split", inference_min_containers=0)
    modal_side = DeployedClasses("Tabby", "Inference")
    assert warm.set_min_containers(split, 1, instance=modal_side)["inference_min_containers"] == 1
    warm.set_min_containers(split.model_copy(update={"inference_min_containers": 2}), 0, instance=modal_side)
    assert modal_side.calls == [("Tabby", 1), ("Inference", 1), ("Tabby", 0), ("Inference", 2)]
    local = DeployedClasses("Tabby")
    assert "inference_min_containers" not in warm.set_min_containers(
        load_settings(env_file=None), 1, instance=local
    )
    with pytest.raises(StateError, match="no Inference class: deploy it with TABBY_MODAL_INFERENCE=split"):
        warm.set_min_containers(split, 1, instance=local)
