"""Encrypted replicas against a live host, attacked as a curious and a tampering friend.

The curious friend reads everything on the disk: names, contents, mtimes, modes. The
tampering friend flips a byte, truncates a file, swaps two stored files or puts back an old
version: restore refuses what fails authentication (and says which files), verify tells
host damage from local changes. What the friend can still learn — sizes, the number of
files, the shape of the tree, when things change — is what the README says.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
import stat
from typing import Any

import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.host.upload import Upload
from custom_components.mynas.engine.owner import sealed, sender
from custom_components.mynas.engine.owner.index import Index
from custom_components.mynas.engine.owner.keys import DataKeys
from custom_components.mynas.engine.owner.names import NameCipher, StoredTree
from custom_components.mynas.engine.owner.replica import ReplicaKindMismatch
from custom_components.mynas.engine.owner.run import SMALL_FILE

from ..conftest import wait_until
from ..replica_support import (
    FOLDER,
    MIB,
    MTIME,
    Env,
    change_under_reader,
    drop_connections,
    partials,
    snapshot,
    trash_files,
    write,
)

LONG = "L" * 200  # a 200-byte name: sealed, more than ext4's 255 bytes
LONGEST = "é" * 127  # 254 bytes


async def push(env: Env, **kwargs: Any) -> Any:
    """Push encrypted (the default of the engine)."""
    return await env.push(encrypted=True, **kwargs)


def sealed_root(env: Env) -> Path:
    """Where the encrypted replica of FOLDER is on the host."""
    cipher = NameCipher(DataKeys.of(env.alice).names)
    return env.jail / os.fsdecode(cipher.folder(FOLDER.encode()))


def open_replica(env: Env) -> dict[bytes, tuple[Any, ...]]:
    """What the owner reads back from the host's disk: ``snapshot``'s terms, no root."""
    keys = DataKeys.of(env.alice)
    reader = StoredTree(NameCipher(keys.names), FOLDER.encode())
    jail = os.fsencode(env.jail)
    root = os.fsencode(sealed_root(env))
    found: dict[bytes, tuple[Any, ...]] = {}
    for entry in tree.walk(root):
        stored = root[len(jail) + 1 :] + b"/" + entry.path
        rel = reader.plain(stored, entry.kind is tree.Kind.DIR)
        if rel is None:
            continue
        if entry.kind is tree.Kind.DIR:
            found[rel] = ("d",)
            continue
        with open(root + b"/" + entry.path, "rb") as handle:
            data = handle.read()
        meta, plain = sealed.open_sealed(keys.contents, FOLDER.encode() + b"/" + rel, data)
        found[rel] = ("f", plain, meta.mtime_ns, meta.mode)
    return found


def tree_view(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """A plain tree (the source, or a restored copy) in ``open_replica``'s terms."""
    found: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    for entry in tree.walk(base):
        if entry.kind is tree.Kind.DIR:
            found[entry.path] = ("d",)
        else:
            with open(base + b"/" + entry.path, "rb") as handle:
                found[entry.path] = ("f", handle.read(), entry.mtime_ns, entry.mode)
    return found


def source_view(env: Env) -> dict[bytes, tuple[Any, ...]]:
    """The source in ``open_replica``'s terms."""
    return tree_view(env.src)


def stored_files(env: Env) -> list[Path]:
    """Every file the host stores for alice's folders."""
    return [path for path in env.jail.rglob("*") if path.is_file()]


def make_tree(env: Env) -> None:
    write(env.src / "Tax return 2025.pdf", b"income: 123456 EUR; " * 50)
    write(env.src / "photos" / "beach.jpg", b"JPEG beach " * 1000, mode=0o755)
    write(env.src / "photos" / "empty", b"")
    write(env.src / LONG / "inside.txt", b"in a directory with a long name")
    write(env.src / "photos" / LONGEST, b"a file with a long name")
    write(env.src / "big.bin", os.urandom(SMALL_FILE + 3 * sealed.CHUNK + 5))
    (env.src / "empty dir").mkdir()


# --- what a curious friend sees --------------------------------------------------------------


