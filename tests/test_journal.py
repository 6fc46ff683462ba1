"""The change journal (`shared.state.mirror.journal.LiveTree`) on real files and real inotify: after every kind of
change `nodes()` equals a fresh `scan()`, a call with nothing changed says so, and each safety net (overflow, watch
limit, root replaced, periodic full scan, no inotify) ends in a full scan."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.state import mirror
from shared.state.mirror import journal
from shared.state.mirror.journal import Inotify, LiveTree, WatchLimit
from shared.state.mirror.scan import META_DIR, excluded, scan
from tests.harness import mirrored_hashes
from tests.tabby_root import make_root

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/sys/fs/inotify"), reason="needs Linux inotify")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_root(tmp_path / "live", size_mb=0.2, seed=3)
    return tmp_path / "live"


@pytest.fixture
def tree(root: Path):
    with LiveTree(root) as t:
        nodes, changed = t.nodes()
        assert changed and nodes == scan(root)
        assert t.stats["last_full_scan"] == "first"
        yield t


def check(tree: LiveTree) -> bool:
    """`nodes()` equals `scan()`; returns `changed`."""
    nodes, changed = tree.nodes()
    assert nodes == scan(tree.root)
    return changed


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def bump_mtime(path: Path) -> None:
    """A later mtime than any write of this test could have left (kernel clocks are coarse)."""
    st = path.lstat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000), follow_symlinks=False)


REPO = "repositories/https_github.com_example_project.git"


def op_create(r: Path) -> None:
    write(r / "events/new.json", b"{}\n")


def op_append(r: Path) -> None:
    with open(r / "config.toml", "ab") as f:
        f.write(b"# more\n")


def op_same_size_rewrite(r: Path) -> None:
    p = r / "usage_anonymous_id"
    data = p.read_bytes()
    with open(p, "r+b") as f:  # in place: the directory's mtime does not move
        f.write(bytes(reversed(data)))
    bump_mtime(p)


def op_chmod(r: Path) -> None:
    os.chmod(r / "config.toml", 0o600)


def op_touch(r: Path) -> None:
    bump_mtime(r / "config.toml")


def op_rename_within(r: Path) -> None:
    os.rename(r / "config.toml", r / "config.old.toml")


def op_rename_across(r: Path) -> None:
    os.rename(r / "config.toml", r / "ee/jobs/1/config.toml")


def op_dir_rename(r: Path) -> None:
    os.rename(r / "ee/jobs", r / "ee/old-jobs")


def op_dir_move_across(r: Path) -> None:
    os.rename(r / "ee/jobs", r / f"{REPO}/src/jobs")


def op_dir_delete(r: Path) -> None:
    shutil.rmtree(r / f"{REPO}/src")


def op_nested_fast(r: Path) -> None:
    # Created and filled before any watch can be on them: the journal must list them after watching.
    for i in range(3):
        os.makedirs(r / f"new/a{i}/b/c")
        for j in range(5):
            (r / f"new/a{i}/b/c/f{j}").write_bytes(b"x" * j)
            (r / f"new/a{i}/g{j}").write_bytes(b"y" * j)


def op_symlink_create(r: Path) -> None:
    os.symlink("../config.toml", r / "events/link")


def op_symlink_replace(r: Path) -> None:
    os.symlink("src/mod0/other.py", r / f"{REPO}/main.tmp-link")
    os.replace(r / f"{REPO}/main.tmp-link", r / f"{REPO}/main.py")


def op_symlink_to_dir(r: Path) -> None:
    os.symlink("ee", r / "ee-link")  # never followed: a link node, nothing below it


def op_file_to_dir(r: Path) -> None:
    (r / "config.toml").unlink()
    write(r / "config.toml/inner", b"now a dir")


def op_dir_to_file(r: Path) -> None:
    shutil.rmtree(r / "ee/jobs")
    write(r / "ee/jobs", b"now a file")


def op_dir_swap(r: Path) -> None:
    # Two directories trade names: same paths, other inodes (and other contents) under them.
    write(r / "ee/jobs/only-in-jobs", b"1")
    os.rename(r / "ee/jobs", r / "ee/swap")
    os.rename(r / "events", r / "ee/jobs")
    os.rename(r / "ee/swap", r / "events")


def op_dir_replaced_same_name(r: Path) -> None:
    os.rename(r / "ee/jobs", r.parent / "outside")
    write(r / "ee/jobs/1/stdout.log", b"another dir, same name")


def op_dir_moved_in_from_outside(r: Path) -> None:
    write(r.parent / "incoming/x/y.txt", b"from outside")
    os.rename(r.parent / "incoming", r / "incoming")


def op_unexcluded_rename(r: Path) -> None:
    # A directory under an excluded name (never listed, never watched) renamed to a mirrored one.
    write(r / "events/pending.lock/inside.json", b"{}")
    os.rename(r / "events/pending.lock", r / "events/done")


OPS: dict[str, Callable[[Path], None]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_nodes_equal_scan_after_each_kind_of_change(root: Path, tree: LiveTree, name: str) -> None:
    OPS[name](root)
    assert check(tree) is True
    assert tree.stats["full_scans"] == 1  # all of it from events, no fallback scan
    assert check(tree) is False


def test_hard_links_written_through_another_name(root: Path, tree: LiveTree) -> None:
    """inotify reports a write only in the directory of the name written through: the other names of a file with
    several links are re-stat'ed on every call (a new link: one full scan finds its other names)."""
    os.link(root / "config.toml", root / "ee/config-link")
    assert check(tree) is True and tree.stats["last_full_scan"] == "hard-link"
    for path in ("ee/config-link", "config.toml", "ee/config-link"):
        with open(root / path, "ab") as f:
            f.write(b"# through " + path.encode() + b"\n")
        assert check(tree) is True
    os.chmod(root / "ee/config-link", 0o600)
    assert check(tree) is True
    assert tree.stats["full_scans"] == 2  # the first, and the one for the new link
    assert check(tree) is False


