"""The backup area: archives stored, listed, read and deleted at a live host on loopback.

Every test talks to a real NodeServer over SSH on 127.0.0.1 and looks at the host's disk:
the archive lands in ``<alice's jail>/.ha-backups/`` byte for byte, its metadata beside it;
replacing or deleting moves the old version to the host's trash (never destroyed), the quota
counts it, and a stream that lies about its size leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
import json
import os
from pathlib import Path
import random

import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.errors import (
    BackupMissing,
    BackupSizeMismatch,
    HostRefused,
    PathRefused,
    PeerUnreachable,
    ProtocolError,
    QuotaExceeded,
)
from custom_components.mynas.engine.host.quota import charge
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import backup_area
from custom_components.mynas.engine.owner.backup_area import (
    AREA,
    BackupArea,
    StoredBackup,
    check_backup_id,
)
from custom_components.mynas.engine.owner.client import PeerLink, connect
from custom_components.mynas.engine.owner.run import PeerTarget, check_folder_name
from custom_components.mynas.engine.protocol import FailCode, Frame
from custom_components.mynas.engine.tree import Entry, Kind

from ..conftest import MIB, ServerFactory, address, peer_target
from .test_replication_link import FakeChannel

META = {"backup_id": "abc123", "name": "Automatic backup", "size": 0, "protected": True}


class _Stream:
    """An ``open_stream`` over ``data`` in chunks of ``sizes`` (cycled), as HA hands one."""

    def __init__(self, data: bytes, sizes: list[int] | None = None) -> None:
        self.data = data
        self.sizes = sizes or [64 * 1024]
        self.opened = 0

    async def __call__(self) -> AsyncIterator[bytes]:
        self.opened += 1
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        position = 0
        index = 0
        while position < len(self.data):
            size = self.sizes[index % len(self.sizes)]
            yield self.data[position : position + size]
            position += size
            index += 1


_stream = _Stream


def _area(storage: Path) -> Path:
    return storage / "alice" / AREA


def _trashed(storage: Path, name: str) -> list[Path]:
    return sorted((storage / ".mynas" / "trash" / "alice").glob(f"*/{AREA}/{name}"))


@contextlib.asynccontextmanager
async def _area_at(server: NodeServer, who: Identity) -> AsyncIterator[BackupArea]:
    link = await connect(who, address(server), server.identity.public_line)
    try:
        yield BackupArea(link)
    finally:
        await link.close()


async def test_an_archive_travels_and_comes_back_byte_identical(
    server: NodeServer, alice_id: Identity, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backup_area, "PROGRESS_INTERVAL", 0)  # every chunk reports
    data = random.Random(1).randbytes(3 * MIB + 12345)
    reports: list[int] = []
    # Chunks that straddle the protocol's pieces: tiny, odd and larger than one piece.
    open_stream = _stream(data, [1, 300_001, 7, 1 << 20, 65_536])
    async with _area_at(server, alice_id) as area:
        stored = await area.upload("abc123", META, len(data), open_stream, reports.append)
        assert stored == StoredBackup("abc123", len(data), META)
        assert (_area(storage_dir) / "abc123.tar").read_bytes() == data
        record = json.loads((_area(storage_dir) / "abc123.json").read_bytes())
        assert record == {"format": 1, "backup_id": "abc123", "size": len(data), "metadata": META}
        assert reports[-1] == len(data)
        assert reports == sorted(reports)
        assert len(set(reports)) > 5  # on the way, not only at the end
        assert await area.list() == [stored]
        assert await area.get("abc123") == stored
        chunks = [chunk async for chunk in area.read("abc123")]
    assert b"".join(chunks) == data
    assert all(isinstance(chunk, bytes) and len(chunk) <= protocol.CHUNK for chunk in chunks)
    # Counted in Alice's quota like any file of hers.
    used = server.jail("alice").usage().used
    assert used >= charge(len(data)) + charge(len(json.dumps(record)))


async def test_empty_and_small_archives(server: NodeServer, alice_id: Identity) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("empty", {}, 0, _stream(b""))
        await area.upload("small", {"n": 1}, 5, _stream(b"hello"))
        assert [b.backup_id for b in await area.list()] == ["empty", "small"]
        assert [chunk async for chunk in area.read("empty")] == []
        assert b"".join([chunk async for chunk in area.read("small")]) == b"hello"


async def test_module_functions_connect_per_operation(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    target = peer_target(server)
    data = b"x" * 1000
    stored = await backup_area.upload(alice_id, target, "b1", META, len(data), _stream(data))
    assert await backup_area.listing(alice_id, target) == [stored]
    assert await backup_area.get(alice_id, target, "b1") == stored
    got = b"".join([chunk async for chunk in backup_area.download(alice_id, target, "b1")])
    assert got == data
    await backup_area.delete(alice_id, target, "b1")
    assert await backup_area.listing(alice_id, target) == []
    assert _trashed(storage_dir, "b1.tar")


async def test_no_area_yet_lists_nothing(server: NodeServer, alice_id: Identity) -> None:
    async with _area_at(server, alice_id) as area:
        assert await area.list() == []
        with pytest.raises(BackupMissing):
            await area.get("nothing")
        with pytest.raises(BackupMissing):
            _ = [chunk async for chunk in area.read("nothing")]
        with pytest.raises(BackupMissing):
            await area.delete("nothing")


async def test_the_quota_refuses_before_the_stream_is_opened(
    make_server: ServerFactory, alice_id: Identity, storage_dir: Path
) -> None:
    server = await make_server([PeerGrant("alice", alice_id.public_line, 2 * MIB)])
    open_stream = _stream(b"z" * (3 * MIB))
    async with _area_at(server, alice_id) as area:
        with pytest.raises(QuotaExceeded) as err:
            await area.upload("big", META, 3 * MIB, open_stream)
        assert err.value.needed >= 3 * MIB
        assert open_stream.opened == 0
        assert await area.list() == []
    assert not (_area(storage_dir) / "big.tar").exists()
    assert server.jail("alice").usage().reserved == 0


@pytest.mark.parametrize(("announced", "actual"), [(2 * MIB, MIB + 1), (MIB, 2 * MIB)])
async def test_a_stream_of_another_size_leaves_nothing(
    server: NodeServer, alice_id: Identity, storage_dir: Path, announced: int, actual: int
) -> None:
    before = server.jail("alice").usage()
    async with _area_at(server, alice_id) as area:
        with pytest.raises(BackupSizeMismatch) as err:
            await area.upload("lying", META, announced, _stream(b"q" * actual, [300_000]))
        assert err.value.announced == announced
        assert await area.list() == []
    assert str(announced) in str(err.value)
    assert not (_area(storage_dir) / "lying.tar").exists()
    assert not (_area(storage_dir) / "lying.json").exists()
    after = server.jail("alice").usage()
    assert (after.used, after.reserved) == (before.used, before.reserved)
    assert os.listdir(storage_dir / ".mynas" / "partial" / "alice") == []


async def test_a_failing_stream_raises_its_own_error_and_keeps_nothing(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    class ReadFailed(Exception):
        pass

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * MIB
        raise ReadFailed("the disk went away")

    async def open_stream() -> AsyncIterator[bytes]:
        return chunks()

    async with _area_at(server, alice_id) as area:
        with pytest.raises(ReadFailed):
            await area.upload("broken", META, 4 * MIB, open_stream)
        assert await area.list() == []
        # The link still works after the failure.
        await area.upload("fine", META, 3, _stream(b"abc"))
    assert os.listdir(storage_dir / ".mynas" / "partial" / "alice") == []
    assert server.jail("alice").usage().reserved == 0


async def test_replacing_keeps_the_old_version_in_the_trash(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("same", {"v": 1}, 4, _stream(b"old!"))
        await area.upload("same", {"v": 2}, 4, _stream(b"new!"))
        assert await area.list() == [StoredBackup("same", 4, {"v": 2})]
    assert (_area(storage_dir) / "same.tar").read_bytes() == b"new!"
    assert [path.read_bytes() for path in _trashed(storage_dir, "same.tar")] == [b"old!"]
    assert len(_trashed(storage_dir, "same.json")) == 1


async def test_delete_moves_both_files_to_the_trash(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("gone", META, 6, _stream(b"123456"))
        await area.upload("kept", META, 2, _stream(b"ok"))
        used = server.jail("alice").usage().used
        await area.delete("gone")
        assert [b.backup_id for b in await area.list()] == ["kept"]
        with pytest.raises(BackupMissing):
            await area.get("gone")
        with pytest.raises(BackupMissing):
            await area.delete("gone")
    assert not (_area(storage_dir) / "gone.tar").exists()
    assert [path.read_bytes() for path in _trashed(storage_dir, "gone.tar")] == [b"123456"]
    assert _trashed(storage_dir, "gone.json")
    # The trash still counts: a compromised node cannot make room by deleting.
    assert server.jail("alice").usage().used >= used


async def test_a_leftover_archive_without_metadata_is_not_listed_but_deleted(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("half", META, 3, _stream(b"abc"))
    (_area(storage_dir) / "half.json").unlink()  # as if a delete was cut short
    async with _area_at(server, alice_id) as area:
        assert await area.list() == []
        with pytest.raises(BackupMissing):
            await area.delete("half")
    assert not (_area(storage_dir) / "half.tar").exists()
    assert _trashed(storage_dir, "half.tar")


async def test_the_listing_skips_what_this_version_did_not_write(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("good", META, 4, _stream(b"good"))
    area_dir = _area(storage_dir)
    (area_dir / "orphan.json").write_bytes(b'{"format": 1}')  # no archive
    for name, content in {
        "garbage": b"not json",
        "wrongid": json.dumps({"format": 1, "backup_id": "other", "metadata": {}}).encode(),
        "future": json.dumps({"format": 2, "backup_id": "future", "metadata": {}}).encode(),
        "nometa": json.dumps({"format": 1, "backup_id": "nometa", "metadata": []}).encode(),
        "huge": b"{" + b" " * (backup_area.MAX_METADATA + 1) + b"}",
    }.items():
        (area_dir / f"{name}.json").write_bytes(content)
        (area_dir / f"{name}.tar").write_bytes(b"tar")
    (area_dir / ".hidden.tar").write_bytes(b"x")
    (area_dir / "notes.txt").write_bytes(b"x")
    (area_dir / "sub").mkdir()
    (area_dir / "sub" / "deep.json").write_bytes(b"{}")
    server.jail("alice").rescan()
    async with _area_at(server, alice_id) as area:
        assert [b.backup_id for b in await area.list()] == ["good"]
        for name in ("garbage", "huge"):
            with pytest.raises(BackupMissing):
                await area.get(name)


async def test_an_unreachable_peer(alice_id: Identity, host_id: Identity) -> None:
    target = PeerTarget("down", ("127.0.0.1:1",), host_id.public_line)
    with pytest.raises(PeerUnreachable):
        await backup_area.listing(alice_id, target)
    with pytest.raises(PeerUnreachable):
        await backup_area.upload(alice_id, target, "x", {}, 1, _stream(b"x"))


async def test_leaving_a_download_early_ends_its_connection(
    server: NodeServer, alice_id: Identity
) -> None:
    target = peer_target(server)
    data = b"d" * (2 * MIB)
    await backup_area.upload(alice_id, target, "long", META, len(data), _stream(data))
    async with contextlib.aclosing(backup_area.download(alice_id, target, "long")) as chunks:
        first = await anext(chunks)
        assert first == data[: len(first)]
        assert server.peer_state["alice"].connections == 1
    for _ in range(100):
        if server.peer_state["alice"].connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.peer_state["alice"].connections == 0


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "../up", "a/b", "x" * 201, "spa ce", "nul\0", "-dash", "é"]
)
def test_backup_ids_that_cannot_name_files(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot name a backup"):
        check_backup_id(bad)


def test_backup_ids_home_assistant_makes() -> None:
    for good in ("abc123", "9f0e6a2c", "Backup_2026-05-04.1", "x" * 200):
        assert check_backup_id(good) == good


@pytest.mark.parametrize("name", [AREA, ".HA-Backups"])
def test_no_folder_may_take_the_area_s_name(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        check_folder_name(name)


# --- a host that does not keep to the protocol (scripted frames) ---------------------------


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[BackupArea, FakeChannel]]:
    """A backup area over a scripted channel: the test plays the host, request ids 1, 2..."""
    chan = FakeChannel()
    chan.feed(protocol.welcome({"protocol": 1}))
    link = PeerLink(chan, chan, chan, "peer:8022")  # type: ignore[arg-type]
    await link._start()
    yield BackupArea(link), chan
    await link.close()


def _file(req: int, path: bytes, size: int) -> bytes:
    return protocol.entry(req, Entry(path, Kind.FILE, size, 1, 0o644))


TAR = b".ha-backups/x.tar"


async def _read(area: BackupArea) -> bytes:
    return b"".join([chunk async for chunk in area.read("x")])


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([_file(1, b"elsewhere", 3)], "not"),
        ([_file(1, TAR, 3), _file(1, TAR, 3)], "not"),
        ([_file(1, TAR, 3), protocol.data(1, b"12345")], "more of the backup"),
        ([_file(1, TAR, 5), protocol.data(1, b"123"), protocol.done(1)], "less of the backup"),
    ],
)
async def test_a_host_that_sends_something_else_is_not_believed(
    scripted: tuple[BackupArea, FakeChannel], frames: list[bytes], message: str
) -> None:
    area, chan = scripted
    chan.feed(*frames)
    with pytest.raises(PathRefused, match=message):
        await _read(area)


async def test_a_host_that_sends_no_entry_holds_no_backup(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    chan.feed(protocol.done(1))
    with pytest.raises(BackupMissing):
        await _read(area)


async def test_other_refusals_are_passed_on(scripted: tuple[BackupArea, FakeChannel]) -> None:
    area, chan = scripted
    chan.feed(protocol.fail(1, FailCode.IO, "disk error"))
    with pytest.raises(HostRefused, match="disk error"):
        await _read(area)
    chan.feed(protocol.fail(2, FailCode.IO, "cannot list"))
    with pytest.raises(HostRefused, match="cannot list"):
        await area.list()
    chan.feed(protocol.fail(3, FailCode.PATH, "refused"))
    with pytest.raises(HostRefused, match="refused"):
        await area.delete("x")


async def _asked(chan: FakeChannel, count: int) -> None:
    """Wait until the client has sent ``count`` requests (HELLO not counted)."""
    for _ in range(400):
        if len(chan.requests()) - 1 >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the client sent {len(chan.requests()) - 1} requests, not {count}")


def _listing(req: int) -> list[bytes]:
    return [_file(req, TAR, 3), _file(req, b".ha-backups/x.json", 10), protocol.done(req)]


async def test_metadata_the_host_inflates_or_loses(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    listing = asyncio.ensure_future(area.list())
    await _asked(chan, 1)
    chan.feed(*_listing(1))
    await _asked(chan, 2)
    chan.feed(_file(2, b".ha-backups/x.json", 10))
    chan.feed(protocol.data(2, b" " * (backup_area.MAX_METADATA + 1)))
    with pytest.raises(PathRefused, match="too large"):
        await listing
    # Deleted between the listing and the read: not listed.
    listing = asyncio.ensure_future(area.list())
    await _asked(chan, 3)
    chan.feed(*_listing(3))
    await _asked(chan, 4)
    chan.feed(protocol.fail(4, FailCode.MISSING, "gone"))
    assert await listing == []
    # Unreadable: said so.
    listing = asyncio.ensure_future(area.list())
    await _asked(chan, 5)
    chan.feed(*_listing(5))
    await _asked(chan, 6)
    chan.feed(protocol.fail(6, FailCode.IO, "unreadable"))
    with pytest.raises(HostRefused, match="unreadable"):
        await listing


async def test_a_host_that_offers_to_resume_a_fresh_upload(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    upload = asyncio.ensure_future(area.upload("x", {}, 1000, _stream(b"x" * 1000)))
    await _asked(chan, 1)
    chan.feed(protocol.offset(1, 100))
    await _asked(chan, 2)  # CLOSE (discard) of the same request
    chan.feed(protocol.ok(1))
    with pytest.raises(ProtocolError, match="resume"):
        await upload
    assert [kind for kind, _ in chan.requests()][-2:] == [Frame.OPEN, Frame.CLOSE]


async def test_an_answer_after_the_wait_was_given_up(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    waiting = asyncio.ensure_future(area.delete("x"))
    await _asked(chan, 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    chan.feed(protocol.ok(1))  # heard by a callback whose waiter left: nothing breaks
    deleting = asyncio.ensure_future(area.delete("y"))
    await _asked(chan, 2)
    chan.feed(protocol.fail(2, FailCode.MISSING, "none"))
    await _asked(chan, 3)
    chan.feed(protocol.fail(3, FailCode.MISSING, "none"))
    with pytest.raises(BackupMissing):
        await deleting


async def test_sizes_and_metadata_that_cannot_be_stored(
    server: NodeServer, alice_id: Identity
) -> None:
    async with _area_at(server, alice_id) as area:
        with pytest.raises(ValueError, match="cannot have"):
            await area.upload("x", {}, -1, _stream(b""))
        with pytest.raises(ValueError, match="metadata"):
            await area.upload("x", {"pad": "x" * backup_area.MAX_METADATA}, 1, _stream(b"x"))
