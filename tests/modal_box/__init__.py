"""The Modal test box: our apps deployed by Modal's real client and run in Modal's real container entrypoint,
against a local stand-in for Modal's control plane. Pinned to modal 1.6.4 (`MODAL_VERSION`): the stand-in speaks
that version's gRPC API and container protocol; any other version is refused with a clear message.

What is real: `modal deploy -m apps.X` (the CLI, in a subprocess), `python -m modal._container_entrypoint` (one
subprocess per container, with `ContainerArguments` built from what the deploy registered, as modal-client's
`test/container_test.py` does), our apps and `shared/` in it, the stand-in Tabby (`tests/standin_tabby.py`) as
`tabby` on the container's PATH, real sockets, real files.

What is stood in for (`control_plane.py`): Modal's servers. Image builds succeed without building; Secrets, Dicts,
Volumes, apps, functions and classes live in memory or in directories under the box's root; each container gets
its inputs from in-memory queues; `ingress.py` turns HTTP requests and websockets into ASGI inputs as Modal's
web ingress does (an input per request, the body as `http.request` messages, the response read back from the
call's data_out), with both client-disconnect paths (an `http.disconnect` message, or cancelling the input through
the container heartbeat).

Filesystem: each container runs in a private mount namespace (`unshare --mount`, which needs root) where its view
of each Volume is bind-mounted at the Volume's real mount path (/data, /backups) and a fresh, empty directory at
/var/lib (container-local disk: the server hydrates Tabby's root into /var/lib/tabby). So the apps run with their default
settings and paths, two containers never share local disk, and only what a container commits reaches the next one
(see `control_plane.Volume`). Without root or `unshare`, the box's tests are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

MODAL_VERSION = "1.6.4"
REPO = Path(__file__).resolve().parents[2]
# Container-local disk: a fresh, empty /var/lib per container. Our server keeps Tabby's root in /var/lib/tabby
# (shared/serving/modal_container.py), which must be a plain directory as in a Modal container, not a mount point: the
# hydrate replaces it by rename.
LOCAL_DISK = "/var/lib"


def unavailable() -> str | None:
    """Why the box cannot run here, or None."""
    import modal

    if modal.__version__ != MODAL_VERSION:
        return f"the Modal box is written for modal {MODAL_VERSION} (uv.lock); modal {modal.__version__} is installed"
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return "the Modal box needs Linux, root and `unshare` (a private mount namespace per container)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"the Modal box needs `unshare --mount`: {probe.stderr.strip()}"
    return None


class FunctionFailed(Exception):
    """A function input ended in an exception inside the container (its repr and traceback)."""


class Container:
    """One container process running `python -m modal._container_entrypoint` for one function."""

    def __init__(self, box: Box, task: Any, proc: subprocess.Popen[bytes], log: Path, disk: Path) -> None:
        self.box, self.task, self.proc, self.log_path, self.disk = box, task, proc, log, disk

    @property
    def task_id(self) -> str:
        return self.task.task_id

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, *names: str) -> list[tuple[str, str, float]]:
        return [e for e in list(self.task.events) if not names or e[0] in names]

    def call(self, method: str = "", *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run one input (a `.remote()` as Modal's queue would deliver it) and return its result."""
        from modal._serialization import deserialize
        from modal_proto import api_pb2

        call = self.box.run(self.box.new_call(self.task, method, args, kwargs))
        try:
            item = self.box.run(asyncio.wait_for(asyncio.shield(call.output), timeout), timeout + 5)
        except TimeoutError:
            raise AssertionError(
                f"no output from {self.task_id} within {timeout}s:\n{self.log()[-3000:]}"
            ) from None
        if item.result.status == api_pb2.GenericResult.GENERIC_STATUS_SUCCESS:
            return deserialize(item.result.data, None)
        raise FunctionFailed(f"{item.result.exception}\n{item.result.traceback}")

    def stop(self, timeout: float = 60.0) -> int:
        """Stop as Modal does when it scales a container down: a kill switch instead of the next input; the
        container runs its exit hooks and commits its Volumes, then exits. Returns the exit code."""
        from modal_proto import api_pb2

        if self.proc.poll() is None:
            self.box.run(self.task.inputs.put(api_pb2.FunctionGetInputsItem(kill_switch=True)))
        return self.wait(timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"container {self.task_id} did not exit in {timeout}s:\n{self.log()[-3000:]}"
            ) from None
        self.task.running = False
        return code

    def kill(self) -> None:
        """SIGKILL to every process of the container: its mount namespace's (Tabby runs in a session of its own,
        so the entrypoint's process group alone would miss it), by pid."""
        pids = {self.proc.pid}
        try:
            ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            ns = None
        if ns is not None and ns != os.readlink("/proc/self/ns/mnt"):
            for entry in os.listdir("/proc"):
                with contextlib.suppress(OSError):
                    if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                        pids.add(int(entry))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.task.running = False


