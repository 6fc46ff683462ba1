"""The box's stand-in for Modal's control plane: a gRPC servicer speaking `modal_proto.api_grpc.ModalClient`.

Only the RPCs that deploying our three apps and running their containers need are implemented, written from
modal 1.6.4's client and container code (and in the spirit of `MockClientServicer` in modal-labs/modal-client
`test/conftest.py`). Every other RPC answers UNIMPLEMENTED with its name, so a new need shows up as one clear error.

State lives in `ControlPlane`, on the box's event loop thread. Each container gets its own gRPC port (its
`MODAL_SERVER_URL`), so the servicer knows which container (task) an RPC comes from: which Volume views to commit
or reload, which input queue to serve.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpclib import GRPCError, Status
from modal_proto import api_grpc, api_pb2

ENVIRONMENT = "main"
HEARTBEAT_HOLD = 14.5  # < modal's 15 s heartbeat interval: the container asks again at once (a long poll)
GET_INPUTS_HOLD = 5.0  # an empty FunctionGetInputs answer after this long; the container asks again


# --- Volumes: a committed state and one view per container ----------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    """rel path -> content digest (or link target) of every file under root."""
    out: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst)


class Volume:
    """A Modal Volume: `committed` is what Modal holds; each container works in its own view directory.

    A view starts as a copy of the committed state. `commit` publishes the files the view changed or deleted since
    its last reload (whole files, last writer wins); `reload` makes the view equal to the committed state again,
    dropping what was not committed. Background commits are not simulated: only explicit and exit commits publish.
    """

    def __init__(self, volume_id: str, name: str, root: Path) -> None:
        self.volume_id, self.name = volume_id, name
        self.committed = root / "committed"
        self.committed.mkdir(parents=True, exist_ok=True)
        self.views: dict[str, tuple[Path, dict[str, str]]] = {}  # task id -> (dir, base state)
        self.commits: list[tuple[str, float]] = []  # (task id, time)

    def mount(self, task_id: str, view: Path) -> Path:
        view.mkdir(parents=True, exist_ok=True)
        self.views[task_id] = (view, {})
        self.reload(task_id)
        return view

    def reload(self, task_id: str) -> None:
        view, _ = self.views[task_id]
        want = _tree(self.committed)
        have = _tree(view)
        for rel in have.keys() - want.keys():
            (view / rel).unlink()
        for rel, digest in want.items():
            if have.get(rel) != digest:
                _copy(self.committed / rel, view / rel)
        self.views[task_id] = (view, want)

    def commit(self, task_id: str) -> None:
        view, base = self.views[task_id]
        now = _tree(view)
        for rel, digest in now.items():
            if base.get(rel) != digest:
                _copy(view / rel, self.committed / rel)
        for rel in base.keys() - now.keys():
            (self.committed / rel).unlink(missing_ok=True)
        self.views[task_id] = (view, now)
        self.commits.append((task_id, time.monotonic()))


# --- inputs, function calls, containers -----------------------------------------------------------------------


class DataStream:
    """One direction of a function call's data (data_in or data_out): indexed chunks, read by index."""

    def __init__(self) -> None:
        self.chunks: list[api_pb2.DataChunk] = []
        self.changed = asyncio.Condition()

    async def put(self, data_format: int, data: bytes) -> None:
        async with self.changed:
            self.chunks.append(
                api_pb2.DataChunk(data_format=data_format, data=data, index=len(self.chunks) + 1)
            )
            self.changed.notify_all()

    async def extend(self, chunks: list[api_pb2.DataChunk]) -> None:
        async with self.changed:
            self.chunks.extend(chunks)
            self.chunks.sort(key=lambda c: c.index)
            self.changed.notify_all()

    async def after(self, last_index: int) -> list[api_pb2.DataChunk]:
        """Chunks with index > last_index, waiting until there is at least one."""
        async with self.changed:
            await self.changed.wait_for(lambda: any(c.index > last_index for c in self.chunks))
            return [c for c in self.chunks if c.index > last_index]


