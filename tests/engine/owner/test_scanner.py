"""Tests of the scanner: the diff of a real tree against the index, excludes, checked reads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import os
from pathlib import Path
import shutil
import socket
import stat
import tempfile
import time
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.errors import SourceMissing
from custom_components.mynas.engine.owner.index import Index, IndexEntry
from custom_components.mynas.engine.owner.run import MAX_REPORTED
from custom_components.mynas.engine.owner.scanner import (
    Action,
    Change,
    Excludes,
    ScanReport,
    read_file_checked,
    scan,
)

FILE, DIR = tree.Kind.FILE, tree.Kind.DIR
NEW, CHANGED, DELETED = Action.NEW, Action.CHANGED, Action.DELETED
F, P = "Photos", "bob"
T0 = 1_600_000_000_000_000_000

type Snapshot = dict[bytes, tuple[tree.Kind, int, int, int]]


# --- helpers ------------------------------------------------------------------------------


def reference(root: bytes) -> Snapshot:
    """Key → (kind, size, mtime_ns, mode) of a tree, computed without tree.walk."""
    found: Snapshot = {}

    def visit(rel: bytes) -> None:
        for name in os.listdir(root + b"/" + rel if rel else root):
            path = rel + b"/" + name if rel else name
            info = os.lstat(root + b"/" + path)
            # Only the owner's exec bit of a file is replicated; directories are all 0o755.
            if stat.S_ISDIR(info.st_mode):
                found[path + b"/"] = (DIR, 0, info.st_mtime_ns, 0o755)
                visit(path)
            elif stat.S_ISREG(info.st_mode):
                mode = 0o755 if info.st_mode & 0o100 else 0o644
                found[path] = (FILE, info.st_size, info.st_mtime_ns, mode)

    visit(b"")
    return found


def expected_changes(before: Snapshot, after: Snapshot) -> set[tuple[Action, bytes]]:
    changed = {(CHANGED, key) for key in before.keys() & after.keys() if before[key] != after[key]}
    return (
        {(NEW, key) for key in after.keys() - before.keys()}
        | {(DELETED, key) for key in before.keys() - after.keys()}
        | changed
    )


def summary(changes: Iterable[Change]) -> list[tuple[Action, bytes]]:
    return [(c.action, c.entry.key) for c in changes]


def apply(index: Index, changes: list[Change]) -> None:
    """Do what the replicator does once the host acknowledged every change."""
    index.forget(F, P, ((c.entry.path, c.entry.kind) for c in changes if c.action is DELETED))
    sent = [c.entry for c in changes if c.action is not DELETED]
    assert all(isinstance(e, tree.Entry) for e in sent)
    index.record(F, P, (IndexEntry.from_entry(e) for e in sent if isinstance(e, tree.Entry)))


def check_order(changes: list[Change]) -> None:
    """Parents come before children; a kind change is DELETED (all of it) then NEW."""
    position = {(c.action, c.entry.key): i for i, c in enumerate(changes)}
    for i, change in enumerate(changes):
        path = change.entry.path
        if b"/" in path and change.action is NEW:
            parent = path.rpartition(b"/")[0] + b"/"
            assert position.get((NEW, parent), -1) < i
        if change.action is NEW and change.entry.kind is FILE:
            # Everything deleted at or below a directory of the same name comes first.
            for c in changes[i:]:
                assert not (c.action is DELETED and c.entry.key.startswith(path + b"/"))
        if change.action is NEW and change.entry.kind is DIR:
            assert position.get((DELETED, path), -1) < i


def write(path: bytes, content: bytes, mtime_ns: int | None = None) -> None:
    with open(path, "wb") as handle:
        handle.write(content)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def build(root: bytes, spec: dict[bytes, Any]) -> None:
    """Create ``spec`` (name → bytes content or nested dict) under ``root``."""
    for name, value in spec.items():
        path = root + b"/" + name
        if isinstance(value, dict):
            os.mkdir(path)
            build(path, value)
        else:
            write(path, value)


def run(source: Path | bytes, index: Index, **kwargs: Any) -> list[Change]:
    changes = list(scan(source, index.entries(F, P), **kwargs))
    apply(index, changes)
    return changes


# Big or many trees go to a tmpfs when there is one: creating 50,000 files on a busy disk
# took from 1 to 20 s here, on tmpfs 0.3 s.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    with Index(tmp_path / "index.db") as opened:
        yield opened


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    return path


# --- the property: any tree, any edits, scans that converge ---------------------------------

NAMES = (
    st.lists(
        st.sampled_from(
            [b"a", b"b", b".", b"-", b" ", b"\n", b"\xff", "é".encode(), "日".encode()]
        ),
        min_size=1,
        max_size=3,
    )
    .map(b"".join)
    .filter(lambda name: name not in (b".", b".."))
)
TREES = st.dictionaries(
    NAMES,
    st.recursive(
        st.binary(max_size=12),
        lambda children: st.dictionaries(NAMES, children, max_size=4),
        max_leaves=12,
    ),
    max_size=5,
)
EDITS = ["keep", "keep", "keep", "edit", "touch", "chmod", "delete", "rename", "replace"]


def mutate(root: bytes, data: st.DataObject) -> None:
    """Edit, touch, chmod, delete, rename or replace entries, then add a few new ones."""
    clock = iter(range(T0 + 10**9, T0 + 10**12, 10**9))
    # Deepest first (reverse key order), so a directory's own fate comes after its children's.
    for key in sorted(reference(root), reverse=True):
        is_dir = key.endswith(b"/")
        path = root + b"/" + key.rstrip(b"/")
        edit = data.draw(st.sampled_from(EDITS))
        if edit == "edit" and not is_dir:
            size = os.path.getsize(path)
            write(path, b"x" * data.draw(st.sampled_from([size, size + 1])), next(clock))
        elif edit == "touch":
            stamp = next(clock)
            os.utime(path, ns=(stamp, stamp))
        elif edit == "chmod":
            os.chmod(path, 0o700 if is_dir else 0o755)  # the exec bit is what counts
        elif edit == "delete":
            shutil.rmtree(path) if is_dir else os.unlink(path)
        elif edit == "rename":
            os.rename(path, path + b"~")
        elif edit == "replace" and is_dir:
            shutil.rmtree(path)
            write(path, b"now a file")
        elif edit == "replace":
            os.unlink(path)
            os.mkdir(path)
            write(path + b"/inside", b"")
    dirs = [b""] + [k[:-1] for k in reference(root) if k.endswith(b"/")]
    for _ in range(data.draw(st.integers(0, 3))):
        parent = data.draw(st.sampled_from(dirs))
        path = root + b"/" + (parent + b"/" if parent else b"") + data.draw(NAMES) + b"+"
        if not os.path.lexists(path):
            os.mkdir(path) if data.draw(st.booleans()) else write(path, b"new")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=TREES, data=st.data())
def test_scans_converge_on_any_tree(spec: dict[bytes, Any], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        root = os.fsencode(tmp) + b"/src"
        os.mkdir(root)
        build(root, spec)
        with Index(os.path.join(tmp, "index.db")) as index:
            before = reference(root)
            report = ScanReport()
            first = run(root, index, report=report)
            assert summary(first) == [(NEW, key) for key in sorted(before)]
            assert (report.files, report.dirs, report.bytes) == (
                sum(1 for kind, *_ in before.values() if kind is FILE),
                sum(1 for kind, *_ in before.values() if kind is DIR),
                sum(size for _, size, *_ in before.values()),
            )

            mutate(root, data)
            after = reference(root)
            second = run(root, index)
            assert len(set(summary(second))) == len(second)
            assert set(summary(second)) == expected_changes(before, after)
            check_order(second)
            for change in second:
                if change.action is CHANGED:
                    assert change.old is not None
                    assert change.old.key == change.entry.key

            assert run(root, index) == []


# --- kind changes, unreadable directories, the source itself ---------------------------------


def not_mere_changes(changes: list[Change]) -> list[tuple[Action, bytes]]:
    """The summary without the entries whose content merely changed: what came and went."""
    return [(a, k) for a, k in summary(changes) if a is not CHANGED]


def test_a_file_becoming_a_directory_and_back(source: Path, index: Index) -> None:
    root = os.fsencode(source)
    build(root, {b"a": b"1", b"a b": b"2", b"a.txt": b"3", b"b": {b"x": b"4", b"y": {}}})
    run(source, index)

    os.unlink(root + b"/a")
    build(root, {b"a": {b"inner": b"5"}})
    shutil.rmtree(root + b"/b")
    write(root + b"/b", b"6")
    assert not_mere_changes(run(source, index)) == [
        (DELETED, b"a"),
        (NEW, b"a/"),
        (NEW, b"a/inner"),
        (DELETED, b"b/"),
        (DELETED, b"b/x"),
        (DELETED, b"b/y/"),
        (NEW, b"b"),
    ]
    # Now a directory "a" is indexed with two names sorting between "a" and "a/".
    shutil.rmtree(root + b"/a")
    write(root + b"/a", b"7")
    assert not_mere_changes(run(source, index)) == [
        (DELETED, b"a/"),
        (DELETED, b"a/inner"),
        (NEW, b"a"),
    ]
    assert run(source, index) == []


def test_new_files_wait_until_the_index_is_past_their_name(source: Path, index: Index) -> None:
    root = os.fsencode(source)
    build(root, {b"a b": b"1", b"a.txt": b"2", b"c": b"3"})
    run(source, index)
    # "a" might still be an indexed directory "a/" until the index passes "a0"; "a-" until
    # it passes "a-0", which comes first.
    build(root, {b"a": b"new", b"a-": b"new", b"d": b"new"})
    assert summary(run(source, index)) == [(NEW, b"a-"), (NEW, b"a"), (NEW, b"d")]


def test_changes_to_size_mtime_and_mode(source: Path, index: Index) -> None:
    root = os.fsencode(source)
    build(root, {b"d": {b"size": b"12", b"mtime": b"12", b"mode": b"12", b"same": b"12"}})
    for name in (b"d/size", b"d/mtime", b"d/mode", b"d/same", b"d"):
        os.utime(root + b"/" + name, ns=(T0, T0))
    run(source, index)
    write(root + b"/d/size", b"123", T0)
    os.utime(root + b"/d/mtime", ns=(T0, T0 + 1))
    os.chmod(root + b"/d/mode", 0o700)  # the exec bit is what a replica keeps
    write(root + b"/d/same", b"34", T0)  # same size and mtime: not seen (no hashing here)
    changes = run(source, index)
    assert summary(changes) == [(CHANGED, b"d/mode"), (CHANGED, b"d/mtime"), (CHANGED, b"d/size")]
    assert changes[0].old is not None
    assert changes[0].old.mode == 0o644
    os.utime(root + b"/d", ns=(T0, T0 + 5))
    assert summary(run(source, index)) == [(CHANGED, b"d/")]


def unlistable(monkeypatch: pytest.MonkeyPatch, *paths: bytes) -> None:
    """Make ``os.scandir`` fail on ``paths`` (tests run as root, where chmod 000 does not)."""
    real = os.scandir

    def scandir(path: Any) -> Any:
        if os.fsencode(path) in paths:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unlistable_directory_hides_nothing_and_deletes_nothing(
    source: Path, index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = os.fsencode(source)
    build(root, {b"locked": {b"a": b"1", b"sub": {b"b": b"2"}}, b"locked0": b"3", b"z": b"4"})
    run(source, index)
    os.unlink(root + b"/z")
    unlistable(monkeypatch, root + b"/locked")
    report = ScanReport()
    changes = run(source, index, report=report)
    assert summary(changes) == [(DELETED, b"z")]
    assert report.errors == [(b"locked", "cannot list this directory: Permission denied")]
    assert (report.files, report.dirs, report.error_count) == (1, 1, 0)
    assert index.stats(F, P) == (3, 3)  # locked/a, locked/sub/b, locked0 still indexed

    monkeypatch.undo()
    assert run(source, index) == []


def test_a_new_unlistable_directory_is_new_alone(
    source: Path, index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = os.fsencode(source)
    build(root, {b"locked": {b"a": b"1"}})
    unlistable(monkeypatch, root + b"/locked")
    assert summary(run(source, index)) == [(NEW, b"locked/")]


def test_only_the_first_errors_are_kept(
    source: Path, index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = os.fsencode(source)
    names = [b"d%03d" % i for i in range(MAX_REPORTED + 5)]
    build(root, {name: {} for name in names})
    unlistable(monkeypatch, *(root + b"/" + name for name in names))
    report = ScanReport()
    run(source, index, report=report)
    assert [path for path, _ in report.errors] == names[:MAX_REPORTED]
    assert report.error_count == 5


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_missing_source_raises_before_any_change(tmp_path: Path, index: Index, kind: str) -> None:
    path = tmp_path / "gone"
    if kind == "file":
        path.write_bytes(b"")
    index.record(F, P, [IndexEntry(b"x", FILE, 1, 1, 0o644, None)])
    changes = scan(path, index.entries(F, P))
    with pytest.raises(SourceMissing, match="gone") as caught:
        next(changes)
    assert caught.value.path == str(path)


def test_a_directory_size_means_nothing(source: Path) -> None:
    (source / "d").mkdir()
    info = (source / "d").stat()
    # E.g. rebuilt from a host listing, where a directory's st_size is a block size.
    indexed = IndexEntry(b"d", DIR, 4096, info.st_mtime_ns, 0o755, None)
    assert list(scan(source, [indexed])) == []


def test_symlinks_and_special_files_are_skipped_and_counted(source: Path, index: Index) -> None:
    (source / "file").write_bytes(b"1")
    (source / "link").symlink_to("file")
    (source / "dirlink").symlink_to(source)
    os.mkfifo(source / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(source / "sock"))
        report = ScanReport()
        assert summary(run(source, index, report=report)) == [(NEW, b"file")]
    assert report.skipped == 4
    # A file replaced by a symlink is no longer backed up.
    (source / "file").unlink()
    (source / "file").symlink_to("fifo")
    assert summary(run(source, index)) == [(DELETED, b"file")]


def test_index_entries_out_of_order_are_refused(source: Path) -> None:
    entries = [IndexEntry(b"b", FILE, 1, 1, 0o644, None), IndexEntry(b"a", FILE, 1, 1, 0o644, None)]
    with pytest.raises(ValueError, match="out of order"):
        list(scan(source, entries))


# --- the walk itself --------------------------------------------------------------------------


def test_walk_rows_are_the_walk_as_tuples(source: Path) -> None:
    root = os.fsencode(source)
    build(root, {b"a": {b"b": b"12", b"c": {}}, b"a.txt": b"123", b"z": b""})
    os.chmod(root + b"/z", 0o700)
    walked = [(e.key, e.size, e.mtime_ns, e.mode) for e in tree.walk(root)]
    assert list(tree.walk_rows(root)) == walked
    assert [row[0] for row in walked] == [b"a.txt", b"a/", b"a/b", b"a/c/", b"z"]
    assert walked[-1][3] == 0o755  # only the owner's exec bit counts
    assert [row[0] for row in tree.walk_rows(root, start=b"a")] == [b"a/b", b"a/c/"]


def test_walk_skips_what_vanishes_and_raises_without_on_error(
    source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = os.fsencode(source)
    build(root, {b"kept": b"1"})

    class Gone:
        name = b"gone"

        def stat(self, *, follow_symlinks: bool) -> os.stat_result:
            raise FileNotFoundError(2, "No such file or directory")

    real = os.scandir

    class Listing:
        def __init__(self, path: Any) -> None:
            self._real = real(path)

        def __enter__(self) -> Iterator[Any]:
            return iter([*self._real, Gone()])

        def __exit__(self, *_exc: object) -> None:
            self._real.close()

    monkeypatch.setattr(os, "scandir", Listing)
    assert [e.path for e in tree.walk(root)] == [b"kept"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        list(tree.walk(root + b"/missing"))


# --- excludes ----------------------------------------------------------------------------------


def test_excludes(source: Path, index: Index) -> None:
    root = os.fsencode(source)
    build(
        root,
        {
            b"a.tmp": b"",
            b"\xff.tmp": b"",
            b".DS_Store": b"",
            b"keep.txt": b"",
            b"node_modules": {b"x": b""},
            b"Photos": {
                b"cache": {b"1.jpg": b"", b"sub": {b"2.jpg": b""}},
                b"c.jpg": b"",
                b"node_modules": b"a file with that name",
                b"build": b"file",
                b"deep": {b".DS_Store": b"", b"build": {b"o": b""}},
            },
            b"build": {b"o": b""},
        },
    )
    patterns = ["*.tmp", ".DS_Store", "node_modules", "Photos/cache/*", "build/", "/", ""]
    changes = run(source, index, exclude=patterns)
    assert summary(changes) == [
        (NEW, b"Photos/"),
        (NEW, b"Photos/build"),
        (NEW, b"Photos/c.jpg"),
        (NEW, b"Photos/cache/"),
        (NEW, b"Photos/deep/"),
        (NEW, b"keep.txt"),
    ]
    # Excluded now, indexed before: the host moves them to trash.
    assert summary(run(source, index, exclude=["Photos/", "*.txt"])) == sorted(
        [
            (DELETED, b"Photos/"),
            (DELETED, b"Photos/build"),
            (DELETED, b"Photos/c.jpg"),
            (DELETED, b"Photos/cache/"),
            (DELETED, b"Photos/deep/"),
            (NEW, b"\xff.tmp"),
            (NEW, b".DS_Store"),
            (NEW, b"a.tmp"),
            (NEW, b"build/"),
            (NEW, b"build/o"),
            (DELETED, b"keep.txt"),
            (NEW, b"node_modules/"),
            (NEW, b"node_modules/x"),
        ],
        key=lambda change: change[1],
    )


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "excluded"),
    [
        ("*.tmp", b"a/b/c.tmp", False, True),
        ("*.tmp", b"a.tmp/x", False, False),  # the directory itself is pruned by the walk
        ("build/", b"src/build", True, True),
        ("build/", b"src/build", False, False),
        ("/build", b"build", False, True),
        ("/build", b"src/build", False, False),
        ("src/*.o", b"src/a/b.o", False, True),  # fnmatch: "*" crosses "/"
        ("src/*/", b"src/a", True, True),
        ("src/*/", b"src/a", False, False),
        ("é*", "éte".encode(), False, True),
        ("?", b"\xff", False, True),
        ("[!a]", b"a", False, False),
        ("*", b"\n", False, True),
    ],
)
def test_exclude_patterns(pattern: str, path: bytes, is_dir: bool, excluded: bool) -> None:
    assert Excludes([pattern])(path, is_dir) is excluded


# --- reading a file for sending ------------------------------------------------------------------


def walked(path: Path) -> tree.Entry:
    info = path.stat()
    return tree.Entry(path.name.encode(), FILE, info.st_size, info.st_mtime_ns, 0o644)


def test_read_file_checked_returns_the_content(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    assert read_file_checked(os.fsencode(path), walked(path)) == b"hello"
    (tmp_path / "empty").write_bytes(b"")
    assert read_file_checked(os.fsencode(tmp_path / "empty"), walked(tmp_path / "empty")) == b""


def test_read_file_checked_sees_a_file_that_changed_since_the_walk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    seen = walked(path)
    raw = os.fsencode(path)
    os.utime(path, ns=(T0, T0))
    assert read_file_checked(raw, seen) is None  # same size, other mtime
    write(raw, b"hello!", seen.mtime_ns)
    assert read_file_checked(raw, seen) is None  # grew, mtime put back
    write(raw, b"hell", seen.mtime_ns)
    assert read_file_checked(raw, seen) is None  # shrank, mtime put back
    path.unlink()
    assert read_file_checked(raw, seen) is None  # vanished
    assert read_file_checked(os.fsencode(tmp_path / "no/dir"), seen) is None


def patch_read(monkeypatch: pytest.MonkeyPatch, after: Callable[[], None], limit: int) -> None:
    real = os.read

    def read(fd: int, size: int) -> bytes:
        data = real(fd, min(size, limit))
        after()
        return data

    monkeypatch.setattr(os, "read", read)


@pytest.mark.parametrize("how", ["append", "touch"])
def test_read_file_checked_sees_a_file_that_changes_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    seen = walked(path)

    def modify() -> None:
        if how == "append":
            with path.open("ab") as handle:
                handle.write(b"!")
        else:
            os.utime(path, ns=(T0, T0))

    patch_read(monkeypatch, modify, 1 << 20)
    assert read_file_checked(os.fsencode(path), seen) is None


def test_read_file_checked_completes_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    seen = walked(path)
    patch_read(monkeypatch, lambda: None, 3)
    assert read_file_checked(os.fsencode(path), seen) == b"0123456789"
    path.write_bytes(b"01234")
    os.utime(path, ns=(seen.mtime_ns, seen.mtime_ns))
    assert read_file_checked(os.fsencode(path), seen) is None  # EOF before the size seen


def test_read_file_checked_refuses_symlinks_and_special_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    seen = walked(target)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        read_file_checked(os.fsencode(tmp_path / "link"), seen)
    os.mkfifo(tmp_path / "fifo")  # O_NONBLOCK: no writer, yet no hang
    fifo = os.stat(tmp_path / "fifo")
    expected = tree.Entry(b"fifo", FILE, 0, fifo.st_mtime_ns, 0o644)
    assert read_file_checked(os.fsencode(tmp_path / "fifo"), expected) is None
    with pytest.raises(IsADirectoryError):
        read_file_checked(os.fsencode(tmp_path), seen)


# --- memory ------------------------------------------------------------------------------------


def test_memory_does_not_grow_with_the_tree(index: Index) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        root = os.fsencode(tmp)
        started = time.monotonic()
        for d in range(100):
            directory = b"%s/dir%03d" % (root, d)
            os.mkdir(directory)
            for f in range(500):
                name = b"%s/file-%05d" % (directory, f)
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
        created = time.monotonic() - started
        report = ScanReport()
        tracemalloc.start()
        try:
            count = sum(1 for _ in scan(root, index.entries(F, P), report=report))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == 50_100
    assert report.files == 50_000
    # A list of the changes alone would take about 15 MB; one listing of 500 entries ~0.2 MB.
    assert peak < 3_000_000, f"peak {peak} bytes (creating the tree took {created:.1f} s)"