def test_hard_link_under_an_excluded_name(root: Path, tree: LiveTree) -> None:
    os.link(root / "config.toml", root / "ee/config.lock")  # never mirrored, never listed
    assert check(tree) is True and tree.stats["last_full_scan"] == "hard-link"
    with open(root / "ee/config.lock", "ab") as f:
        f.write(b"# through the excluded name\n")
    assert check(tree) is True and tree.stats["full_scans"] == 2
    assert check(tree) is False


def test_nothing_changed_returns_the_cached_map_fast(root: Path, tree: LiveTree) -> None:
    first, _ = tree.nodes()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        nodes, changed = tree.nodes()
        times.append(time.perf_counter() - t)
        assert changed is False and nodes is first
    assert tree.last_changes == set()
    assert sorted(times)[10] < 0.002  # median; well under a millisecond on an idle machine


def test_last_changes_names_what_changed(root: Path, tree: LiveTree) -> None:
    op_create(root)
    os.rename(root / "config.toml", root / "ee/config.toml")
    assert check(tree) is True
    assert tree.last_changes == {"events/new.json", "config.toml", "ee/config.toml"}


def test_excluded_paths_are_ignored(root: Path, tree: LiveTree) -> None:
    write(root / "models/TabbyML/new.gguf", b"m")
    write(root / f"{META_DIR}/x.json", b"{}")
    write(root / "ee/db.sqlite-wal", b"wal")
    write(root / "index/.tantivy-writer.lock", b"")
    write(root / f"{REPO}/.git/index.lock", b"")
    assert check(tree) is False
    assert not any(root.name in str(p) or "models" in str(p) for p in tree._dirs)  # never watched