async def test_the_host_learns_no_name_no_content_no_mtime(env: Env) -> None:
    make_tree(env)
    result = await push(env)
    assert result.files_sent == 6
    assert open_replica(env) == source_view(env)
    names = [os.fsencode(path.relative_to(env.jail)) for path in env.jail.rglob("*")]
    # Words with a character base32 never uses (upper case, "." or " "): no match by chance.
    for word in (b"Docs", b"Tax", b"photos/", b"beach.jpg", b"empty dir", b"LLLL", b"big.bin"):
        assert not any(word in name for name in names), word
    for path in stored_files(env):
        data = path.read_bytes()
        for word in (b"income", b"123456", b"JPEG", b"long name"):
            assert word not in data
        info = path.stat()
        assert info.st_mtime_ns == 0  # the real mtime is inside
        assert stat.S_IMODE(info.st_mode) == 0o644  # so is the exec bit
        assert len(os.fsencode(path.name)) <= 255
    # One stored file per source file: quota, trash and resume work as for a plain mirror.
    assert len(stored_files(env)) == 6
    assert not (env.jail / FOLDER).exists()
    # Sizes stay visible (the README says so): exactly the sealed size.
    big = (env.src / "big.bin").stat().st_size
    assert sealed.stored_size(big) in {path.stat().st_size for path in stored_files(env)}


async def test_incremental_runs_send_only_changes(env: Env) -> None:
    make_tree(env)
    await push(env)
    again = await push(env)
    assert (again.files_sent, again.files_deleted, again.bytes_sent) == (0, 0, 0)
    write(env.src / "photos" / "beach.jpg", b"new beach", mode=0o644, mtime_ns=MTIME + 1)
    os.unlink(env.src / "photos" / LONGEST)
    (env.src / "empty dir").rmdir()
    result = await push(env)
    assert (result.files_sent, result.files_deleted) == (1, 1)
    assert open_replica(env) == source_view(env)
    # The replaced and the deleted file went to the trash, sealed as they were.
    trashed = trash_files(env.storage)
    assert len(trashed) == 2
    assert all(b"beach.jpg" not in path for path, _ in trashed)
    # A long name is deleted whole: no empty continuation directory stays behind.
    assert len(list(env.jail.rglob("~*"))) == 1  # the long directory's only


async def test_kind_changes_and_a_long_directory_going(env: Env) -> None:
    write(env.src / "x", b"a file first")
    write(env.src / LONG / "f", b"f")
    await push(env)
    os.unlink(env.src / "x")
    write(env.src / "x" / "y", b"then a directory")
    for child in (env.src / LONG).iterdir():
        child.unlink()
    (env.src / LONG).rmdir()
    await push(env)
    assert open_replica(env) == source_view(env)
    assert not list(env.jail.rglob("~*"))


# --- a replica is plain or encrypted, for good -----------------------------------------------


async def test_pushing_the_other_way_is_refused_and_changes_nothing(env: Env) -> None:
    write(env.src / "a", b"a")
    await env.push()  # plain
    before = snapshot(env.storage)
    with pytest.raises(ReplicaKindMismatch, match=r"plain copy of 'Docs'.*--plain"):
        await push(env)
    # A fresh index (a rebuilt node) asks the host, which holds the plain folder.
    with Index(env.work / "fresh.sqlite") as fresh:
        with pytest.raises(ReplicaKindMismatch, match="plain copy"):
            await _push_with(env, fresh, encrypted=True)
        assert fresh.folders() == []
    assert snapshot(env.storage) == before

    other = "Other"
    write(env.work / "other" / "b", b"b")
    await _push_folder(env, other, env.work / "other", env.index, encrypted=True)
    before = snapshot(env.storage)
    with pytest.raises(ReplicaKindMismatch, match="encrypted copy of 'Other'"):
        await _push_folder(env, other, env.work / "other", env.index, encrypted=False)
    with (
        Index(env.work / "fresh2.sqlite") as fresh,
        pytest.raises(ReplicaKindMismatch, match="encrypted copy"),
    ):
        await _push_folder(env, other, env.work / "other", fresh, encrypted=False)
    assert snapshot(env.storage) == before


async def _push_with(env: Env, index: Index, **kwargs: Any) -> Any:
    return await _push_folder(env, FOLDER, env.src, index, **kwargs)


async def _push_folder(env: Env, folder: str, source: Path, index: Index, **kwargs: Any) -> Any:
    from custom_components.mynas.engine.owner import push as replicator  # noqa: PLC0415

    return await replicator.push(env.alice, env.target, folder, source, index, **kwargs)


