"""Fakes for the Modal objects the maintenance path touches, behaving like Modal's where it matters.

- `FakeVolume`: a committed state (Modal's side) and, per container, a mounted view copied from it. Writes in a
  view stay invisible to every other view until `commit()` publishes them (whole files, last writer wins), and a
  view sees others' commits only after `reload()`; a reload drops what was not committed. So a function that forgets
  to commit, or to reload before it reads, fails the tests as it would fail on Modal.
- The Dict is `shared.state.locks.lease.DirDict`: the same atomic put-if-absent as `modal.Dict.put(skip_if_exists=True)`.
- `FakeModal.lookup(name)` stands for `modal.Function.from_name(app, name)`: `.remote(**kw)` runs the real body of
  the function in `apps/maintenance.py` (via `Function.local`) in a "maintenance container" whose Modal objects are
  these fakes; an undeployed app raises NotFoundError like Modal's lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from modal.exception import NotFoundError

from shared.operations import maintenance
from shared.state.locks import lease

_COMMITS = itertools.count()  # orders commits across Volumes


def _state(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = (
                f"link:{os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            )
    return out


def _clear(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class Mount:
    """A container's view of a FakeVolume at `path` (what /data or /backups is in that container)."""

    def __init__(self, volume: FakeVolume, path: Path) -> None:
        self.volume = volume
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.reload()

    def reload(self) -> None:
        _clear(self.path)
        shutil.copytree(self.volume.committed, self.path, symlinks=True, dirs_exist_ok=True)
        self.base = _state(self.path)
        self.volume.reloads += 1

    def commit(self) -> None:
        now = _state(self.path)
        for rel, digest in now.items():
            if self.base.get(rel) != digest:
                dst = self.volume.committed / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                src = self.path / rel
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                else:
                    shutil.copy2(src, dst)
        for rel in self.base.keys() - now.keys():
            (self.volume.committed / rel).unlink(missing_ok=True)
        self.base = now
        self.volume.commits += 1
        self.volume.last_commit = next(_COMMITS)

    def dirty(self) -> bool:
        return _state(self.path) != self.base


class FakeVolume:
    """A Modal Volume: `committed` is what Modal holds; containers see it through `mount()`ed views."""

    def __init__(self, root: Path) -> None:
        self.committed = Path(root)
        self.committed.mkdir(parents=True, exist_ok=True)
        self.commits = 0
        self.reloads = 0
        self.last_commit = -1  # position of its latest commit among all Volumes' commits

    def mount(self, path: Path) -> Mount:
        return Mount(self, path)

    # The client-side calls `tabby-modal` makes (modal.Volume's names): they act on the committed state.

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[Any]:
        volume = self

        class Batch:
            def put_file(self, local: str, remote: str) -> None:
                dst = volume.committed / remote.lstrip("/")
                if dst.exists() and not force:
                    raise FileExistsError(remote)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, dst)

        yield Batch()

    def read_file_into_fileobj(self, path: str, fileobj: BinaryIO) -> int:
        src = self.committed / path.lstrip("/")
        if not src.is_file():
            raise FileNotFoundError(path)
        n = 0
        with open(src, "rb") as f:
            while chunk := f.read(1 << 16):
                fileobj.write(chunk)
                n += len(chunk)
        return n

    def remove_file(self, path: str, recursive: bool = False) -> None:
        target = self.committed / path.lstrip("/")
        if not target.exists():
            raise FileNotFoundError(path)
        shutil.rmtree(target) if target.is_dir() else target.unlink()


class FakeFunction:
    def __init__(self, modal: FakeModal, name: str) -> None:
        self.modal, self.name = modal, name

    def remote(self, **kwargs: Any) -> Any:
        self.modal.calls.append((self.name, kwargs))
        fn = getattr(self.modal.app_module, self.name, None)
        if not self.modal.deployed or fn is None or not hasattr(fn, "local"):
            raise NotFoundError(f"Lookup failed for Function '{self.name}' from the 'tabby-maintenance' app")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*executing locally.*")  # the fakes are the Volumes
            return fn.local(**kwargs)


class FakeModal:
    """One Modal workspace: the two Volumes, the leases Dict, a maintenance container, the server's stats."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import apps.maintenance as app_module

        self.app_module = app_module
        self.data = FakeVolume(tmp / "modal/volumes/data")
        self.backups = FakeVolume(tmp / "modal/volumes/backups")
        self.locks = lease.DirDict(tmp / "modal/dict")
        self.server_running = 0
        self.deployed = True
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # The maintenance container: its own views of both Volumes, at the mount points its settings name.
        container = tmp / "modal/maintenance-container"
        self.data_view = self.data.mount(container / "data")
        self.backups_view = self.backups.mount(container / "backups")
        monkeypatch.setenv("TABBY_MODAL_DATA_MOUNT", str(self.data_view.path))
        monkeypatch.setenv("TABBY_MODAL_BACKUPS_MOUNT", str(self.backups_view.path))
        monkeypatch.setattr(app_module, "data", self.data_view)
        monkeypatch.setattr(app_module, "backups", self.backups_view)
        monkeypatch.setattr(lease, "modal_dict", lambda settings: self.locks)
        monkeypatch.setattr(maintenance, "server_containers", lambda settings: lambda: self.server_running)

    def lookup(self, name: str) -> FakeFunction:
        return FakeFunction(self, name)

    def remote_ops(self, settings: Any) -> Any:
        from shared.operations.remote import RemoteOps

        return RemoteOps(settings, lookup=self.lookup, backups=self.backups, locks=self.locks)