@dataclass
class Call:
    """One input: its function call id, its data streams, and its output once the container sends it."""

    input_id: str
    call_id: str
    data_in: DataStream = field(default_factory=DataStream)
    data_out: DataStream = field(default_factory=DataStream)
    output: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Task:
    """One container: the function it runs, its input queue, its Volume views, and what it did (events)."""

    task_id: str
    function_id: str
    app_id: str
    inputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancels: asyncio.Queue = field(default_factory=asyncio.Queue)
    events: list[tuple[str, str, float]] = field(default_factory=list)  # (rpc, detail, monotonic time)
    port: int = 0
    running: bool = True
    restore_state: Path | None = (
        None  # a memory-snapshot container: where the worker writes its restore state
    )

    def event(self, rpc: str, detail: str = "") -> None:
        self.events.append((rpc, detail, time.monotonic()))


class ControlPlane:
    """Everything Modal's servers would hold: apps, functions, images, secrets, Volumes, Dicts, containers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids = itertools.count(1)
        self.apps: dict[str, str] = {}  # deployed name -> app id
        self.app_names: dict[str, str] = {}  # app id -> name
        self.app_objects: dict[str, dict[str, str]] = {}  # app id -> tag -> object id
        self.functions: dict[str, api_pb2.Function] = {}
        self.function_app: dict[str, str] = {}
        self.handle_metadata: dict[str, Any] = {}  # object id -> handle metadata message
        self.images: dict[str, api_pb2.Image] = {}
        self.mounts: dict[str, list[str]] = {}  # mount id -> file names
        self.mount_files: dict[str, bytes] = {}  # sha256 -> content
        self.secrets: dict[str, dict[str, str]] = {}  # secret id -> env
        self.named_secrets: dict[str, str] = {}
        self.volumes: dict[str, Volume] = {}
        self.named_volumes: dict[str, str] = {}
        self.dicts: dict[str, dict[bytes, bytes]] = {}
        self.named_dicts: dict[str, str] = {}
        self.tasks: dict[str, Task] = {}
        self.calls: dict[str, Call] = {}  # function call id -> call
        self.calls_by_input: dict[str, Call] = {}
        self.rpcs: list[str] = []  # every RPC name, in order (for tests that check a path was taken)
        # Split mode's box (issue 20): when set, a web endpoint's URL is `<web_base><label>`, which the ingress
        # routes to that label's container, so one container can call another's endpoint as Modal's URL would.
        self.web_base: str | None = None
        # function id -> the autoscaler override of `update_autoscaler` (a deploy of the function resets it)
        self.autoscaler: dict[str, api_pb2.AutoscalerSettings] = {}

    def web_url(self, name: str) -> str:
        return f"{self.web_base}{name}" if self.web_base else _web_url(name)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-box{next(self.ids)}"

    def secret(self, name: str, env: dict[str, str]) -> str:
        """Create (or replace) a named Secret, as `modal secret create` would."""
        secret_id = self.named_secrets.get(name) or self.new_id("st")
        self.secrets[secret_id] = dict(env)
        self.named_secrets[name] = secret_id
        return secret_id

    def volume(self, name: str) -> Volume:
        return self.volumes[self.named_volumes[name]]

    def app_layout(self, app_id: str) -> api_pb2.AppLayout:
        objects = self.app_objects.get(app_id, {})
        function_ids = {t: o for t, o in objects.items() if o.startswith("fu-")}
        class_ids = {t: o for t, o in objects.items() if o.startswith("cs-")}
        ids = set(objects.values())
        for fid in function_ids.values():
            ids |= {d.object_id for d in self.functions[fid].object_dependencies}
        layout = api_pb2.AppLayout(function_ids=function_ids, class_ids=class_ids)
        for oid in sorted(ids):
            obj = api_pb2.Object(object_id=oid)
            meta = self.handle_metadata.get(oid)
            if isinstance(meta, api_pb2.FunctionHandleMetadata):
                obj.function_handle_metadata.CopyFrom(meta)
            elif isinstance(meta, api_pb2.ClassHandleMetadata):
                obj.class_handle_metadata.CopyFrom(meta)
            elif isinstance(meta, api_pb2.VolumeMetadata):
                obj.volume_metadata.CopyFrom(meta)
            elif isinstance(meta, api_pb2.MountHandleMetadata):
                obj.mount_handle_metadata.CopyFrom(meta)
            layout.objects.append(obj)
        return layout

    def function_metadata(self, function_id: str) -> api_pb2.FunctionHandleMetadata:
        f = self.functions[function_id]
        app_id = self.function_app.get(function_id, "")
        return api_pb2.FunctionHandleMetadata(
            function_name=f.function_name,
            function_type=f.function_type,
            web_url=f.web_url,
            is_method=f.is_method,
            class_parameter_info=f.class_parameter_info,
            method_handle_metadata={
                name: api_pb2.FunctionHandleMetadata(
                    function_name=m.function_name,
                    function_type=m.function_type,
                    web_url=m.web_url,
                    is_method=True,
                    use_method_name=name,
                    function_schema=m.function_schema,
                    supported_input_formats=m.supported_input_formats,
                    supported_output_formats=m.supported_output_formats,
                    app_id=app_id,
                )
                for name, m in f.method_definitions.items()
            },
            function_schema=f.function_schema,
            definition_id=f"de-{function_id}",
            supported_input_formats=f.supported_input_formats,
            supported_output_formats=f.supported_output_formats,
            app_id=app_id,
        )

    def function_data(self, function_id: str) -> api_pb2.FunctionData:
        f = self.functions[function_id]
        return api_pb2.FunctionData(
            function_name=f.function_name,
            function_type=f.function_type,
            ranked_functions=[api_pb2.FunctionData.RankedFunction(rank=0, function=f)],
        )

    def running(self, function_id: str) -> int:
        return sum(1 for t in self.tasks.values() if t.function_id == function_id and t.running)


# --- the servicer ---------------------------------------------------------------------------------------------


def _web_url(name: str) -> str:
    return f"https://box--{name}.modal.run"


class Servicer(api_grpc.ModalClientBase):
    """The RPCs we need. `task` is set on a container's own port, None on the client port."""

    def __init__(self, plane: ControlPlane, task: Task | None = None) -> None:
        self.plane = plane
        self.task = task

    async def _recv(self, stream: Any, name: str) -> Any:
        request = await stream.recv_message()
        self.plane.rpcs.append(name)
        return request

    def _task(self) -> Task:
        if self.task is None:
            raise GRPCError(Status.FAILED_PRECONDITION, "box: a container RPC on the client port")
        return self.task

    # --- client ----------------------------------------------------------------------------------------------

    async def ClientHello(self, stream: Any) -> None:
        await self._recv(stream, "ClientHello")
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "EnvironmentGetOrCreate")
        from typing import get_args

        from modal._image import ImageBuilderVersion

        name = req.deployment_name or ENVIRONMENT
        newest = max(
            v for v in get_args(ImageBuilderVersion) if v[0].isdigit()
        )  # the newest this client knows
        settings = api_pb2.EnvironmentSettings(image_builder_version=newest)
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(
                environment_id="en-box", metadata=api_pb2.EnvironmentMetadata(name=name, settings=settings)
            )
        )

    # --- apps ------------------------------------------------------------------------------------------------

    async def AppGetByDeploymentName(self, stream: Any) -> None:
        req = await self._recv(stream, "AppGetByDeploymentName")
        await stream.send_message(
            api_pb2.AppGetByDeploymentNameResponse(
                app_id=self.plane.apps.get(req.name, ""), environment_name=ENVIRONMENT
            )
        )

    async def AppCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "AppCreate")
        app_id = self.plane.new_id("ap")
        self.plane.app_names[app_id] = req.description
        await stream.send_message(
            api_pb2.AppCreateResponse(app_id=app_id, app_page_url=f"https://box/{app_id}")
        )

    async def AppGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "AppGetOrCreate")
        app_id = self.plane.apps.get(req.app_name)
        if app_id is None:
            if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
            app_id = self.plane.new_id("ap")
            self.plane.apps[req.app_name] = app_id
            self.plane.app_names[app_id] = req.app_name
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id))

    async def AppPublish(self, stream: Any) -> None:
        req = await self._recv(stream, "AppPublish")
        self.plane.app_objects[req.app_id] = {**req.function_ids, **req.class_ids}
        if req.app_state == api_pb2.APP_STATE_DEPLOYED:
            self.plane.apps[req.name] = req.app_id
            self.plane.app_names[req.app_id] = req.name
        await stream.send_message(
            api_pb2.AppPublishResponse(url=f"https://box/apps/{req.name}", deployed_at=time.time())
        )

    async def AppGetLayout(self, stream: Any) -> None:
        req = await self._recv(stream, "AppGetLayout")
        await stream.send_message(api_pb2.AppGetLayoutResponse(app_layout=self.plane.app_layout(req.app_id)))

    async def AppClientDisconnect(self, stream: Any) -> None:
        await self._recv(stream, "AppClientDisconnect")
        await stream.send_message(Empty())

    async def AppHeartbeat(self, stream: Any) -> None:
        await self._recv(stream, "AppHeartbeat")
        await stream.send_message(Empty())

    # --- images and mounts: every build "succeeds" -----------------------------------------------------------

    async def ImageGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "ImageGetOrCreate")
        image_id = self.plane.new_id("im")
        self.plane.images[image_id] = req.image
        await stream.send_message(
            api_pb2.ImageGetOrCreateResponse(
                image_id=image_id,
                result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
                metadata=api_pb2.ImageMetadata(image_builder_version=req.builder_version),
            )
        )

    async def ImageJoinStreaming(self, stream: Any) -> None:
        await self._recv(stream, "ImageJoinStreaming")
        await stream.send_message(
            api_pb2.ImageJoinStreamingResponse(
                result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
                metadata=api_pb2.ImageMetadata(),
            )
        )

    async def MountGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "MountGetOrCreate")
        mount_id = self.plane.new_id("mo")
        self.plane.mounts[mount_id] = [f.filename for f in req.files]
        meta = api_pb2.MountHandleMetadata(content_checksum_sha256_hex="box")
        self.plane.handle_metadata[mount_id] = meta
        await stream.send_message(api_pb2.MountGetOrCreateResponse(mount_id=mount_id, handle_metadata=meta))

    async def MountBatchedCheckExistence(self, stream: Any) -> None:
        req = await self._recv(stream, "MountBatchedCheckExistence")
        missing = [h for h in req.sha256_hex_hashes if h not in self.plane.mount_files]
        await stream.send_message(
            api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)
        )

    async def MountPutFile(self, stream: Any) -> None:
        req = await self._recv(stream, "MountPutFile")
        if req.WhichOneof("data_oneof") == "data":
            self.plane.mount_files[req.sha256_hex] = req.data
            await stream.send_message(api_pb2.MountPutFileResponse(exists=True))
        else:
            await stream.send_message(
                api_pb2.MountPutFileResponse(exists=req.sha256_hex in self.plane.mount_files)
            )

    # --- named objects ---------------------------------------------------------------------------------------

    async def SecretGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "SecretGetOrCreate")
        kind = req.object_creation_type
        if kind in (
            api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP,
            api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL,
        ):
            secret_id = self.plane.new_id("st")
            self.plane.secrets[secret_id] = dict(req.env_dict)
        elif req.deployment_name in self.plane.named_secrets:
            secret_id = self.plane.named_secrets[req.deployment_name]
        elif kind == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
            raise GRPCError(Status.NOT_FOUND, f"Secret '{req.deployment_name}' not found")
        else:
            secret_id = self.plane.secret(req.deployment_name, dict(req.env_dict))
        await stream.send_message(
            api_pb2.SecretGetOrCreateResponse(
                secret_id=secret_id, metadata=api_pb2.SecretMetadata(name=req.deployment_name)
            )
        )

    async def VolumeGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "VolumeGetOrCreate")
        name = req.deployment_name
        volume_id = self.plane.named_volumes.get(name)
        if volume_id is None:
            if req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
                raise GRPCError(Status.NOT_FOUND, f"Volume '{name}' not found")
            volume_id = self.plane.new_id("vo")
            self.plane.volumes[volume_id] = Volume(volume_id, name, self.plane.root / "volumes" / name)
            self.plane.named_volumes[name] = volume_id
        meta = api_pb2.VolumeMetadata(name=name, version=api_pb2.VOLUME_FS_VERSION_V1)
        self.plane.handle_metadata[volume_id] = meta
        await stream.send_message(
            api_pb2.VolumeGetOrCreateResponse(volume_id=volume_id, version=meta.version, metadata=meta)
        )

    async def VolumeCommit(self, stream: Any) -> None:
        req = await self._recv(stream, "VolumeCommit")
        task = self._task()
        volume = self.plane.volumes[req.volume_id]
        if task.task_id not in volume.views:
            raise GRPCError(
                Status.FAILED_PRECONDITION, f"volume {volume.name} is not mounted in this container"
            )
        volume.commit(task.task_id)
        task.event("VolumeCommit", volume.name)
        await stream.send_message(api_pb2.VolumeCommitResponse(skip_reload=False))

    async def VolumeReload(self, stream: Any) -> None:
        req = await self._recv(stream, "VolumeReload")
        task = self._task()
        volume = self.plane.volumes[req.volume_id]
        volume.reload(task.task_id)
        task.event("VolumeReload", volume.name)
        await stream.send_message(Empty())

    async def DictGetOrCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "DictGetOrCreate")
        dict_id = self.plane.named_dicts.get(req.deployment_name)
        if dict_id is None:
            if req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{req.deployment_name}' not found")
            dict_id = self.plane.new_id("di")
            self.plane.dicts[dict_id] = {}
            self.plane.named_dicts[req.deployment_name] = dict_id
        await stream.send_message(
            api_pb2.DictGetOrCreateResponse(
                dict_id=dict_id, metadata=api_pb2.DictMetadata(name=req.deployment_name)
            )
        )

    async def DictGet(self, stream: Any) -> None:
        req = await self._recv(stream, "DictGet")
        d = self.plane.dicts[req.dict_id]
        await stream.send_message(api_pb2.DictGetResponse(value=d.get(req.key), found=req.key in d))

    async def DictContains(self, stream: Any) -> None:
        req = await self._recv(stream, "DictContains")
        await stream.send_message(
            api_pb2.DictContainsResponse(found=req.key in self.plane.dicts[req.dict_id])
        )

    async def DictUpdate(self, stream: Any) -> None:
        req = await self._recv(stream, "DictUpdate")
        d = self.plane.dicts[req.dict_id]
        if req.if_not_exists:  # put(skip_if_exists=True): atomic put-if-absent of one key
            if len(req.updates) != 1:
                raise GRPCError(Status.INVALID_ARGUMENT, "if_not_exists with several updates")
            if req.updates[0].key in d:
                await stream.send_message(api_pb2.DictUpdateResponse(created=False))
                return
        for u in req.updates:
            d[u.key] = u.value
        await stream.send_message(api_pb2.DictUpdateResponse(created=True))

    async def DictPop(self, stream: Any) -> None:
        req = await self._recv(stream, "DictPop")
        d = self.plane.dicts[req.dict_id]
        if req.key in d:
            await stream.send_message(api_pb2.DictPopResponse(found=True, value=d.pop(req.key)))
        else:
            await stream.send_message(api_pb2.DictPopResponse(found=False))

    async def DictHeartbeat(self, stream: Any) -> None:
        await self._recv(stream, "DictHeartbeat")
        await stream.send_message(Empty())

    # --- functions and classes -------------------------------------------------------------------------------

    async def FunctionPrecreate(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionPrecreate")
        function_id = req.existing_function_id or self.plane.new_id("fu")
        methods = {
            name: api_pb2.FunctionHandleMetadata(
                function_name=m.function_name,
                function_type=m.function_type,
                web_url=self.plane.web_url(m.webhook_config.requested_suffix or name)
                if m.webhook_config.type
                else None,
                is_method=True,
                use_method_name=name,
                function_schema=m.function_schema,
                supported_input_formats=m.supported_input_formats,
                supported_output_formats=m.supported_output_formats,
                app_id=req.app_id,
            )
            for name, m in req.method_definitions.items()
        }
        await stream.send_message(
            api_pb2.FunctionPrecreateResponse(
                function_id=function_id,
                handle_metadata=api_pb2.FunctionHandleMetadata(
                    function_name=req.function_name,
                    function_type=req.function_type,
                    method_handle_metadata=methods,
                    function_schema=req.function_schema,
                    app_id=req.app_id,
                ),
            )
        )

    async def FunctionCreate(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionCreate")
        function_id = req.existing_function_id or self.plane.new_id("fu")
        f = api_pb2.Function()
        # A GPU fallback list comes as FunctionData with one ranked Function per GPU: the box runs the first.
        f.CopyFrom(
            req.function_data.ranked_functions[0].function if req.HasField("function_data") else req.function
        )
        if f.experimental_options.get("enable_gpu_snapshot", "").lower() == "true":
            f._experimental_enable_gpu_snapshot = True  # as Modal's server reads experimental_options
        if f.webhook_config.type:
            f.web_url = self.plane.web_url(f.webhook_config.requested_suffix or f.function_name)
        for name, m in f.method_definitions.items():
            if m.webhook_config.type:
                m.web_url = self.plane.web_url(m.webhook_config.requested_suffix or name)
        self.plane.functions[function_id] = f
        self.plane.function_app[function_id] = req.app_id
        self.plane.autoscaler.pop(function_id, None)  # a deploy resets update_autoscaler's override
        meta = self.plane.function_metadata(function_id)
        self.plane.handle_metadata[function_id] = meta
        await stream.send_message(
            api_pb2.FunctionCreateResponse(
                function_id=function_id,
                function_data=self.plane.function_data(function_id),
                handle_metadata=meta,
            )
        )

    async def ClassCreate(self, stream: Any) -> None:
        await self._recv(stream, "ClassCreate")
        class_id = self.plane.new_id("cs")
        self.plane.handle_metadata[class_id] = api_pb2.ClassHandleMetadata()
        await stream.send_message(api_pb2.ClassCreateResponse(class_id=class_id))

    def _lookup(self, app_name: str, tag: str) -> str:
        app_id = self.plane.apps.get(app_name)
        if app_id is None:
            raise GRPCError(Status.NOT_FOUND, f"App '{app_name}' not found")
        object_id = self.plane.app_objects.get(app_id, {}).get(tag)
        if object_id is None:
            raise GRPCError(Status.NOT_FOUND, f"Object '{tag}' not found in app '{app_name}'")
        return object_id

    async def ClassGet(self, stream: Any) -> None:
        req = await self._recv(stream, "ClassGet")
        class_id = self._lookup(req.app_name, req.object_tag)
        await stream.send_message(
            api_pb2.ClassGetResponse(class_id=class_id, handle_metadata=api_pb2.ClassHandleMetadata())
        )

    async def FunctionGet(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionGet")
        function_id = self._lookup(req.app_name, req.object_tag)
        await stream.send_message(
            api_pb2.FunctionGetResponse(
                function_id=function_id,
                handle_metadata=self.plane.function_metadata(function_id),
                function=self.plane.function_data(function_id),
            )
        )

    async def ContainerCheckpoint(self, stream: Any) -> None:
        """A memory-snapshot container is ready to be snapshotted: the box snapshots nothing, records the moment
        and restores it at once, as the worker does, by writing the restore state file the container waits for."""
        req = await self._recv(stream, "ContainerCheckpoint")
        task = self._task()
        task.event("ContainerCheckpoint", req.checkpoint_id)
        if task.restore_state is not None:
            task.restore_state.write_text(json.dumps({"task_id": task.task_id}))
        await stream.send_message(Empty())

    async def FunctionUpdateSchedulingParams(self, stream: Any) -> None:
        """`update_autoscaler`: the fields it sets override the deployed ones until the next deploy."""
        req = await self._recv(stream, "FunctionUpdateSchedulingParams")
        if req.function_id not in self.plane.functions:
            raise GRPCError(Status.NOT_FOUND, f"Function '{req.function_id}' not found")
        current = api_pb2.AutoscalerSettings()
        current.CopyFrom(self.plane.functions[req.function_id].autoscaler_settings)
        override = self.plane.autoscaler.setdefault(req.function_id, api_pb2.AutoscalerSettings())
        override.MergeFrom(req.settings)
        current.MergeFrom(override)
        await stream.send_message(api_pb2.FunctionUpdateSchedulingParamsResponse(current_settings=current))

    async def FunctionGetCurrentStats(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionGetCurrentStats")
        await stream.send_message(api_pb2.FunctionStats(num_total_tasks=self.plane.running(req.function_id)))

    # --- containers ------------------------------------------------------------------------------------------

    async def ContainerHello(self, stream: Any) -> None:
        await self._recv(stream, "ContainerHello")
        self._task().event("ContainerHello")
        await stream.send_message(Empty())

    async def ContainerHeartbeat(self, stream: Any) -> None:
        await self._recv(stream, "ContainerHeartbeat")
        task = self._task()
        try:  # a long poll: answer at once when an input is to be cancelled
            input_id = await asyncio.wait_for(task.cancels.get(), HEARTBEAT_HOLD)
        except TimeoutError:
            await stream.send_message(api_pb2.ContainerHeartbeatResponse())
            return
        task.event("CancelInput", input_id)
        await stream.send_message(
            api_pb2.ContainerHeartbeatResponse(
                cancel_input_event=api_pb2.CancelInputEvent(input_ids=[input_id])
            )
        )

    async def ContainerStop(self, stream: Any) -> None:
        req = await self._recv(stream, "ContainerStop")
        task = self._task()
        task.event("ContainerStop", "graceful" if req.graceful else "")
        if req.graceful:
            task.inputs.put_nowait(api_pb2.FunctionGetInputsItem(kill_switch=True))
        await stream.send_message(api_pb2.ContainerStopResponse())

    async def FunctionGetInputs(self, stream: Any) -> None:
        await self._recv(stream, "FunctionGetInputs")
        task = self._task()
        task.event("FunctionGetInputs")
        try:
            item = await asyncio.wait_for(task.inputs.get(), GET_INPUTS_HOLD)
        except TimeoutError:
            await stream.send_message(api_pb2.FunctionGetInputsResponse())
            return
        task.event("Input", item.input_id or "kill_switch")
        await stream.send_message(api_pb2.FunctionGetInputsResponse(inputs=[item]))

    async def FunctionGetDynamicConcurrency(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionGetDynamicConcurrency")
        await stream.send_message(
            api_pb2.FunctionGetDynamicConcurrencyResponse(concurrency=req.target_concurrency)
        )

    async def FunctionPutOutputs(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionPutOutputs")
        task = self._task()
        for item in req.outputs:
            task.event("Output", item.input_id)
            call = self.plane.calls_by_input.get(item.input_id)
            if call is not None and not call.output.done():
                call.output.set_result(item)
        await stream.send_message(Empty())

    async def FunctionCallGetDataIn(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionCallGetDataIn")
        call = self.plane.calls[req.function_call_id]
        last = req.last_index
        while True:  # the stream stays open: the container reads it for the input's whole life
            for chunk in await call.data_in.after(last):
                await stream.send_message(chunk)
                last = chunk.index

    async def FunctionCallPutDataOut(self, stream: Any) -> None:
        req = await self._recv(stream, "FunctionCallPutDataOut")
        await self.plane.calls[req.function_call_id].data_out.extend(list(req.data_chunks))
        await stream.send_message(Empty())

    async def TaskResult(self, stream: Any) -> None:
        req = await self._recv(stream, "TaskResult")
        self._task().event("TaskResult", api_pb2.GenericResult.GenericStatus.Name(req.result.status))
        await stream.send_message(Empty())


def _unimplemented(name: str) -> Callable[..., Any]:
    async def handler(self: Servicer, stream: Any) -> None:
        await stream.recv_message()
        self.plane.rpcs.append(name)
        raise GRPCError(Status.UNIMPLEMENTED, f"the Modal box does not stand in for {name}")

    return handler


for _name in list(Servicer.__abstractmethods__):
    setattr(Servicer, _name, _unimplemented(_name))
Servicer.__abstractmethods__ = frozenset()