async def test_a_lost_index_is_rebuilt_from_the_host(env: Env) -> None:
    """Adoption of a sealed replica: names read back, mtimes from each file's first bytes."""
    make_tree(env)
    await push(env)
    with Index(env.work / "fresh.sqlite") as fresh:
        result = await _push_with(env, fresh)
        assert (result.files_sent, result.files_deleted) == (0, 0)
        assert fresh.sealed(FOLDER, "host") is True
        assert {entry.path for entry in fresh.entries(FOLDER, "host")} == set(source_view(env))
        write(env.src / "photos" / "beach.jpg", b"changed", mtime_ns=MTIME + 9)
        again = await _push_with(env, fresh)
        assert (again.files_sent, again.files_deleted) == (1, 0)
        assert open_replica(env) == source_view(env)
    assert trash_files(env.storage) != set()


async def test_adoption_from_an_older_host_sends_the_files_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host without HEADS: names and sizes only, so every file is sent once more."""
    from custom_components.mynas.engine.owner.client import PeerLink  # noqa: PLC0415

    make_tree(env)
    await push(env)
    monkeypatch.setattr(PeerLink, "serves_heads", property(lambda _self: False))
    with Index(env.work / "fresh.sqlite") as fresh:
        result = await _push_with(env, fresh)
        assert result.files_sent == 6
        assert open_replica(env) == source_view(env)
        again = await _push_with(env, fresh)
        assert (again.files_sent, again.files_deleted) == (0, 0)


async def test_adoption_skips_what_does_not_open(env: Env) -> None:
    """A damaged head or a planted name: not adopted, so the push sends the real file."""
    write(env.src / "a", b"a" * 100)
    write(env.src / "b", b"b" * 100)
    await push(env)
    _flip(stored_path(env, "a"), 40)  # in the meta block
    (sealed_root(env) / "planted").write_bytes(b"x")
    with Index(env.work / "fresh.sqlite") as fresh:
        result = await _push_with(env, fresh)
        assert result.files_sent == 1  # a, sent again; b adopted as it is
        assert open_replica_without(env, "planted") == source_view(env)


def open_replica_without(env: Env, *names: str) -> dict[bytes, tuple[Any, ...]]:
    """``open_replica`` with planted files taken away first."""
    for name in names:
        (sealed_root(env) / name).unlink()
    return open_replica(env)


# --- large files: streamed, sealed block by block, resumed ----------------------------------


async def test_a_large_file_is_resumed_with_the_same_bytes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 24 * MIB
    write(env.src / "big.bin", os.urandom(size))
    state = {"cuts": 0}
    real = Upload.write_many
    loop = asyncio.get_running_loop()

    def cut(self: Upload, *args: Any) -> Any:
        out = real(self, *args)
        if not state["cuts"] and self.offset >= 6 * MIB:
            state["cuts"] += 1
            loop.call_soon_threadsafe(drop_connections, env.server)
        return out

    monkeypatch.setattr(Upload, "write_many", cut)
    with pytest.raises(Exception, match="connection lost"):
        await push(env)
    await wait_until(env.upload_idle)
    assert len(partials(env.storage)) == 1
    result = await push(env)
    assert result.files_sent == 1
    assert result.bytes_sent < sealed.stored_size(size) - 5 * MIB  # resumed
    assert open_replica(env) == source_view(env)  # the resumed part fits: it authenticates
    assert partials(env.storage) == []


@pytest.mark.parametrize("how", ["grows", "shrinks", "touched", "rewritten"])
async def test_a_large_file_changing_under_the_reader_is_never_sealed_as_it(
    env: Env, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    size = 10 * MIB  # three blocks of the sealed reader
    write(env.src / "big", os.urandom(size))
    real = os.pread
    calls = {"n": 0}

    def meddle(fd: int, count: int, position: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            change_under_reader(env.src / "big", how, size)
        return real(fd, count, position)

    monkeypatch.setattr(sender.os, "pread", meddle)
    result = await push(env)
    monkeypatch.setattr(sender.os, "pread", real)
    assert result.files_changed_during_read == 1
    assert result.files_sent == 0
    await wait_until(env.upload_idle)
    assert partials(env.storage) == []
    result = await push(env)
    assert result.files_sent == 1
    assert open_replica(env) == source_view(env)


# --- restore: decrypted as it streams; what fails authentication is never restored ----------


def stored_path(env: Env, rel: str | bytes) -> Path:
    """Where the host stores the folder's entry ``rel``."""
    cipher = NameCipher(DataKeys.of(env.alice).names)
    return env.jail / os.fsdecode(cipher.path(FOLDER.encode() + b"/" + os.fsencode(rel)))


def no_temp_files(dest: Path) -> bool:
    return not list(dest.rglob(".mynas-restore-*"))


