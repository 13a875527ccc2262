"""One peer's jail (jail.py): reads, mtimes and directories, usage persisted and recounted."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import time
from typing import Any

import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.errors import PathRefused, PeerDiskFull
from custom_components.mynas.engine.host import paths, quota
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import BLOCK, DIR_CHARGE, charge
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import DAY, MIB, MTIME, assert_consistent, jail_charge, push, put

# --- usage and state ------------------------------------------------------------------------


def test_rescan_equals_the_sum_of_charges(space: HostedSpace, jail: Jail) -> None:
    push(jail, {b"a/b/c": b"x" * 5000, b"a/d": b"", b"e": b"y" * 4096, b"f": b"z" * 4097})
    jail.make_dir(b"empty/dirs")
    put(jail, b"e", b"new")
    jail.delete(b"a/b")
    with jail.begin_upload(b"big", 3 * BLOCK, MTIME, 0o644) as upload:
        upload.write(b"p" * 5000)
    expected = jail_charge(jail)
    assert jail.quota.used == expected
    jail.quota.set_used(0)
    assert space.rescan("alice") == expected == jail.quota.used
    assert jail.usage() == quota.JailUsage(used=expected, reserved=0, quota=64 * MIB)


def test_restart_starts_from_the_persisted_usage(space: HostedSpace, jail: Jail) -> None:
    put(jail, b"a", b"x" * 10000)
    space.persist()
    used = jail.quota.used
    assert HostedSpace(space.root).jail("alice", MIB).quota.used == used
    # A wrong persisted value (a crash between a write and a persist) is fixed by rescan.
    state = json.loads(jail.state_path.read_text())
    jail.state_path.write_text(json.dumps({**state, "used": 1}))
    restarted = HostedSpace(space.root)
    assert restarted.jail("alice", MIB).quota.used == 1
    assert restarted.rescan("alice") == used
    assert json.loads(jail.state_path.read_text())["used"] == used


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"used": -5, "retention": 3}'])
def test_damaged_state_starts_from_zero(space: HostedSpace, content: bytes) -> None:
    space.jail("bob", MIB)
    (space.root / ".mynas" / "peers" / "bob" / "state.json").write_bytes(content)
    bob = HostedSpace(space.root).jail("bob", MIB)
    assert bob.quota.used == 0
    assert bob.retention_days(b"x") == 30


# --- listing and hashing --------------------------------------------------------------------


def test_list_is_in_canonical_order(jail: Jail) -> None:
    names = [b"a.txt", b"a/b", b"a-b", b"a/c.txt", b"b", b"\xff", b"A", b"a b/x", b"sub/\n"]
    push(jail, {name: name for name in names})
    jail.make_dir(b"a/empty", MTIME)
    os.mkdir(jail.root / ".mynas-host-made")  # never shown
    entries = list(jail.list())
    keys = [entry.key for entry in entries]
    assert keys == sorted(keys)
    assert {e.path for e in entries if e.kind is tree.Kind.FILE} == set(names)
    sub = list(jail.list(b"a"))
    assert [e.path for e in sub] == [b"a/b", b"a/c.txt", b"a/empty"]
    assert (sub[2].kind, sub[2].mtime_ns) == (tree.Kind.DIR, MTIME)
    assert jail.stat(b"a/b") == tree.Entry(b"a/b", tree.Kind.FILE, 3, MTIME, 0o644)
    assert jail.stat(b"a/empty").kind is tree.Kind.DIR
    lazy = jail.list(b"a.txt")  # checked on the first next(), in the caller's worker thread
    with pytest.raises(PathRefused, match="not a directory"):
        next(lazy)
    with pytest.raises(FileNotFoundError):
        list(jail.list(b"missing"))


def test_list_survives_a_directory_vanishing(jail: Jail) -> None:
    push(jail, {b"a/x": b"1", b"b/y": b"2"})
    entries = jail.list()
    first = next(entries)
    assert first.path == b"a"
    jail.delete(b"a")  # deleted by another thread while the listing runs
    assert [e.path for e in entries] == [b"b", b"b/y"]


def test_hash_matches_the_tree_hash(jail: Jail, tmp_path: Path) -> None:
    content = os.urandom(2 * MIB + 7)
    put(jail, b"f", content)
    local = tmp_path / "local"
    local.write_bytes(content)
    assert jail.hash_file(b"f") == tree.hash_file(os.fsencode(local))
    fd = jail.open_read(b"f")
    try:
        assert os.read(fd, 10) == content[:10]
    finally:
        os.close(fd)


def test_set_mtime_and_make_dir(jail: Jail) -> None:
    put(jail, b"f", b"1")
    jail.set_mtime(b"f", 42)
    assert (jail.root / "f").lstat().st_mtime_ns == 42
    jail.make_dir(b"x/y/z", MTIME)
    assert (jail.root / "x" / "y" / "z").lstat().st_mtime_ns == MTIME
    jail.make_dir(b"x/y/z")  # already there: fine
    jail.set_mtime(b"x", 7)
    assert (jail.root / "x").lstat().st_mtime_ns == 7
    with pytest.raises(PathRefused, match="file is in the way"):
        jail.make_dir(b"f")
    with pytest.raises(FileNotFoundError):
        jail.set_mtime(b"missing", 1)
    assert jail.quota.used == charge(1) + 3 * DIR_CHARGE
    assert_consistent(jail)


def test_make_dir_race_with_another_thread(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def someone_else_first(path: Any, mode: int = 0o777) -> None:
        real(path, mode)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "mkdir", someone_else_first)
    jail.make_dir(b"d")
    monkeypatch.undo()
    assert (jail.root / "d").is_dir()
    assert jail.quota.used == 0  # the other thread paid for it
    assert jail.quota.reserved == 0


def test_make_dir_error_releases_the_reservation(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_path: Any, _mode: int = 0o777) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", full)
    with pytest.raises(PeerDiskFull):
        jail.make_dir(b"d")
    assert jail.quota.reserved == 0


# --- the deepest tree -----------------------------------------------------------------------


def test_deepest_accepted_tree_is_walked(space: HostedSpace, jail: Jail) -> None:
    deep = b"/".join([b"d"] * (paths.MAX_DEPTH - 1))
    put(jail, deep + b"/f", b"bottom")
    assert jail.stat(deep + b"/f").size == 6
    assert len(list(jail.list())) == paths.MAX_DEPTH
    jail.delete(b"d")
    assert_consistent(jail)
    assert space.rescan("alice") == jail.quota.used
    space.purge(time.time() + 31 * DAY)
    assert jail.quota.used == 0
    assert_consistent(jail)
