"""Atomic, durable batch writes (writes.py; docs/architecture.md, invariant 5).

Temp files, one syncfs before and one after the renames, renames through directory
handles opened link-free; a failure costs that file only and leaves the old version.
"""

from __future__ import annotations

from collections.abc import Callable
import errno
import os
from pathlib import Path
import stat
from typing import Any

import pytest

from custom_components.mynas.engine.errors import (
    MyNasError,
    PathRefused,
    PeerDiskFull,
    ProtocolError,
)
from custom_components.mynas.engine.host import disk, writes
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import charge
from custom_components.mynas.engine.host.space import HostedSpace
from custom_components.mynas.engine.host.writes import IncomingFile

from .jail_support import MIB, MTIME, assert_consistent, files_under, push, put, snapshot

# --- atomic, durable writes -----------------------------------------------------------------


def test_batch_writes_content_mode_and_mtime(jail: Jail) -> None:
    files = {b"plain": b"p", b"exec": b"e", b"setuid": b"s", b"private": b""}
    modes = {b"plain": 0o644, b"exec": 0o755, b"setuid": 0o4755, b"private": 0o600}
    items = [
        IncomingFile(path, memoryview(data), MTIME, modes[path]) for path, data in files.items()
    ]
    for item in items:
        jail.quota.reserve(charge(len(item.data)))
    assert jail.write_batch(items) == [None] * 4
    for path, data in files.items():
        info = os.lstat(jail.root / os.fsdecode(path))
        assert (jail.root / os.fsdecode(path)).read_bytes() == data
        assert info.st_mtime_ns == MTIME
    got = {p: stat.S_IMODE(os.lstat(jail.root / os.fsdecode(p)).st_mode) for p in files}
    assert got == {b"plain": 0o644, b"exec": 0o755, b"setuid": 0o755, b"private": 0o644}
    assert_consistent(jail)


def test_failing_write_leaves_no_temp_and_the_old_version(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(jail, b"b", b"old b")
    real = disk.write_all

    def disk_full_on_b(fd: int, data: bytes | memoryview) -> None:
        if bytes(data).startswith(b"new b"):
            os.write(fd, b"new")  # some bytes reach the temp file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", disk_full_on_b)
    results = push(jail, {b"a": b"new a", b"b": b"new b" * 100, b"c": b"new c"})
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], PeerDiskFull)
    assert "No space left" in str(results[1])
    assert (jail.root / "b").read_bytes() == b"old b"
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)