async def test_restore_reads_back_everything_mtimes_and_exec_bits_included(env: Env) -> None:
    make_tree(env)
    await push(env)
    dest = env.work / "dest"
    result = await env.restore(dest, encrypted=None)  # found encrypted by its sealed name
    assert (result.files, result.failed, result.failures) == (6, 0, [])
    assert result.bytes == sum(p.stat().st_size for p in env.src.rglob("*") if p.is_file())
    assert tree_view(dest) == source_view(env)


@pytest.mark.parametrize(
    ("sub", "expect"),
    [
        (
            "photos",
            {b"photos", b"photos/beach.jpg", b"photos/empty", b"photos/" + LONGEST.encode()},
        ),
        ("photos/beach.jpg", {b"photos", b"photos/beach.jpg"}),
        (LONG, {LONG.encode(), LONG.encode() + b"/inside.txt"}),
        ("photos/" + LONGEST, {b"photos", b"photos/" + LONGEST.encode()}),
        ("big.bin", {b"big.bin"}),
    ],
)
async def test_restore_of_a_sub_path(env: Env, sub: str, expect: set[bytes]) -> None:
    make_tree(env)
    await push(env)
    dest = env.work / "dest"
    result = await env.restore(dest, path=sub, encrypted=True)
    assert result.failed == 0
    got = tree_view(dest)
    assert set(got) == expect
    source = source_view(env)
    assert all(got[path] == source[path] for path in expect if got[path][0] == "f")


async def test_restore_with_the_recovery_code_alone(env: Env) -> None:
    """After a fire: the code rebuilds the node, which reads its replica and is still trusted."""
    from custom_components.mynas.engine import identity, recovery_code  # noqa: PLC0415
    from custom_components.mynas.engine.owner import restore as restorer  # noqa: PLC0415

    make_tree(env)
    await push(env)
    code = recovery_code.encode(identity.private_seed(env.alice))
    rebuilt = identity.from_seed(recovery_code.decode(code.lower().replace("-", " ")))
    dest = env.work / "dest"
    result = await restorer.restore(rebuilt, env.target, FOLDER, dest)
    assert result.failed == 0
    assert tree_view(dest) == source_view(env)


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


async def test_a_tampering_host_gets_nothing_restored_as_good(env: Env) -> None:
    make_tree(env)
    write(env.src / "one", b"first file " * 10)
    write(env.src / "two", b"second file " * 10)
    write(env.src / "photos" / "three", b"third file " * 10)
    await push(env)
    _flip(stored_path(env, "Tax return 2025.pdf"), 100)  # a flipped byte
    _flip(stored_path(env, "big.bin"), SMALL_FILE + 1000)  # in a large file, mid-stream
    beach = stored_path(env, "photos/beach.jpg")
    os.truncate(beach, beach.stat().st_size - 20)  # truncated
    one, two = stored_path(env, "one"), stored_path(env, "two")
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)  # two stored files swapped
    two.write_bytes(a)
    # And a stored file moved into another directory, under its own sealed name.
    three = stored_path(env, "photos/three")
    os.rename(three, stored_path(env, LONG) / three.name)

    dest = env.work / "dest"
    result = await env.restore(dest, encrypted=True)
    failed = {failure.split(":")[0] for failure in result.failures}
    moved = {name for name in failed if name.startswith("(sealed) ")}
    assert len(moved) == 1  # the moved name does not open where it is
    assert failed - moved == {"Tax return 2025.pdf", "big.bin", "photos/beach.jpg", "one", "two"}
    assert result.failed == 6
    got = tree_view(dest)
    for gone in (b"Tax return 2025.pdf", b"big.bin", b"photos/beach.jpg", b"one", b"two"):
        assert gone not in got
    assert not any(path.endswith(b"three") for path in got)
    source = source_view(env)
    for kept in (b"photos/empty", LONG.encode() + b"/inside.txt", b"photos/" + LONGEST.encode()):
        assert got[kept] == source[kept]
    assert no_temp_files(dest)


async def test_a_replayed_old_version_is_authentic_to_restore(env: Env) -> None:
    """Without the index nothing tells an old version from the current one (README)."""
    write(env.src / "contract.txt", b"version 1")
    await push(env)
    old = stored_path(env, "contract.txt").read_bytes()
    write(env.src / "contract.txt", b"version 2", mtime_ns=MTIME + 1)
    await push(env)
    stored_path(env, "contract.txt").write_bytes(old)  # the host puts the old one back
    dest = env.work / "dest"
    result = await env.restore(dest, encrypted=True)
    assert result.failed == 0
    assert (dest / "contract.txt").read_bytes() == b"version 1"