class Box:
    """The control plane, its ingress and the containers, on one event loop in a background thread."""

    def __init__(self, root: Path) -> None:
        from tests.modal_box.control_plane import ControlPlane

        self.root = Path(root)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modal-box", daemon=True)
        self.plane = ControlPlane(self.root / "plane")
        self.containers: list[Container] = []
        self.servers: list[Any] = []
        self.web: tuple[Any, str] | None = None  # (task, method) the ingress sends requests to
        self.webs: dict[str, tuple[Any, str]] = {}  # label -> (task, method), with plane.web_base set
        self.client_url = ""
        self.ingress_url = ""

    # --- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Box:
        self.thread.start()
        port = self.run(self._serve(None))
        self.client_url = f"http://127.0.0.1:{port}"
        self.ingress_url = self.run(self._start_ingress())
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.containers:
            if c.proc.poll() is None:
                c.kill()
        self.run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        """Run a coroutine on the box's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, task: Any) -> int:
        from grpclib.server import Server

        from tests.modal_box.control_plane import Servicer

        server = Server([Servicer(self.plane, task)])
        await server.start("127.0.0.1", 0)
        self.servers.append(server)
        return server._server.sockets[0].getsockname()[1]

    async def _start_ingress(self) -> str:
        from tests.modal_box.ingress import Ingress

        self.ingress = Ingress(self)
        return await self.ingress.start()

    async def _shutdown(self) -> None:
        await self.ingress.stop()
        for s in self.servers:
            s.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 5)

    # --- the client side: what `modal` on your machine talks to ------------------------------------------------

    def client_env(self, **extra: str) -> dict[str, str]:
        """Env for a process using Modal's client against the box (no real credentials anywhere)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "TABBY_MODAL_"))}
        env.update(
            MODAL_SERVER_URL=self.client_url,
            MODAL_TOKEN_ID="ak-box",
            MODAL_TOKEN_SECRET="as-box",
            MODAL_CONFIG_PATH=str(self.root / "no-modal.toml"),
            PYTHONPATH=str(REPO),
        )
        env.update(extra)
        return env

    def deploy_all(self, deploys: list[list[str]], env: dict[str, str] | None = None) -> list[str]:
        """`modal deploy -m MODULE [FLAGS]` for each [MODULE, *FLAGS], with Modal's real CLI, all at once (each is
        a process of its own). Returns their outputs; raises with the output of any that failed."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "modal", "deploy", "-m", module, *flags],
                cwd=self.root,
                env=self.client_env(**(env or {})),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for module, *flags in deploys
        ]
        outputs = []
        for (module, *_), proc in zip(deploys, procs, strict=True):
            out, _ = proc.communicate(timeout=180)
            if proc.returncode != 0:
                raise AssertionError(f"modal deploy -m {module} failed:\n{out}")
            outputs.append(out)
        return outputs

    # --- containers ------------------------------------------------------------------------------------------

    def start_container(self, app: str, tag: str, *, path: list[Path] | None = None, **env: str) -> Container:
        """Start a container for function (or class) `tag` of deployed app `app`, as Modal's worker would."""
        from modal_proto import api_pb2

        from tests.modal_box.control_plane import ENVIRONMENT, Task

        plane = self.plane
        app_id = plane.apps[app]
        function_id = plane.app_objects[app_id][
            f"{tag}.*" if f"{tag}.*" in plane.app_objects[app_id] else tag
        ]
        fdef = plane.functions[function_id]
        task_id = plane.new_id("ta")
        where = self.root / "containers" / task_id
        where.mkdir(parents=True)

        async def make() -> Any:
            task = Task(task_id, function_id, app_id)
            plane.tasks[task_id] = task
            task.port = await self._serve(task)
            return task

        task = self.run(make())
        binds: list[tuple[Path, str]] = []
        for m in fdef.volume_mounts:
            volume = plane.volumes[m.volume_id]
            binds.append((volume.mount(task_id, where / f"volume-{volume.name}"), m.mount_path))
        disk = where / "local-disk"
        disk.mkdir()
        binds.append((disk, LOCAL_DISK))
        snapshot_env: dict[str, str] = {}
        if fdef.checkpointing_enabled:
            # A memory-snapshot function (split mode's GPU snapshot, issue 20): each box container is one that
            # creates the snapshot (on Modal, later ones are restored from it and skip the snap=True phase): the
            # worker's flags, and the file it writes on restore (ContainerCheckpoint in control_plane). The box has
            # no GPU and no gVisor (/proc/gvisor/checkpoint, where the GPU memory part happens): it runs the phases
            # without a GPU.
            snapshot_env = {
                "MODAL_ENABLE_SNAP_RESTORE": "1",
                "MODAL_RESTORE_STATE_PATH": str(where / "restore-state.json"),
            }
            task.restore_state = where / "restore-state.json"
            fdef = api_pb2.Function()
            fdef.CopyFrom(plane.functions[function_id])
            fdef.resources.ClearField("gpu_config")
            fdef.is_checkpointing_function = True
        args = api_pb2.ContainerArguments(
            task_id=task_id,
            function_id=function_id,
            app_id=app_id,
            function_def=fdef,
            app_layout=plane.app_layout(app_id),
            environment_name=ENVIRONMENT,
            checkpoint_id=f"ch-{task_id}",
        )
        args_path = where / "container-arguments.bin"
        args_path.write_bytes(args.SerializeToString())

        # The container's env: what the worker sets, plus the function's secrets (its `env=` is one too).
        cenv = {
            k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "TABBY_MODAL_", "STANDIN_"))
        }
        for secret_id in fdef.secret_ids:
            cenv.update(plane.secrets[secret_id])
        cenv.update(
            MODAL_SERVER_URL=f"http://127.0.0.1:{task.port}",
            MODAL_TASK_ID=task_id,
            MODAL_IS_REMOTE="1",
            MODAL_CONTAINER_ARGUMENTS_PATH=str(args_path),
            MODAL_CONFIG_PATH=str(where / "no-modal.toml"),
            PYTHONPATH=str(REPO),  # stands for the image's add_local_python_source("shared", "apps")
            PATH=os.pathsep.join([*(str(p) for p in path or []), cenv.get("PATH", "")]),
        )
        cenv.update(snapshot_env)
        cenv.update(env)
        for _, target in binds:
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points (empty) on the host
        script = "set -e\n" + "".join(
            f"mount --bind {shlex.quote(str(s))} {shlex.quote(t)}\n" for s, t in binds
        )
        script += 'exec "$@"\n'
        log = where / "container.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    "container",
                    sys.executable,
                    "-m",
                    "modal._container_entrypoint",
                ],
                cwd=where,
                env=cenv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        container = Container(self, task, proc, log, disk)
        self.containers.append(container)
        return container

    async def new_call(self, task: Any, method: str, args: tuple, kwargs: dict) -> Any:
        """Queue one input for a container: a function call with its own data streams."""
        from modal._serialization import serialize
        from modal_proto import api_pb2

        from tests.modal_box.control_plane import Call

        call = Call(input_id=self.plane.new_id("in"), call_id=self.plane.new_id("fc"))
        self.plane.calls[call.call_id] = call
        self.plane.calls_by_input[call.input_id] = call
        await task.inputs.put(
            api_pb2.FunctionGetInputsItem(
                input_id=call.input_id,
                function_call_id=call.call_id,
                input=api_pb2.FunctionInput(
                    args=serialize((args, kwargs)), data_format=api_pb2.DATA_FORMAT_PICKLE, method_name=method
                ),
            )
        )
        return call

    def output_status(self, input_id: str) -> str | None:
        """The status name of an input's output (GENERIC_STATUS_SUCCESS, ..._TERMINATED), or None while running."""
        from modal_proto import api_pb2

        call = self.plane.calls_by_input[input_id]
        if not call.output.done():
            return None
        return api_pb2.GenericResult.GenericStatus.Name(call.output.result().result.status)

    def serve_web(self, container: Container, method: str, label: str | None = None) -> None:
        """Send the ingress's requests to `method` (an asgi_app) of this container; with `label`, only the
        requests to that label's URL (`label_web_urls`)."""
        if label is None:
            self.web = (container.task, method)
            self.loop.call_soon_threadsafe(self.ingress.target.set)
            return
        self.webs[label] = (container.task, method)

        def ready() -> None:
            self.ingress.labels.setdefault(label, asyncio.Event()).set()

        self.loop.call_soon_threadsafe(ready)

    def label_web_urls(self) -> str:
        """From now on, deployed web endpoints get `<ingress>/_web/<label>` URLs the ingress routes by label."""
        from tests.modal_box.ingress import LABELLED

        self.plane.web_base = self.ingress_url + LABELLED
        return self.plane.web_base


def poll(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
