"""The trash (trash.py; docs/architecture.md, invariant 4): old versions kept, retentions, purge."""

from __future__ import annotations

import errno
import os
import time

import pytest

from custom_components.mynas.engine.errors import PathRefused, ProtocolError
from custom_components.mynas.engine.host import disk, trash
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import DIR_CHARGE, charge
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import DAY, MIB, assert_consistent, files_under, push, put, snapshot

# --- retention ------------------------------------------------------------------------------


def test_peer_can_lengthen_but_never_shorten_retention(space: HostedSpace, jail: Jail) -> None:
    for folder in (b"docs", b"pics"):
        put(jail, folder + b"/a", b"v1")
        put(jail, folder + b"/a", b"v2")
    jail.set_retention("docs", 90)
    jail.set_retention("docs", 5)  # ignored: requests only grow
    jail.set_retention("pics", 5)  # shorter than the host's 30 days: no effect
    assert jail.retention_days(b"docs") == 90
    assert jail.retention_days(b"pics") == 30
    now = time.time()
    space.purge(now + 31 * DAY)
    assert [name.split("/", 1)[1] for name in files_under(jail.trash_dir)] == ["docs/a"]
    space.purge(now + 91 * DAY)
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)
    jail.set_retention("long", 10**9)
    assert jail.retention_days(b"long") == trash.MAX_RETENTION_DAYS
    # Persisted: a restart keeps the requests.
    again = HostedSpace(space.root).jail("alice", MIB)
    assert again.retention_days(b"docs") == 90


def test_retention_requests_are_checked(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("a/b", ".mynas", "..", ""):
        with pytest.raises(PathRefused):
            jail.set_retention(folder, 40)
    with pytest.raises(ProtocolError, match="negative"):
        jail.set_retention("a", -1)
    monkeypatch.setattr(trash, "MAX_RETENTION_FOLDERS", 2)
    jail.set_retention("a", 40)
    jail.set_retention("b", 40)
    jail.set_retention("a", 50)  # an existing folder may still grow
    with pytest.raises(ProtocolError, match="too many"):
        jail.set_retention("c", 40)


# --- moves and purge ------------------------------------------------------------------------


def test_delete_moves_files_and_trees_to_the_trash(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # one stamp for both deletes
    push(jail, {b"one.txt": b"1", b"tree/a/b.txt": b"b", b"tree/c.txt": b"c"})
    jail.make_dir(b"tree/empty")
    jail.delete(b"one.txt")
    jail.delete(b"tree")
    assert list(jail.list()) == []
    trashed = files_under(jail.trash_dir)
    assert sorted(name.split("/", 1)[1] for name in trashed) == [
        "one.txt",
        "tree/a/b.txt",
        "tree/c.txt",
    ]
    assert sorted(trashed.values()) == [b"1", b"b", b"c"]
    (stamp,) = {name.split("/", 1)[0] for name in trashed}
    assert trash.stamp_time(stamp.encode()) is not None
    assert any(d.endswith("tree/empty") for d in snapshot(jail.trash_dir))
    assert_consistent(jail)


def test_delete_refuses_missing_and_root(jail: Jail) -> None:
    with pytest.raises(FileNotFoundError):
        jail.delete(b"missing")
    with pytest.raises(PathRefused, match="empty"):
        jail.delete(b"")
    assert jail.root.is_dir()


def test_trash_collisions_get_suffixes(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # all in the same second
    for version in (b"1", b"2", b"3"):
        put(jail, b"a", version)
        jail.delete(b"a")
    put(jail, b"a/b", b"4")  # "a" is now a directory; in the trash it is a file
    jail.delete(b"a/b")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", frozen)
    assert files_under(jail.trash_dir) == {
        f"{stamp}/a": b"1",
        f"{stamp}~1/a": b"2",
        f"{stamp}~2/a": b"3",
        f"{stamp}~3/a/b": b"4",
    }
    assert_consistent(jail)
    monkeypatch.setattr(trash, "_MAX_COLLISIONS", 2)
    with pytest.raises(PathRefused, match="too many versions"):
        jail.delete(b"a")


def test_purge_leaves_foreign_things_alone(space: HostedSpace, jail: Jail) -> None:
    (jail.trash_dir / "not-a-stamp").mkdir()
    (jail.trash_dir / "20000101T000000Z").write_bytes(b"a file, not a stamp dir")
    assert space.purge(time.time() + 100 * DAY) == 0
    assert sorted(os.listdir(jail.trash_dir)) == ["20000101T000000Z", "not-a-stamp"]


def test_purge_goes_on_past_what_it_cannot_remove(
    space: HostedSpace, jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # one stamp for both deletes
    put(jail, b"a/x", b"1")
    put(jail, b"b/y", b"2")
    jail.delete(b"a")
    jail.delete(b"b")
    real = disk.remove_tree

    def stuck_on_a(path: bytes) -> int:
        if path.endswith(b"/a"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(disk, "remove_tree", stuck_on_a)
    assert space.purge(time.time() + 31 * DAY) == DIR_CHARGE + charge(1)  # b/ and b/y
    assert [name.split("/", 1)[1] for name in files_under(jail.trash_dir)] == ["a/x"]
    assert_consistent(jail)


def test_purge_of_an_unknown_trash(space: HostedSpace, jail: Jail) -> None:
    jail.trash_dir.rmdir()
    assert space.purge() == 0