# --- verify: the host's hash against what was sent ------------------------------------------


async def test_verify_finds_every_tampering_and_repair_sends_only_that(env: Env) -> None:
    make_tree(env)
    for name in ("one", "two", "contract", "rot", "lost"):
        write(env.src / name, name.encode() * 20)
    await push(env)
    assert (await env.verify()).clean
    old_contract = stored_path(env, "contract").read_bytes()
    write(env.src / "contract", b"contract v2" * 20, mtime_ns=MTIME + 1)
    await push(env)

    _flip(stored_path(env, "big.bin"), SMALL_FILE + 1000)  # a flipped byte
    one, two = stored_path(env, "one"), stored_path(env, "two")
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)  # swapped
    two.write_bytes(a)
    stored_path(env, "contract").write_bytes(old_contract)  # an old version put back
    stored_path(env, "lost").unlink()  # lost
    planted = sealed_root(env) / "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    planted.write_bytes(b"not ours")  # a name that does not open
    write(env.src / "rot", b"R" * len(b"rot" * 20))  # local rot: size and mtime kept
    write(env.src / "new", b"not sent yet")

    found = await env.verify()
    assert (found.host_damaged, found.unsent, found.local_rot) == (6, 1, 1)
    for line in (
        "host damage: big.bin (not what was sent)",
        "host damage: one (not what was sent)",
        "host damage: two (not what was sent)",
        "host damage: contract (not what was sent)",
        "host damage: lost (missing on the host)",
        "local rot: rot (content changed, size and mtime did not)",
        "not sent yet: new (changed here)",
    ):
        assert line in found.examples
    assert any("a name that does not open" in line for line in found.examples)

    fixed = await env.verify(repair=True)
    assert fixed.repair_complete
    assert fixed.repaired == 6  # 5 files sent again, the planted one to the trash
    after = await env.verify()
    assert (after.host_damaged, after.unsent, after.local_rot) == (0, 1, 1)
    assert not planted.exists()
    dest = env.work / "dest"
    result = await env.restore(dest, encrypted=True)
    assert result.failed == 0
    assert (dest / "contract").read_bytes() == b"contract v2" * 20
    assert (dest / "rot").read_bytes() == b"rot" * 20  # the good copy, not the rotted one
    assert not (dest / "new").exists()


# --- converting a plain replica --------------------------------------------------------------


async def test_a_plain_replica_is_converted_then_its_plain_copy_trashed(env: Env) -> None:
    from custom_components.mynas.engine.owner import push as replicator  # noqa: PLC0415

    make_tree(env)
    await env.push()  # plain
    assert (env.replica / "Tax return 2025.pdf").exists()
    result = await replicator.convert(env.alice, env.target, FOLDER, env.src, env.index)
    assert result.replaced_plain
    assert result.files_sent == 6
    assert not env.replica.exists()  # in the friend's trash, as replaced data
    assert (b"Docs/Tax return 2025.pdf", digest_of(env.src / "Tax return 2025.pdf")) in (
        trash_files(env.storage)
    )
    assert env.index.sealed(FOLDER, "host") is True
    assert open_replica(env) == source_view(env)
    assert (await push(env)).files_sent == 0  # an encrypted replica now, for good
    with pytest.raises(ReplicaKindMismatch):
        await env.push()


async def test_a_conversion_cut_short_keeps_the_plain_copy(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from custom_components.mynas.engine.owner import push as replicator  # noqa: PLC0415

    make_tree(env)
    await env.push()
    real_open = sender._open_local

    def locked(path: bytes) -> int:
        if path.endswith(b"big.bin"):
            raise PermissionError(13, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(sender, "_open_local", locked)
    result = await replicator.convert(env.alice, env.target, FOLDER, env.src, env.index)
    assert not result.replaced_plain
    assert result.errors == ["big.bin: Permission denied"]
    assert (env.replica / "big.bin").exists()  # the plain copy is still whole
    monkeypatch.undo()
    again = await replicator.convert(env.alice, env.target, FOLDER, env.src, env.index)
    assert (again.replaced_plain, again.files_sent) == (True, 1)  # only what was missing
    assert not env.replica.exists()
    assert open_replica(env) == source_view(env)


def digest_of(path: Path) -> bytes:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(path.read_bytes()).digest()