def test_unexpected_os_error_fails_only_that_file(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = disk.write_all

    def broken(fd: int, data: bytes | memoryview) -> None:
        if bytes(data) == b"bad":
            raise OSError(errno.EIO, "Input/output error")
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", broken)
    results = push(jail, {b"a": b"bad", b"b": b"good"})
    assert type(results[0]) is MyNasError
    assert "Input/output error" in str(results[0])
    assert results[1] is None
    assert_consistent(jail)


class Crash(BaseException):
    """Not an OSError nor a MyNasError: the batch itself aborts (e.g. the thread dies)."""


def test_crash_of_the_writing_thread_cleans_up(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    put(jail, b"b", b"old b")
    real = jail._writer._install_at
    calls = []

    def crash_on_second(dirs: Any, source: bytes, rel: bytes) -> None:
        calls.append(rel)
        if len(calls) == 2:
            raise Crash
        real(dirs, source, rel)

    monkeypatch.setattr(jail._writer, "_install_at", crash_on_second)
    with pytest.raises(Crash):
        push(jail, {b"a": b"new a", b"b": b"new b", b"c": b"new c"})
    assert (jail.root / "a").read_bytes() == b"new a"
    assert (jail.root / "b").read_bytes() == b"old b"
    assert not (jail.root / "c").exists()
    assert_consistent(jail)


def test_directory_in_the_way_fails_that_file(jail: Jail) -> None:
    jail.make_dir(b"d/sub")
    results = push(jail, {b"d": b"file", b"e": b"fine"})
    assert isinstance(results[0], PathRefused)
    assert results[1] is None
    assert (jail.root / "d" / "sub").is_dir()
    assert_consistent(jail)


def before_syncfs(monkeypatch: pytest.MonkeyPatch, first: Callable[[bytes], None]) -> None:
    """Run ``first(path)`` before each real ``disk.syncfs(path)`` (it may raise instead)."""
    real = disk.syncfs

    def watched(path: bytes) -> None:
        first(path)
        real(path)

    monkeypatch.setattr(disk, "syncfs", watched)


def test_batch_is_made_durable_before_and_after_the_renames(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    before_syncfs(monkeypatch, lambda _path: seen.append(sorted(os.listdir(jail.root))))
    push(jail, {b"a": b"1", b"b": b"2"})
    assert seen == [[], ["a", "b"]]  # one syncfs before any final name, one after


def test_failing_syncfs_fails_the_batch(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    put(jail, b"a", b"old")

    def broken(_path: bytes) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk, "syncfs", broken)
    results = push(jail, {b"a": b"new", b"b": b"new"})
    assert all(type(r) is MyNasError for r in results)
    assert (jail.root / "a").read_bytes() == b"old"
    assert not (jail.root / "b").exists()
    assert_consistent(jail)


def test_failing_second_syncfs_is_not_acknowledged(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def second_fails(path: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    before_syncfs(monkeypatch, second_fails)
    results = push(jail, {b"a": b"1"})
    assert isinstance(results[0], PeerDiskFull)  # in place, but the caller must not ack
    assert (jail.root / "a").read_bytes() == b"1"
    assert_consistent(jail)


def test_parent_deleted_during_the_batch_is_made_again(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = disk.syncfs
    first: list[bool] = []

    def delete_parent(path: bytes) -> None:
        if not first:
            first.append(True)
            jail.delete(b"dir")  # another thread of the same peer, between stage and rename
        real(path)

    jail.make_dir(b"dir/sub")  # there when the batch starts...
    monkeypatch.setattr(disk, "syncfs", delete_parent)
    assert push(jail, {b"dir/sub/f": b"data"}) == [None]
    assert (jail.root / "dir" / "sub" / "f").read_bytes() == b"data"
    assert_consistent(jail)


def test_same_path_twice_in_one_batch(jail: Jail) -> None:
    items = [IncomingFile(b"a", b"first", MTIME, 0o644), IncomingFile(b"a", b"second", MTIME, 0)]
    for item in items:
        jail.quota.reserve(charge(len(item.data)))
    assert jail.write_batch(items) == [None, None]
    assert (jail.root / "a").read_bytes() == b"second"
    assert list(files_under(jail.trash_dir).values()) == [b"first"]
    assert_consistent(jail)


def test_bad_modification_time_fails_that_file(jail: Jail) -> None:
    results = push(jail, {b"a": b"1"}, mtime_ns=1 << 64)
    assert isinstance(results[0], ProtocolError)
    with pytest.raises(ProtocolError, match="out of range"):
        jail.set_mtime(b"a", -(1 << 70))
    with pytest.raises(ProtocolError, match="out of range"):
        jail.make_dir(b"d", 1 << 63)
    assert_consistent(jail)


def fails_with(code: int) -> Callable[..., None]:
    """A stand-in for a system call that fails with ``code`` whatever it is given."""

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def test_overwrite_without_hard_links(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    """exFAT and FAT have no hard links: the old version is moved, then the new one renamed."""

    put(jail, b"a", b"old")
    monkeypatch.setattr(os, "link", fails_with(errno.EPERM))
    put(jail, b"a", b"new")
    assert (jail.root / "a").read_bytes() == b"new"
    assert list(files_under(jail.trash_dir).values()) == [b"old"]
    assert_consistent(jail)


@pytest.mark.parametrize("links", [True, False])
def test_failed_rename_keeps_the_old_version_in_place(
    jail: Jail, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    put(jail, b"a", b"old")
    real_rename = os.rename
    tmp = os.fsencode(jail.tmp_dir)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsencode(src).startswith(tmp):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    if not links:
        monkeypatch.setattr(os, "link", fails_with(errno.EOPNOTSUPP))
    results = push(jail, {b"a": b"new"})
    assert type(results[0]) is MyNasError
    assert (jail.root / "a").read_bytes() == b"old"
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)


def test_other_link_errors_fail_the_file(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    put(jail, b"a", b"old")
    monkeypatch.setattr(os, "link", fails_with(errno.EIO))
    assert type(push(jail, {b"a": b"new"})[0]) is MyNasError
    assert (jail.root / "a").read_bytes() == b"old"
    assert_consistent(jail)


# --- batch renames through directory handles ------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_nothing_held(jail: Jail) -> None:
    assert jail.quota.reserved == 0
    assert os.listdir(jail.tmp_dir) == []


def test_directory_replaced_by_a_link_between_batches_is_refused(jail: Jail, outside: Path) -> None:
    """The host's admin swaps a directory for a link: the next batch sees it, nothing leaks."""
    put(jail, b"d/sub/f1", b"one")
    os.rename(jail.root / "d" / "sub", jail.root / "moved")
    os.symlink(outside / "dir", jail.root / "d" / "sub")
    before = snapshot(outside)
    result = push(jail, {b"d/sub/f2": b"evil", b"d/sub/new/f3": b"evil"})
    assert all(isinstance(r, PathRefused) and "symbolic link" in str(r) for r in result)
    assert snapshot(outside) == before
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_link_swapped_in_while_a_batch_is_staged_is_refused(
    jail: Jail, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the temp files and their renames: the renames still refuse the new link."""
    put(jail, b"d/f0", b"zero")
    real = disk.syncfs

    def swap(path: bytes) -> None:
        if not (jail.root / "moved").exists():
            os.rename(jail.root / "d", jail.root / "moved")
            os.symlink(outside, jail.root / "d")
        real(path)

    monkeypatch.setattr(disk, "syncfs", swap)
    before = snapshot(outside)
    result = push(jail, {b"d/f1": b"evil"})
    assert isinstance(result[0], PathRefused)
    assert "symbolic link" in str(result[0])
    assert snapshot(outside) == before
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_batch_refuses_what_is_in_the_way(jail: Jail) -> None:
    put(jail, b"file", b"f")
    os.mkfifo(jail.root / "fifo")
    fds = open_fds()
    result = push(jail, {b"file/x": b"1", b"fifo": b"2", b"fifo/x": b"3", b"ok": b"4"})
    assert "is not a directory" in str(result[0])
    assert "neither a regular file nor a directory" in str(result[1])
    assert "is not a directory" in str(result[2])
    assert result[3] is None
    assert open_fds() == fds
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_batch_into_a_missing_jail_root_is_refused(space: HostedSpace) -> None:
    bob = space.jail("bob", MIB)
    bob.root.rmdir()
    result = push(bob, {b"x": b"1"})
    assert isinstance(result[0], PathRefused)
    assert "missing" in str(result[0])
    assert bob.quota.reserved == 0


def test_deep_trees_in_one_batch(jail: Jail) -> None:
    """Deeper than the handles a batch keeps: switching between deep directories works."""
    deep = b"/".join(b"l%02d" % n for n in range(writes._HELD_LEVELS + 4))
    files = {
        deep + b"/a": b"a",
        deep + b"/b": b"b",  # the same deep directory: its handle is reused
        deep + b"/x/c": b"c",
        deep[:-4] + b"/y/d": b"d",  # a sibling branch, above the deepest level
        b"l00/top": b"e",
        deep + b"/x/e": b"f",
    }
    fds = open_fds()
    assert push(jail, files) == [None] * len(files)
    assert open_fds() == fds
    for path, data in files.items():
        assert (jail.root / os.fsdecode(path)).read_bytes() == data
    # A file in the way deep down fails that file only, and no handle is left open.
    put(jail, deep + b"/x/y", b"file")
    result = push(jail, {deep + b"/x/y/z/w": b"1", deep + b"/x/ok": b"2"})
    assert "is not a directory" in str(result[0])
    assert result[1] is None
    assert open_fds() == fds
    assert_consistent(jail)


def test_batch_directory_race_with_another_thread(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.mkdir

    def someone_else_first(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        real(path, mode, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "mkdir", someone_else_first)
    assert push(jail, {b"d/f": b"1"}) == [None]
    monkeypatch.undo()
    assert jail.quota.used == charge(1)  # the other thread paid for the directory
    assert jail.quota.reserved == 0


def test_batch_directory_error_fails_the_file(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_path: Any, _mode: int = 0o777, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", full)
    result = push(jail, {b"d/f": b"1"})
    monkeypatch.undo()
    assert isinstance(result[0], PeerDiskFull)
    assert_consistent(jail)


@pytest.mark.parametrize("umask", [0o077, None])
def test_modes_hold_whatever_the_umask(
    jail: Jail, monkeypatch: pytest.MonkeyPatch, umask: int | None
) -> None:
    """Temp files are made with their final mode; a umask that takes bits away is undone."""
    monkeypatch.setattr(disk, "umask", lambda: umask)
    old = os.umask(0o077)
    try:
        push(jail, {b"plain": b"p"})
        push(jail, {b"exec": b"e"}, mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE((jail.root / "plain").lstat().st_mode) == 0o644
    assert stat.S_IMODE((jail.root / "exec").lstat().st_mode) == 0o755


# --- modification times ---------------------------------------------------------------------


def test_extreme_modification_times_are_stored(jail: Jail) -> None:
    for mtime in (0, -(1 << 63), (1 << 63) - 1):
        assert push(jail, {b"t": b"x"}, mtime_ns=mtime) == [None]
    jail.make_dir(b"d", -(1 << 63))