def test_overflow_ends_in_a_full_scan(root: Path, tree: LiveTree) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    a, b = root / "config.toml", root / "usage_anonymous_id"
    for i in range(limit // 2 + 100):  # alternating: the kernel merges only identical consecutive events
        os.chmod(a, 0o600 | (i & 1) * 0o40)
        os.chmod(b, 0o600 | (i & 1) * 0o40)
    write(root / "index/after-overflow", b"its event is dropped: the queue is full")
    assert check(tree) is True
    assert tree.stats["last_full_scan"] == "overflow"
    assert check(tree) is False


def test_periodic_full_scan_catches_what_inotify_never_reports(root: Path) -> None:
    now = [1000.0]
    with LiveTree(root, full_scan_every=60.0, clock=lambda: now[0]) as tree:
        assert check(tree)
        # A write through a shared mmap changes the mtime without any inotify event (the file's close event
        # comes only when the mapping goes).
        p = root / "config.toml"
        before = p.lstat().st_mtime_ns
        with open(p, "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
        with m:
            m[0:1] = b"#"
            m.flush()
            assert p.lstat().st_mtime_ns != before
            now[0] += 59.0
            nodes, changed = tree.nodes()
            assert changed is False and nodes["config.toml"].mtime_ns == before  # the hole the net is for
            now[0] += 1.0
            assert check(tree) is True
            assert tree.stats["last_full_scan"] == "periodic" and tree.stats["full_scans"] == 2
            assert check(tree) is False


def test_no_inotify_means_a_full_scan_every_call(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> Inotify:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(journal, "_open_inotify", fail)
    with LiveTree(root) as tree:
        for i in range(3):
            assert check(tree) is True
            assert tree.stats["last_full_scan"] == "no-inotify" and tree.stats["full_scans"] == i + 1
            write(root / f"events/n{i}", b"x")


def test_full_scan_every_zero_always_scans(root: Path) -> None:
    with LiveTree(root, full_scan_every=0) as tree:
        assert check(tree) and check(tree)
        assert tree.stats["full_scans"] == 2 and tree.stats["watches"] == 0


def test_watch_limit_falls_back_to_full_scans(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `fs.inotify.max_user_watches` were reached after the tree's current directories."""
    dirs = sum(1 for _ in os.walk(root))
    real = journal._open_inotify

    def limited() -> Inotify:
        ino = real()
        added: set[int] = set()
        add = ino.add_watch

        def add_watch(path: Path, mask: int = journal.WATCH_MASK) -> int:
            if len(added) >= dirs + 1:
                raise WatchLimit(28, "No space left on device", str(path))
            wd = add(path, mask)
            added.add(wd)
            return wd

        ino.add_watch = add_watch  # type: ignore[method-assign]
        return ino

    monkeypatch.setattr(journal, "_open_inotify", limited)
    with LiveTree(root) as tree:
        assert check(tree) is True and tree.stats["last_full_scan"] == "first"
        op_nested_fast(root)  # more directories than watches left
        assert check(tree) is True and tree.stats["last_full_scan"] == "watch-limit"
        write(root / "new/a2/b/c/later", b"in a directory without a watch")
        assert check(tree) is True and tree.stats["last_full_scan"] == "watch-limit"


@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_root_replaced_ends_in_a_full_scan(root: Path, tree: LiveTree, how: str) -> None:
    if how == "moved":
        os.rename(root, root.parent / "elsewhere")
    else:
        shutil.rmtree(root)
    write(root / "fresh/file", b"a new root at the same path")
    assert check(tree) is True
    assert tree.stats["last_full_scan"] == "root"
    write(root / "fresh/second", b"watched again")
    assert check(tree) is True and tree.stats["last_full_scan"] == "root"
    assert check(tree) is False


def test_an_error_inside_a_call_ends_in_a_full_scan_next_time(
    root: Path, tree: LiveTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that fails half-way (an unreadable directory, EIO) leaves its bookkeeping half-updated: the next
    call starts over with a full scan."""
    real = LiveTree._list

    def failing(self: LiveTree, rel: str):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(LiveTree, "_list", failing)
    write(root / "ee/jobs/1/new", b"x")
    os.rename(root / "events", root / "events-moved")
    with pytest.raises(OSError, match="Input/output"):
        tree.nodes()
    monkeypatch.setattr(LiveTree, "_list", real)
    assert check(tree) is True and tree.stats["last_full_scan"] == "error"
    assert check(tree) is False


def test_a_symlinked_root_is_followed_as_scan_does(root: Path) -> None:
    link = root.parent / "root-link"
    os.symlink(root.name, link)
    with LiveTree(link) as tree:
        assert check(tree) is True and len(tree.nodes()[0]) > 10
        op_create(link)
        assert check(tree) is True and tree.stats["full_scans"] == 1
        assert check(tree) is False


def test_closed_tree_refuses(root: Path) -> None:
    tree = LiveTree(root)
    tree.nodes()
    tree.close()
    with pytest.raises(ValueError, match="closed"):
        tree.nodes()


# --- Randomized -------------------------------------------------------------------------------------------------


def mirrored_dir_excluded(r: Path, d: Path) -> bool:
    parts = d.relative_to(r).parts
    return any(excluded("/".join(parts[: i + 1])) for i in range(len(parts)))


def random_op(r: Path, rng: random.Random, *, links: bool = True) -> bool:
    """One random change among files, links and directories of `r` (only inside `r`, models/ aside); True when it
    made a hard link."""
    dirs, files = [r], []
    for d, ds, fs in os.walk(r):
        ds[:] = [x for x in ds if x != "models"]
        dirs += [Path(d) / x for x in ds]
        files += [Path(d) / x for x in fs]
    d = rng.choice(dirs)
    f = rng.choice(files) if files else None
    name = f"n{rng.randrange(40)}" + rng.choices(["", ".py", ".lock", ".db-wal"], [6, 4, 1, 1])[0]
    kind = rng.randrange(16)
    try:
        if kind in (0, 14, 15) or f is None:
            write(d / name, rng.randbytes(rng.randrange(64)))
        elif kind == 1:
            with open(f, "ab") as fh:
                fh.write(b"+")
        elif kind == 2 and not f.is_symlink():
            data = f.read_bytes()
            with open(f, "r+b") as fh:
                fh.write(bytes(reversed(data)))
            bump_mtime(f)
        elif kind == 3 and not f.is_symlink():
            os.chmod(f, rng.choice([0o600, 0o644, 0o755]))
        elif kind == 4:
            os.rename(f, rng.choice(dirs) / name)
        elif kind == 5:
            f.unlink()
        elif kind == 6:
            os.makedirs(d / name / "x" / "y", exist_ok=True)
            write(d / name / "x" / "y" / "z", b"z")
            write(d / name / "w", b"w")
        elif kind == 7 and d != r:
            to = rng.choice(dirs) / name
            if not str(to).startswith(str(d) + "/"):
                os.rename(d, to)
        elif kind == 8 and d != r and len(dirs) > 12 and rng.random() < 0.2:
            shutil.rmtree(d)
        elif kind == 9:
            tmp = d / f".{name}.tmp-link"
            os.symlink(rng.choice(["a", "../b", "x/y"]), tmp)
            os.replace(tmp, d / name)
        elif kind == 10:
            f.unlink()
            write(f / "inner", b"file became a dir")
        elif kind == 11 and d != r and len(dirs) > 12 and rng.random() < 0.2:
            shutil.rmtree(d)
            write(d, b"dir became a file")
        elif kind == 12 and links and not f.is_symlink() and rng.random() < 0.3:
            # Not into an excluded directory: a known hole, left to the periodic full scan (module docstring).
            other = rng.choice([x for x in dirs if not mirrored_dir_excluded(r, x)]) / f"hl-{name}"
            os.link(f, other)
            return True
        elif kind == 13:
            bump_mtime(f)
    except OSError:
        pass  # a random op that does not apply here (e.g. renaming onto a non-empty directory)
    return False


def random_tree(root: Path, rng: random.Random) -> None:
    for i in range(30):
        write(root / f"d{i % 5}/e{i % 3}/f{i}", rng.randbytes(rng.randrange(100)))
    write(root / "models/m.gguf", b"m")


def run_random(root: Path, ops: int, seed: int, *, links: bool = True) -> None:
    rng = random.Random(seed)
    random_tree(root, rng)
    with LiveTree(root) as tree:
        assert check(tree)
        for i in range(ops):
            # A new hard link is seen before anything else happens to it: one written through and removed
            # between two calls is a known hole, left to the periodic full scan (module docstring).
            if random_op(root, rng, links=links) or rng.random() < 0.3:
                check(tree)
            if i % 50 == 0:
                assert tree.nodes()[0] == scan(root)
                assert tree.nodes()[1] is False
        assert check(tree) is not None
        # Events alone kept it right: no full scan but the first and those for new hard links.
        assert set(tree.stats["full_scans_by"]) <= ({"first", "hard-link"} if links else {"first"}), (
            tree.stats
        )
        assert len(tree.nodes()[0]) > 20 and tree.stats["watches"] > 10  # the tree did not wither away


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "events-only"])
def test_random_operations(tmp_path: Path, links: bool) -> None:
    run_random(tmp_path / "live", 300, seed=11, links=links)


@pytest.mark.stress
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "events-only"])
def test_random_operations_long(tmp_path: Path, seed: int, links: bool) -> None:
    run_random(tmp_path / "live", 5000, seed=seed, links=links)


# --- Persist with the journal -----------------------------------------------------------------------------------


def content(root: Path) -> dict[str, str]:
    """Every mirrored path's content hash (a link: its target)."""
    out = {}
    for p, n in scan(root).items():
        out[p] = n.link if n.link is not None else hashlib.sha256((root / p).read_bytes()).hexdigest()
    return out


def data_content(data: Path) -> dict[str, str]:
    """What a data dir holds, by the same measure (small files are read out of their packs)."""
    return {p: h[2:] if h.startswith("->") else h for p, h in mirrored_hashes(data).items()}


def test_persist_with_the_journal_keeps_the_data_dir_equal(tmp_path: Path) -> None:
    live, data = tmp_path / "live", tmp_path / "data"
    rng = random.Random(5)
    random_tree(live, rng)
    with LiveTree(live) as tree:
        for _ in range(25):
            for _ in range(rng.randrange(1, 6)):
                random_op(live, rng)
            mirror.persist(live, data, live_tree=tree)
            assert data_content(data) == content(live)
