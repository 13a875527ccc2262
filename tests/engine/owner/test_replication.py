"""Replication round trips: push, restore and verify against a live host on loopback.

The property test drives random trees (odd names, empty files, files past the streamed
threshold, empty directories) through several runs of edits, deletions, renames and
file/directory swaps; after each push the replica equals the source (paths, bytes, mtimes
of files and directories, portable modes), the index equals what the host holds, verify is
clean and nothing the replica held was destroyed (it is in the host's trash). Restore into
an empty directory gives the source back.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any

from hypothesis import HealthCheck, event, given, settings, strategies as st
import pytest

from custom_components.mynas.engine import identity, tree
from custom_components.mynas.engine.errors import (
    HostRefused,
    PeerUnreachable,
    RestoreConflict,
    SourceMissing,
)
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.quota import DIR_CHARGE, charge
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.host.space import HostedSpace
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import (
    client,
    feed,
    push as replicator,
    restore as restorer,
    verify as verifier,
)
from custom_components.mynas.engine.owner.index import Index
from custom_components.mynas.engine.owner.run import (
    MAX_REPORTED,
    SMALL_FILE,
    PeerTarget,
    Phase,
    Progress,
    PushResult,
    RestoreResult,
    VerifyResult,
    check_folder_name,
    check_subpath,
)

from ..conftest import ServerFactory, address, wait_until
from ..replica_support import (
    FOLDER,
    MIB,
    MTIME,
    Env,
    check_index_matches_host,
    close_env,
    digest,
    make_env,
    plain_push,
    snapshot,
    trash_files,
    without_root,
    write,
)

# Names a filesystem allows and a careless implementation mangles: spaces, Unicode in
# both normal forms, a newline, a byte that is not UTF-8, a leading space, a dot-name.
NAMES = [
    b"a",
    b"a b",
    b"a.txt",
    "\u00e9".encode(),
    "e\u0301".encode(),
    b"new\nline",
    b"\xff",
    "\u65e5\u672c".encode(),
    b" lead",
    b".hidden",
]


# --- the property: random trees and random changes across runs -------------------------------


class _Tree:
    """Builds and changes a real directory from hypothesis draws; every mtime is unique."""

    def __init__(self, root: bytes, data: st.DataObject) -> None:
        self.root = root
        self.data = data
        self.clock = 0

    def mtime(self) -> int:
        # Unique and increasing, with random nanoseconds: an edit is always visible.
        self.clock += 1
        return MTIME + self.clock * 1_000_000_000 + self.data.draw(st.integers(0, 999_999_999))

    def entries(self, kind: tree.Kind | None = None) -> list[bytes]:
        return [e.path for e in tree.walk(self.root) if kind is None or e.kind is kind]

    def dirs(self) -> list[bytes]:
        return [b"", *self.entries(tree.Kind.DIR)]

    def path(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def free_name(self, parent: bytes) -> bytes | None:
        name = self.data.draw(st.sampled_from(NAMES))
        rel = tree.join(parent, name)
        return None if os.path.lexists(self.path(rel)) else rel

    def write_file(self, rel: bytes) -> None:
        size = self.data.draw(
            st.one_of(
                st.just(0),
                st.integers(1, 3000),
                st.integers(1, 3000),
                st.integers(SMALL_FILE + 1, SMALL_FILE + 100_000),
            )
        )
        if size > SMALL_FILE:
            event("a file past the streamed threshold")
        elif size == 0:
            event("an empty file")
        seed = self.data.draw(st.integers(0, 2**32))
        mode = self.data.draw(st.sampled_from([0o644, 0o755, 0o600, 0o700, 0o640]))
        write(self.path(rel), random.Random(seed).randbytes(size), mtime_ns=self.mtime(), mode=mode)

    def add(self) -> None:
        parent = self.data.draw(st.sampled_from(self.dirs()))
        rel = self.free_name(parent)
        if rel is None:
            return
        if self.data.draw(st.booleans()):
            self.write_file(rel)
        else:
            os.mkdir(self.path(rel))

    def change(self) -> None:
        """One random change: add, edit, delete, rename, file<->dir, chmod or touch."""
        existing = self.entries()
        op = self.data.draw(
            st.sampled_from(["add", "edit", "delete", "rename", "swap", "chmod", "touch"])
        )
        if op == "add" or not existing:
            self.add()
            return
        rel = self.data.draw(st.sampled_from(existing))
        path = self.path(rel)
        is_dir = os.path.isdir(path)
        if op == "edit" and not is_dir:
            self.write_file(rel)
        elif op == "delete":
            shutil.rmtree(path) if is_dir else os.unlink(path)
        elif op == "rename":
            for _ in range(3):
                parent = self.data.draw(st.sampled_from(self.dirs()))
                new = self.free_name(parent)
                if new is not None and not (new + b"/").startswith(rel + b"/"):
                    event("a rename")
                    os.rename(path, self.path(new))
                    break
        elif op == "swap":  # a file becomes a directory (with something in it) or back
            event("a file and a directory swapped")
            if is_dir:
                shutil.rmtree(path)
                self.write_file(rel)
            else:
                os.unlink(path)
                os.mkdir(path)
                if self.data.draw(st.booleans()):
                    self.write_file(tree.join(rel, self.data.draw(st.sampled_from(NAMES))))
        elif op == "chmod" and not is_dir:
            info = os.stat(path)
            os.chmod(path, (info.st_mode & 0o777) ^ 0o100)
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        elif op == "touch":
            stamp = self.mtime()
            os.utime(path, ns=(stamp, stamp))

    def settle_dirs(self) -> None:
        """Give every directory (the root too) a fresh mtime, children first."""
        for rel in sorted(self.dirs(), key=len, reverse=True):
            if self.data.draw(st.integers(0, 3)):  # now and then keep "now"
                stamp = self.mtime()
                os.utime(self.path(rel), ns=(stamp, stamp))


async def _round_trips(data: st.DataObject, alice: Identity, host: Identity, base: Path) -> None:
    storage = base / "storage"
    src = base / "src"
    storage.mkdir()
    src.mkdir()
    model = _Tree(os.fsencode(src), data)
    for _ in range(data.draw(st.integers(0, 12), label="initial entries")):
        model.add()
    model.settle_dirs()

    space = HostedSpace(storage)
    server = NodeServer(host, space, [PeerGrant("alice", alice.public_line, 1 << 30)])
    await server.start("127.0.0.1", 0)
    index = Index(base / "index.sqlite")
    target = PeerTarget("host", (address(server),), host.public_line)
    replica = storage / "alice" / FOLDER
    try:
        before: dict[bytes, tuple[object, ...]] = {}
        for run in range(data.draw(st.integers(1, 3), label="runs")):
            if run:
                for _ in range(data.draw(st.integers(1, 6), label="changes")):
                    model.change()
                model.settle_dirs()
            expected = snapshot(src, portable=True)
            result = await plain_push(alice, target, FOLDER, src, index, allow_empty=True)
            assert result.errors == []
            assert result.files_changed_during_read == 0
            files = [v for v in expected.values() if v[0] == "f"]
            assert result.files_total == len(files)
            assert snapshot(replica) == expected
            check_index_matches_host(index, replica)
            # Nothing the replica held was destroyed: what changed or left is in the trash.
            trash = trash_files(storage)
            for rel, value in before.items():
                if value[0] == "f" and expected.get(rel, (None, None))[1] != value[1]:
                    assert (FOLDER.encode() + b"/" + rel, value[1]) in trash, rel
            before = without_root(expected)
            checked = await verifier.verify(alice, target, FOLDER, src, index)
            assert checked.clean, checked.examples
            assert checked.checked == len(files)
        restored = base / "restored"
        got = await restorer.restore(alice, target, FOLDER, restored)
        assert got.files == sum(1 for v in before.values() if v[0] == "f")
        assert snapshot(restored) == snapshot(src, portable=True)
    finally:
        index.close()
        await server.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_round_trips_keep_replica_equal_to_source(
    data: st.DataObject, alice_id: Identity, host_id: Identity
) -> None:
    """Random trees and random changes: replica, index, verify and restore all agree."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="mynas-prop-", dir=shm if shm.is_dir() else None))
    try:
        asyncio.run(_round_trips(data, alice_id, host_id, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the adopt path: an empty index onto a host that already holds the replica ---------------


async def test_empty_index_adopts_an_identical_replica(env: Env) -> None:
    """A lost index neither sends unchanged files again nor trashes anything."""
    write(env.src / "a.txt", b"one")
    write(env.src / "dir" / "big.bin", os.urandom(SMALL_FILE + 10))
    (env.src / "empty").mkdir()
    os.utime(env.src / "empty", ns=(MTIME, MTIME))
    await env.push()

    with Index(env.work / "fresh.sqlite") as fresh:
        result = await plain_push(env.alice, env.target, FOLDER, env.src, fresh)
        assert (result.files_sent, result.files_deleted, result.bytes_sent) == (0, 0, 0)
        assert trash_files(env.storage) == set()
        check_index_matches_host(fresh, env.replica)

    # Adopted with one file changed since: only that one goes, its old version to trash.
    write(env.src / "a.txt", b"two", mtime_ns=MTIME + 1)
    with Index(env.work / "fresh2.sqlite") as fresh:
        result = await plain_push(env.alice, env.target, FOLDER, env.src, fresh)
        assert (result.files_sent, result.files_deleted) == (1, 0)
        assert trash_files(env.storage) == {(b"Docs/a.txt", digest(b"one"))}
        check_index_matches_host(fresh, env.replica)
    env.check_replica()


async def test_hashes_are_what_sha256sum_prints(env: Env) -> None:
    """The index's and the host's hashes can be checked on the replica with standard tools."""
    write(env.src / "a b.txt", b"one")
    write(env.src / "dir" / "big.bin", os.urandom(SMALL_FILE + 10))
    await env.push()
    printed = subprocess.run(
        ["sha256sum", "a b.txt", "dir/big.bin"],
        cwd=env.replica,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    sums = {
        name: bytes.fromhex(hex_sum) for hex_sum, name in (line.split("  ", 1) for line in printed)
    }
    recorded = {os.fsdecode(e.path): e.hash for e in env.index.entries(FOLDER, env.target.id)}
    assert {name: recorded[name] for name in sums} == sums
    target = env.target
    async with await client.connect_any(env.alice, target.addresses, target.public_key) as link:
        listed = {
            os.fsdecode(item.path): digest
            async for item, digest in link.list(FOLDER.encode(), with_hash=True)
            if digest
        }
    assert listed == {f"{FOLDER}/{name}": value for name, value in sums.items()}


@pytest.mark.parametrize("failure", ["refused", "cut"])
async def test_adopt_cut_short_is_not_half_remembered(
    env: Env, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """If the listing fails or breaks off, the pair stays unknown and the next run adopts."""
    for i in range(5):
        write(env.src / f"f{i}", b"x" * i)
    await env.push()
    real = client.PeerLink.list

    async def broken(self: client.PeerLink, path: bytes = b"", **kw: Any) -> Any:
        if failure == "refused":
            raise HostRefused("io", "cannot list")
        async for item in real(self, path, **kw):
            yield item
            raise PeerUnreachable("host", "connection lost (cut mid-listing)")

    monkeypatch.setattr(client.PeerLink, "list", broken)
    with Index(env.work / "fresh.sqlite") as fresh:
        with pytest.raises((HostRefused, PeerUnreachable)):
            await plain_push(env.alice, env.target, FOLDER, env.src, fresh)
        assert fresh.folders() == []
        assert list(fresh.entries(FOLDER, "host")) == []
        monkeypatch.setattr(client.PeerLink, "list", real)
        result = await plain_push(env.alice, env.target, FOLDER, env.src, fresh)
        assert result.files_sent == 0
        check_index_matches_host(fresh, env.replica)
    assert trash_files(env.storage) == set()


# --- runs with nothing to do ------------------------------------------------------------------


async def test_nothing_changed_connects_only_if_asked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With connect_if_unchanged False, a run with nothing to send never reaches the peer."""
    write(env.src / "a", b"a")
    write(env.src / "d" / "b", b"b")
    first = await env.push(connect_if_unchanged=False)
    assert first.files_sent == 2
    assert first.peer_contacted  # a new pair and new files: it had to connect

    connects = 0
    real = replicator.open_link

    async def counting(*args: Any) -> client.PeerLink:
        nonlocal connects
        connects += 1
        return await real(*args)

    monkeypatch.setattr(replicator, "open_link", counting)
    quiet = await env.push(connect_if_unchanged=False)
    assert (quiet.files_sent, quiet.files_total, quiet.peer_contacted) == (0, 2, False)
    assert connects == 0

    # The default still asks the peer to answer, even with nothing to send.
    answered = await env.push()
    assert (answered.files_sent, answered.peer_contacted, connects) == (0, True, 1)
    # A retention to pass on is something to do.
    await env.push(connect_if_unchanged=False, retention_days=7)
    assert connects == 2
    # One change: connected again, and only that file goes.
    write(env.src / "d" / "b", b"B", mtime_ns=MTIME + 1)
    changed = await env.push(connect_if_unchanged=False)
    assert (changed.files_sent, changed.peer_contacted, connects) == (1, True, 3)
    env.check_replica()


async def test_a_peer_down_fails_an_unchanged_run_only_if_it_must_connect(env: Env) -> None:
    """The default reports an unreachable peer even when there is nothing to send."""
    write(env.src / "a", b"a")
    await env.push()
    await env.server.close()
    result = await env.push(connect_if_unchanged=False)
    assert not result.peer_contacted
    with pytest.raises(PeerUnreachable):
        await env.push()


async def test_the_folders_own_mtime_is_kept_in_step(env: Env) -> None:
    """A run where only the folder's mtime moved connects and sets it on the replica."""
    write(env.src / "a", b"a")
    os.utime(env.src, ns=(MTIME, MTIME))
    await env.push(connect_if_unchanged=False)
    env.check_replica()
    assert env.index.root_mtime(FOLDER, "host") == MTIME

    # A file created and removed again: no entry changed, the folder's mtime did.
    write(env.src / "tmp", b"t")
    (env.src / "tmp").unlink()
    result = await env.push(connect_if_unchanged=False)
    assert result.peer_contacted
    assert result.files_sent == 0
    env.check_replica()
    assert env.index.root_mtime(FOLDER, "host") == os.lstat(env.src).st_mtime_ns
    assert not (await env.push(connect_if_unchanged=False)).peer_contacted


async def test_a_source_gone_before_its_root_is_read_leaves_the_scan_to_say_so(
    env: Env,
) -> None:
    """The folder's own mtime is not compared when the folder cannot be read."""
    feeder = feed.Feeder(
        asyncio.get_running_loop(), os.fsencode(env.work / "gone"), env.index, FOLDER, "x", ()
    )
    assert feeder._root_change() == []


# --- deletions and the trash -----------------------------------------------------------------


async def test_the_serving_host_purges_expired_trash_and_writes_usage_down(
    fast_dir: Path, make_server: ServerFactory, alice_id: Identity
) -> None:
    """While it serves, the host empties trash past its retention and persists each usage."""
    limits = Limits(persist_every=0.05, purge_every=0.05)
    env = await make_env(make_server, fast_dir, alice_id, limits=limits, trash_days=1)
    try:
        write(env.src / "a.txt", b"one" * 1000)
        await env.push()
        write(env.src / "a.txt", b"two", mtime_ns=MTIME + 1)
        await env.push()
        jail = env.server.jail("alice")
        (stamp,) = os.listdir(jail.trash_dir)  # the old version, kept for a day
        await asyncio.sleep(0.2)  # a few rounds of maintenance: too young to go
        assert trash_files(env.storage) == {(b"Docs/a.txt", digest(b"one" * 1000))}
        used = jail.quota.used
        # Two days later (its stamp says so), the next round removes it and credits the quota:
        # the file, its folder and the stamp directory.
        older = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 2 * 86400))
        os.rename(jail.trash_dir / stamp, jail.trash_dir / older)
        await wait_until(lambda: os.listdir(jail.trash_dir) == [])
        assert jail.quota.used == used - charge(3000) - 2 * DIR_CHARGE
        await wait_until(lambda: json.loads(jail.state_path.read_text())["used"] == jail.quota.used)
    finally:
        close_env(env)


async def test_deletions_go_to_the_hosts_trash(env: Env) -> None:
    """Deleted files and whole directories end up in the trash with their old content."""
    write(env.src / "notes.txt", b"notes")
    write(env.src / "photos" / "2020" / "a.jpg", b"A" * 5000)
    write(env.src / "photos" / "2020" / "b.jpg", b"B" * 10)
    write(env.src / "photos" / "big.raw", b"R" * (SMALL_FILE + 1))
    (env.src / "photos" / "empty").mkdir()
    write(env.src / "keep" / "k", b"k")
    await env.push()
    assert trash_files(env.storage) == set()

    shutil.rmtree(env.src / "photos")
    os.unlink(env.src / "notes.txt")
    result = await env.push()
    assert result.files_deleted == 4
    env.check_replica()
    check_index_matches_host(env.index, env.replica)
    assert trash_files(env.storage) == {
        (b"Docs/notes.txt", digest(b"notes")),
        (b"Docs/photos/2020/a.jpg", digest(b"A" * 5000)),
        (b"Docs/photos/2020/b.jpg", digest(b"B" * 10)),
        (b"Docs/photos/big.raw", digest(b"R" * (SMALL_FILE + 1))),
    }
    stamps = os.listdir(env.storage / ".mynas" / "trash" / "alice")
    assert any(
        (env.storage / ".mynas/trash/alice" / s / "Docs/photos/empty").is_dir() for s in stamps
    )


async def test_overwritten_files_keep_their_old_version_in_trash(env: Env) -> None:
    """A changed file's previous content is kept by the host."""
    write(env.src / "doc", b"version 1")
    await env.push()
    write(env.src / "doc", b"version 2", mtime_ns=MTIME + 5)
    result = await env.push()
    assert result.files_sent == 1
    env.check_replica()
    assert trash_files(env.storage) == {(b"Docs/doc", digest(b"version 1"))}


async def test_a_file_already_gone_from_the_host_is_simply_forgotten(env: Env) -> None:
    """Deleting what the host no longer holds is no error."""
    write(env.src / "x", b"x")
    write(env.src / "d" / "y", b"y")
    await env.push()
    write(env.src / "stays", b"s")
    os.unlink(env.replica / "x")
    shutil.rmtree(env.replica / "d")
    os.unlink(env.src / "x")
    shutil.rmtree(env.src / "d")
    result = await env.push()
    assert result.errors == []
    assert result.files_deleted == 2  # x, and y with its directory
    assert [e.path for e in env.index.entries(FOLDER, "host")] == [b"stays"]


# --- the empty mount point guard -------------------------------------------------------------


async def test_an_empty_source_never_empties_the_replica(env: Env) -> None:
    """An unmounted disk looks like an empty folder: push refuses to delete everything."""
    write(env.src / "a", b"a")
    write(env.src / "d" / "b", b"b")
    await env.push()
    shutil.rmtree(env.src)
    env.src.mkdir()

    with pytest.raises(SourceMissing, match="is empty") as caught:
        await env.push()
    assert "2 file(s)" in str(caught.value)
    assert caught.value.path == str(env.src)
    assert (env.replica / "a").is_file()
    assert (env.replica / "d" / "b").is_file()

    # Same with a lost index: the host's files are adopted first, then the guard holds.
    with Index(env.work / "fresh.sqlite") as fresh, pytest.raises(SourceMissing, match="empty"):
        await plain_push(env.alice, env.target, FOLDER, env.src, fresh)

    result = await env.push(allow_empty=True)
    assert result.files_deleted == 2
    assert os.listdir(env.replica) == []
    assert {path for path, _ in trash_files(env.storage)} == {b"Docs/a", b"Docs/d/b"}
    # Empty and known empty: no guard any more.
    assert (await env.push()).files_deleted == 0


async def test_an_empty_folder_can_be_pushed_the_first_time(env: Env) -> None:
    """Nothing on either side: nothing to refuse."""
    result = await env.push()
    assert result.files_total == 0
    assert env.replica.is_dir()


async def test_a_missing_source_is_a_clear_error(env: Env) -> None:
    """A folder that is not there raises SourceMissing before connecting."""
    with pytest.raises(SourceMissing, match="missing or unreadable"):
        await plain_push(env.alice, env.target, FOLDER, env.work / "nope", env.index)
    with pytest.raises(SourceMissing):
        await verifier.verify(env.alice, env.target, FOLDER, env.work / "nope", env.index)


# --- verify ----------------------------------------------------------------------------------


async def test_verify_reports_and_repairs_every_kind_of_difference(env: Env) -> None:
    """Host damage of every kind (lost, altered, planted) is found and re-sent or trashed."""
    write(env.src / "keep", b"keep")
    write(env.src / "gone", b"gone")
    write(env.src / "tampered", b"original")
    write(env.src / "sub" / "big", b"B" * (SMALL_FILE + 3))
    await env.push()
    assert (await env.verify()).clean

    os.unlink(env.replica / "gone")
    write(env.replica / "tampered", b"0riginal")  # same size and mtime: only the hash tells
    write(env.replica / "sub" / "big", b"b" * (SMALL_FILE + 3))
    write(env.replica / "extra", b"extra")
    write(env.replica / "xdir" / "inside", b"in")

    found = await env.verify()
    assert not found.clean
    assert (found.checked, found.host_damaged, found.unsent, found.local_rot) == (3, 6, 0, 0)
    assert "host damage: gone (missing on the host)" in found.examples
    assert "host damage: tampered (not what was sent)" in found.examples
    assert "host damage: xdir (never sent from here)" in found.examples
    assert found.as_dict()["clean"] is False

    fixed = await env.verify(repair=True)
    assert fixed.repair_complete
    assert fixed.repaired == 5  # 3 files sent, 2 files moved to trash
    again = await env.verify()
    assert again.clean, again.examples
    env.check_replica()
    check_index_matches_host(env.index, env.replica, exact=False)
    trash = trash_files(env.storage)
    assert (b"Docs/tampered", digest(b"0riginal")) in trash
    assert (b"Docs/xdir/inside", digest(b"in")) in trash
    # The next ordinary push has nothing left to do.
    result = await env.push()
    assert (result.files_sent, result.files_deleted) == (0, 0)


async def test_verify_tells_host_damage_unsent_changes_and_local_rot_apart(env: Env) -> None:
    """Issue 15: the host's hash is compared with what was sent, not with the file now."""
    for name in ("rot-here", "rot-there", "changed", "deleted", "fine"):
        write(env.src / name, name.encode() * 10)
    await env.push()
    # Local rot: the content changes, size and mtime stay (a failing disk here).
    write(env.src / "rot-here", b"R" * len(b"rot-here" * 10))
    # Host damage: the same on the friend's disk.
    write(env.replica / "rot-there", b"X" * len(b"rot-there" * 10))
    # Local changes not sent yet.
    write(env.src / "changed", b"new content", mtime_ns=MTIME + 5)
    write(env.src / "new", b"new file")
    os.unlink(env.src / "deleted")

    found = await env.verify()
    assert (found.host_damaged, found.unsent, found.local_rot) == (1, 3, 1)
    assert "host damage: rot-there (not what was sent)" in found.examples
    assert "local rot: rot-here (content changed, size and mtime did not)" in found.examples
    assert "not sent yet: changed (changed here)" in found.examples
    assert "not sent yet: deleted (deleted here)" in found.examples
    assert "not sent yet: new (changed here)" in found.examples
    assert not found.clean

    fixed = await env.verify(repair=True)
    assert (fixed.repaired, fixed.repair_complete) == (1, True)  # rot-there only
    assert (env.replica / "rot-there").read_bytes() == b"rot-there" * 10
    # The rotted file was not sent over the friend's good copy; unsent changes wait.
    assert (env.replica / "rot-here").read_bytes() == b"rot-here" * 10
    assert (env.replica / "changed").read_bytes() == b"changed" * 10
    assert (env.replica / "deleted").exists()
    assert not (env.replica / "new").exists()
    after = await env.verify()
    assert (after.host_damaged, after.unsent, after.local_rot) == (0, 3, 1)


async def test_a_file_damaged_on_both_sides_is_not_repaired(env: Env) -> None:
    write(env.src / "f", b"original")
    await env.push()
    write(env.src / "f", b"rotted!!")
    write(env.replica / "f", b"damaged!")
    found = await env.verify(repair=True)
    assert (found.host_damaged, found.local_rot, found.repaired) == (1, 1, 0)
    assert "host damage: f (not what was sent; no good copy here either (local rot))" in (
        found.examples
    )
    assert (env.replica / "f").read_bytes() == b"damaged!"


async def test_verify_of_a_folder_never_pushed(env: Env) -> None:
    """Everything is not sent yet; the host holds nothing to damage."""
    write(env.src / "a", b"a")
    write(env.src / "b", b"b")
    found = await env.verify()
    assert (found.checked, found.host_damaged, found.unsent, found.local_rot) == (0, 0, 2, 0)
    assert found.clean


async def test_verify_repair_needs_the_index(env: Env) -> None:
    """Verify compares with the index: without one it is a usage error."""
    with pytest.raises(ValueError, match="index"):
        await verifier.verify(env.alice, env.target, FOLDER, env.src, None, repair=True)


async def test_verify_repairs_a_file_that_became_a_directory_on_the_host(env: Env) -> None:
    """Kinds that differ: the host's directory goes to trash, the file comes back."""
    write(env.src / "x", b"file")
    await env.push()
    os.unlink(env.replica / "x")
    write(env.replica / "x" / "y", b"y")
    found = await env.verify(repair=True)
    assert found.host_damaged == 3  # x missing, x/ and x/y never sent
    assert (await env.verify()).clean
    env.check_replica()


# --- restore ---------------------------------------------------------------------------------


async def _fresh_machine(env: Env, alice_key: Path) -> tuple[Identity, PeerTarget]:
    """What a rebuilt node has: its key file and the peer's address and key, nothing else."""
    loop = asyncio.get_running_loop()
    me = await loop.run_in_executor(None, identity.load, alice_key)
    assert me == env.alice
    assert me is not env.alice
    return me, PeerTarget("whatever", env.target.addresses, env.server.identity.public_line)


async def test_restore_on_a_fresh_machine(env: Env, tmp_path: Path) -> None:
    """The house burned: the key alone gets the folder, a sub-path or one file back."""
    write(env.src / "top.txt", b"top", mode=0o755)
    write(env.src / "a" / "b" / "c.txt", b"c" * 100)
    write(env.src / "a" / "b" / "big.bin", os.urandom(SMALL_FILE + 77))
    write(env.src / "a" / "zero", b"")
    (env.src / "a" / "empty").mkdir()
    for rel in ("a/empty", "a/b", "a", ""):
        os.utime(env.src / rel, ns=(MTIME + len(rel), MTIME + len(rel)))
    await env.push()
    me, target = await _fresh_machine(env, tmp_path / "keys" / "alice" / "id_ed25519")

    whole = env.work / "whole"
    result = await restorer.restore(me, target, FOLDER, whole)
    assert (result.files, result.dirs) == (4, 4)
    assert result.bytes == 3 + 100 + SMALL_FILE + 77
    assert snapshot(whole) == snapshot(env.src, portable=True)
    assert set(os.listdir(whole)) == {"top.txt", "a"}  # no temp files left behind

    sub = env.work / "sub"
    await restorer.restore(me, target, FOLDER, sub, path="a/b")
    assert sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*")) == [
        "a",
        "a/b",
        "a/b/big.bin",
        "a/b/c.txt",
    ]
    assert snapshot(sub / "a" / "b") == snapshot(env.src / "a" / "b", portable=True)

    one = env.work / "one"
    for rel in ("a/b/c.txt", "a/b/big.bin", "/a/zero/"):
        got = await restorer.restore(me, target, FOLDER, one, path=rel)
        assert got.files == 1
        clean = rel.strip("/")
        assert (one / clean).read_bytes() == (env.src / clean).read_bytes()
        assert os.stat(one / clean).st_mtime_ns == os.stat(env.src / clean).st_mtime_ns


async def test_restore_refuses_to_overwrite_unless_asked(env: Env) -> None:
    """Existing files make restore refuse before writing anything; overwrite replaces them."""
    write(env.src / "a", b"from backup")
    write(env.src / "d" / "b", b"b")
    write(env.src / "d" / "big", b"G" * (SMALL_FILE + 1))
    await env.push()
    dest = env.work / "dest"
    write(dest / "a", b"local edit", mtime_ns=MTIME + 99)
    write(dest / "d" / "big", b"local big", mtime_ns=MTIME + 99)

    with pytest.raises(RestoreConflict, match="2 file") as caught:
        await env.restore(dest)
    assert caught.value.count == 2
    assert (dest / "a").read_bytes() == b"local edit"
    assert not (dest / "d" / "b").exists()  # nothing written at all
    with pytest.raises(RestoreConflict):
        await env.restore(dest, path="d/big")

    await env.restore(dest, overwrite=True)
    assert snapshot(dest) == snapshot(env.src, portable=True)
    await env.restore(dest, path="d/big", overwrite=True)
    assert (dest / "d" / "big").read_bytes() == b"G" * (SMALL_FILE + 1)


async def test_restore_of_something_the_host_does_not_hold(env: Env) -> None:
    """A clear error names what is missing."""
    write(env.src / "a", b"a")
    await env.push()
    with pytest.raises(HostRefused, match="holds nothing at Docs/nope"):
        await env.restore(env.work / "x", path="nope")
    with pytest.raises(HostRefused):
        await env.restore(env.work / "x", path="a/below-a-file")
    with pytest.raises(ValueError, match="not a path inside"):
        await env.restore(env.work / "x", path="../etc")
    with pytest.raises(ValueError, match="cannot name a folder"):
        await restorer.restore(env.alice, env.target, "a/b", env.work / "x")
    # None of these left an empty target behind.
    assert not (env.work / "x").exists()


async def test_a_failed_restore_leaves_no_empty_target(env: Env, unused_tcp_port: int) -> None:
    """Nothing there, or nobody answering: the target folder it would have made is not made."""
    write(env.src / "a", b"a")
    await env.push()
    target = env.work / "new" / "restored"
    down = PeerTarget("host", (f"127.0.0.1:{unused_tcp_port}",), env.target.public_key)
    with pytest.raises(PeerUnreachable):
        await restorer.restore(env.alice, down, FOLDER, target)
    with pytest.raises(HostRefused):  # one file asked, not there: fails while receiving
        await env.restore(target, path="nothing-here.txt")
    assert not target.exists()
    # A target that was there (empty) stays: it is the user's.
    target.mkdir(parents=True)
    with pytest.raises(HostRefused):
        await env.restore(target, path="nothing-here.txt")
    assert target.is_dir()


@pytest.mark.parametrize("encrypted", [False, True])
async def test_restore_progress_ends_with_done(env: Env, encrypted: bool) -> None:
    """Restore reports progress with totals (plain bytes) and ends with DONE."""
    write(env.src / "big", os.urandom(3 * MIB))
    write(env.src / "small", b"s")
    await env.push(encrypted=encrypted)
    seen: list[Progress] = []
    await env.restore(
        env.work / "r",
        encrypted=encrypted,
        progress=lambda p: seen.append(
            Progress(
                **{
                    f: getattr(p, f)
                    for f in (
                        "phase",
                        "files_done",
                        "files_total",
                        "bytes_done",
                        "bytes_total",
                        "scan_complete",
                    )
                }
            )
        ),
    )
    assert seen[-1].phase is Phase.DONE
    assert seen[-1].files_done == seen[-1].files_total == 2
    assert seen[-1].bytes_done == seen[-1].bytes_total == 3 * MIB + 1
    assert seen[-1].percent == 100.0


# --- odd inputs ------------------------------------------------------------------------------


def test_folder_names_are_checked() -> None:
    """A folder name is one plain path component."""
    assert check_folder_name("Photos 2020") == b"Photos 2020"
    for bad in ("", ".", "..", "a/b", ".mynas", "x\0y", "n" * 256):
        with pytest.raises(ValueError):
            check_folder_name(bad)


def test_sub_paths_are_checked() -> None:
    """A sub-path stays inside its folder."""
    assert check_subpath("/a/b/") == b"a/b"
    assert check_subpath(b"") == b""
    for bad in ("a/../b", "./a", "a//b", "a/\0"):
        with pytest.raises(ValueError):
            check_subpath(bad)


def test_progress_percent() -> None:
    """Percent is known once the scan is complete, by bytes, else by files."""
    progress = Progress()
    assert progress.percent is None
    progress.scan_complete = True
    assert progress.percent == 100.0
    progress.files_total, progress.files_done = 4, 1
    assert progress.percent == 25.0
    progress.bytes_total, progress.bytes_done = 1000, 500
    assert progress.percent == 50.0


def test_results_are_plain_data() -> None:
    """Summaries turn into JSON-ready dicts; error lists are bounded."""
    pushed = PushResult("F", seconds=1.23456)
    for i in range(MAX_REPORTED + 5):
        pushed.add_error(f"e{i}")
    data = pushed.as_dict()
    assert data["seconds"] == 1.235
    assert len(data["errors"]) == MAX_REPORTED
    assert data["error_count"] == MAX_REPORTED + 5
    verified = VerifyResult("F")
    for i in range(MAX_REPORTED + 5):
        verified.note("host damage", b"x%d" % i, "never sent from here")
    assert len(verified.examples) == MAX_REPORTED
    assert RestoreResult("F", seconds=0.5).as_dict()["seconds"] == 0.5


async def test_verify_of_adopted_entries_compares_with_the_local_file(env: Env) -> None:
    """Rows adopted from a listing have no recorded hash: the local file stands in."""
    write(env.src / "a", b"same")
    write(env.src / "b", b"good")
    await env.push()
    with Index(env.work / "fresh.sqlite") as fresh:
        await plain_push(env.alice, env.target, FOLDER, env.src, fresh)  # adopts, sends nothing
        assert {e.hash for e in fresh.entries(FOLDER, "host")} == {None}
        found = await verifier.verify(env.alice, env.target, FOLDER, env.src, fresh)
        assert (found.checked, found.host_damaged) == (2, 0)
        write(env.replica / "b", b"evil")
        found = await verifier.verify(env.alice, env.target, FOLDER, env.src, fresh)
        assert (found.host_damaged, found.local_rot) == (1, 0)
        assert "host damage: b (not what was sent)" in found.examples
