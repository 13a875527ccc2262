"""The backup area: archives stored, listed, read and deleted at a live host on loopback.

Every test talks to a real NodeServer over SSH on 127.0.0.1 and looks at the host's disk:
the archive lands in Alice's jail sealed (no plain name, no plain byte there), opening it
with her keys gives it back byte for byte; replacing or deleting moves the old version to
the host's trash (never destroyed), the quota counts it, a stream that lies about its size
leaves nothing behind, and a copy altered or swapped on the host is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
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
from custom_components.mynas.engine.owner import backup_area, sealed
from custom_components.mynas.engine.owner.backup_area import (
    AREA,
    BackupArea,
    NewBackup,
    SealedArea,
    StoredBackup,
    check_backup_id,
)
from custom_components.mynas.engine.owner.client import PeerLink, connect
from custom_components.mynas.engine.owner.keys import DataKeys
from custom_components.mynas.engine.owner.run import PeerTarget, check_folder_name
from custom_components.mynas.engine.owner.sealed import SealedFileError
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


class _OnHost:
    """Alice's backup area as it is on the host's disk, and her keys to read it."""

    def __init__(self, storage: Path, who: Identity) -> None:
        self.keys = DataKeys.of(who)
        self.area = SealedArea(self.keys)
        self.jail = storage / "alice"
        self.trash = storage / ".mynas" / "trash" / "alice"

    def path(self, name: str) -> Path:
        """Where the host keeps the area's plain file ``name``."""
        return self.jail / os.fsdecode(self.area.stored(name.encode()))

    def open(self, name: str, stored: bytes | None = None) -> bytes:
        """The plain bytes of the host's copy of ``name`` (SealedFileError if altered)."""
        data = self.path(name).read_bytes() if stored is None else stored
        meta, plain = sealed.open_sealed(
            self.keys.contents, self.area.jail_path(name.encode()), data
        )
        assert meta.size == len(plain)
        return plain

    def write(self, name: str, plain: bytes) -> None:
        """Put a sealed file of ``plain`` at ``name``, as Alice's node would have."""
        sealer = self.area.sealer(name.encode(), len(plain))
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sealer.head + sealer.update(plain))

    def trashed(self, name: str) -> list[bytes]:
        """The plain bytes of every version of ``name`` in the host's trash."""
        stored = os.fsdecode(self.area.stored(name.encode()))
        return [
            self.open(name, path.read_bytes()) for path in sorted(self.trash.glob(f"*/{stored}"))
        ]

    def files(self) -> Iterator[Path]:
        return (path for path in self.jail.rglob("*") if path.is_file())


@pytest.fixture
def on_host(storage_dir: Path, alice_id: Identity) -> _OnHost:
    return _OnHost(storage_dir, alice_id)


@contextlib.asynccontextmanager
async def _area_at(server: NodeServer, who: Identity) -> AsyncIterator[BackupArea]:
    link = await connect(who, address(server), server.identity.public_line)
    try:
        yield BackupArea(link, DataKeys.of(who))
    finally:
        await link.close()


async def test_an_archive_travels_sealed_and_comes_back_byte_identical(
    server: NodeServer,
    alice_id: Identity,
    on_host: _OnHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backup_area, "PROGRESS_INTERVAL", 0)  # every chunk reports
    data = random.Random(1).randbytes(3 * MIB + 12345)
    reports: list[int] = []
    # Chunks that straddle the protocol's pieces: tiny, odd and larger than one piece.
    open_stream = _stream(data, [1, 300_001, 7, 1 << 20, 65_536])
    async with _area_at(server, alice_id) as area:
        stored = await area.upload("abc123", META, len(data), open_stream, reports.append)
        assert stored == StoredBackup("abc123", len(data), META)
        assert reports[-1] == len(data)
        assert reports == sorted(reports)
        assert len(set(reports)) > 5  # on the way, not only at the end
        assert await area.list() == [stored]
        assert await area.get("abc123") == stored
        chunks = [chunk async for chunk in area.read("abc123")]
    assert b"".join(chunks) == data
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    # On the host: sealed names and contents, nothing plain.
    on_disk = on_host.path("abc123.tar").read_bytes()
    assert len(on_disk) == sealed.stored_size(len(data))
    assert data[1000:1064] not in on_disk
    assert on_host.open("abc123.tar") == data
    record = json.loads(on_host.open("abc123.json"))
    assert record == {"format": 1, "backup_id": "abc123", "size": len(data), "metadata": META}
    names = [os.fsdecode(path.relative_to(on_host.jail)) for path in on_host.files()]
    assert len(names) == 2
    assert not any(AREA in name or "abc123" in name for name in names)
    assert all(path.stat().st_mtime_ns == 0 for path in on_host.files())
    # Counted in Alice's quota like any file of hers.
    used = server.jail("alice").usage().used
    assert used >= charge(len(on_disk))


async def test_empty_and_small_archives(server: NodeServer, alice_id: Identity) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("empty", {}, 0, _stream(b""))
        await area.upload("small", {"n": 1}, 5, _stream(b"hello"))
        assert [(b.backup_id, b.size) for b in await area.list()] == [("empty", 0), ("small", 5)]
        assert [chunk async for chunk in area.read("empty")] == []
        assert b"".join([chunk async for chunk in area.read("small")]) == b"hello"


async def test_long_backup_ids(server: NodeServer, alice_id: Identity, on_host: _OnHost) -> None:
    """A sealed name past 143 plain bytes takes continuation directories on the host."""
    long_id = "L" * 200
    async with _area_at(server, alice_id) as area:
        await area.upload(long_id, {"long": True}, 4, _stream(b"long"))
        assert await area.list() == [StoredBackup(long_id, 4, {"long": True})]
        await area.delete(long_id)
        assert await area.list() == []
    assert not on_host.path(f"{long_id}.tar").exists()


async def test_module_functions_connect_per_operation(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
) -> None:
    target = peer_target(server)
    data = b"x" * 1000
    stored = await backup_area.upload(
        alice_id, target, NewBackup("b1", META, len(data), _stream(data))
    )
    assert await backup_area.listing(alice_id, target) == [stored]
    assert await backup_area.get(alice_id, target, "b1") == stored
    got = b"".join([chunk async for chunk in backup_area.download(alice_id, target, "b1")])
    assert got == data
    await backup_area.delete(alice_id, target, "b1")
    assert await backup_area.listing(alice_id, target) == []
    assert on_host.trashed("b1.tar") == [data]


async def test_no_area_yet_lists_nothing(server: NodeServer, alice_id: Identity) -> None:
    async with _area_at(server, alice_id) as area:
        assert await area.list() == []
        with pytest.raises(BackupMissing):
            await area.get("nothing")
        with pytest.raises(BackupMissing):
            _ = [chunk async for chunk in area.read("nothing")]
        with pytest.raises(BackupMissing):
            await area.delete("nothing")


async def test_another_node_sees_nothing_of_alice_s(
    server: NodeServer, alice_id: Identity, bob_id: Identity, storage_dir: Path
) -> None:
    """Bob's keys do not open Alice's names: moved into his jail, her area is not his."""
    async with _area_at(server, alice_id) as area:
        await area.upload("hers", META, 4, _stream(b"hers"))
    (storage_dir / "bob").rmdir()
    (storage_dir / "alice").rename(storage_dir / "bob")
    server.jail("bob").rescan()
    async with _area_at(server, bob_id) as area:
        assert await area.list() == []


async def test_the_quota_refuses_before_the_stream_is_opened(
    make_server: ServerFactory, alice_id: Identity, on_host: _OnHost
) -> None:
    server = await make_server([PeerGrant("alice", alice_id.public_line, 2 * MIB)])
    open_stream = _stream(b"z" * (3 * MIB))
    async with _area_at(server, alice_id) as area:
        with pytest.raises(QuotaExceeded) as err:
            await area.upload("big", META, 3 * MIB, open_stream)
        assert err.value.needed >= 3 * MIB
        assert open_stream.opened == 0
        assert await area.list() == []
    assert not on_host.path("big.tar").exists()
    assert server.jail("alice").usage().reserved == 0


@pytest.mark.parametrize(("announced", "actual"), [(2 * MIB, MIB + 1), (MIB, 2 * MIB)])
async def test_a_stream_of_another_size_leaves_nothing(
    server: NodeServer,
    alice_id: Identity,
    storage_dir: Path,
    on_host: _OnHost,
    announced: int,
    actual: int,
) -> None:
    before = server.jail("alice").usage()
    async with _area_at(server, alice_id) as area:
        with pytest.raises(BackupSizeMismatch) as err:
            await area.upload("lying", META, announced, _stream(b"q" * actual, [300_000]))
        assert err.value.announced == announced
        assert await area.list() == []
    assert str(announced) in str(err.value)
    assert list(on_host.files()) == []
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


async def test_a_partial_left_by_a_broken_upload_is_dropped_not_resumed(
    server: NodeServer, alice_id: Identity, storage_dir: Path, on_host: _OnHost
) -> None:
    """The connection dies mid-upload: the host keeps a partial; the next upload starts over."""
    partials = storage_dir / ".mynas" / "partial" / "alice"
    first = random.Random(2).randbytes(6 * MIB)
    gate = asyncio.Event()

    async def halfway() -> AsyncIterator[bytes]:
        yield first[: 5 * MIB]
        gate.set()
        for start in range(5 * MIB, len(first), 64 * 1024):  # the connection dies meanwhile
            await asyncio.sleep(0.02)
            yield first[start : start + 64 * 1024]

    async def open_stream() -> AsyncIterator[bytes]:
        return halfway()

    link = await connect(alice_id, address(server), server.identity.public_line)
    upload = asyncio.ensure_future(
        BackupArea(link, DataKeys.of(alice_id)).upload("again", META, len(first), open_stream)
    )
    await gate.wait()
    await link.close()
    with pytest.raises(Exception):  # noqa: B017 - whatever a dead link raises
        await upload
    for _ in range(200):
        if os.listdir(partials) and not server.jail("alice")._uploads:
            break
        await asyncio.sleep(0.02)
    assert os.listdir(partials)  # kept for a resume, as any large upload's
    # The same backup again (another attempt: other bytes, same size) starts from nothing.
    second = random.Random(3).randbytes(6 * MIB)
    async with _area_at(server, alice_id) as area:
        await area.upload("again", META, len(second), _stream(second))
        assert b"".join([chunk async for chunk in area.read("again")]) == second
    assert on_host.open("again.tar") == second
    assert os.listdir(partials) == []


async def test_replacing_keeps_the_old_version_in_the_trash(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("same", {"v": 1}, 4, _stream(b"old!"))
        await area.upload("same", {"v": 2}, 4, _stream(b"new!"))
        assert await area.list() == [StoredBackup("same", 4, {"v": 2})]
    assert on_host.open("same.tar") == b"new!"
    assert on_host.trashed("same.tar") == [b"old!"]
    assert len(on_host.trashed("same.json")) == 1


async def test_delete_moves_both_files_to_the_trash(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
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
    assert not on_host.path("gone.tar").exists()
    assert on_host.trashed("gone.tar") == [b"123456"]
    assert on_host.trashed("gone.json")
    # The trash still counts: a compromised node cannot make room by deleting.
    assert server.jail("alice").usage().used >= used


async def test_a_leftover_archive_without_metadata_is_not_listed_but_deleted(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("half", META, 3, _stream(b"abc"))
    on_host.path("half.json").unlink()  # as if a delete was cut short
    async with _area_at(server, alice_id) as area:
        assert await area.list() == []
        with pytest.raises(BackupMissing):
            await area.delete("half")
    assert not on_host.path("half.tar").exists()
    assert on_host.trashed("half.tar") == [b"abc"]


async def test_the_listing_skips_what_we_did_not_write(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
) -> None:
    async with _area_at(server, alice_id) as area:
        await area.upload("good", META, 4, _stream(b"good"))
    for name, content in {
        "garbage": b"not json",
        "wrongid": json.dumps({"format": 1, "backup_id": "other", "metadata": {}}).encode(),
        "future": json.dumps({"format": 2, "backup_id": "future", "metadata": {}}).encode(),
        "nometa": json.dumps({"format": 1, "backup_id": "nometa", "metadata": []}).encode(),
    }.items():
        on_host.write(f"{name}.json", content)
        on_host.write(f"{name}.tar", b"tar")
    on_host.write("orphan.json", b"{}")  # no archive
    on_host.write("notes.txt", b"x")
    on_host.write(".not an id.tar", b"x")
    on_host.write("badsize.tar", b"x")
    on_host.write("badsize.json", json.dumps({"format": 1, "backup_id": "badsize"}).encode())
    with on_host.path("badsize.tar").open("ab") as grown:
        grown.write(b"!")  # no sealed file has that size
    area_dir = on_host.path("good.tar").parent
    (area_dir / "not-a-sealed-name").write_bytes(b"x")  # a name that does not decrypt
    (area_dir / "plaindir").mkdir()
    (area_dir / "plaindir" / "inside.json").write_bytes(b"{}")
    server.jail("alice").rescan()
    async with _area_at(server, alice_id) as area:
        assert [b.backup_id for b in await area.list()] == ["good"]
        for name in ("garbage", "orphan", "badsize"):
            with pytest.raises(BackupMissing):
                await area.get(name)


async def test_a_copy_altered_on_the_host_is_refused(
    server: NodeServer, alice_id: Identity, on_host: _OnHost
) -> None:
    data = random.Random(4).randbytes(MIB)
    async with _area_at(server, alice_id) as area:
        await area.upload("one", META, len(data), _stream(data))
        await area.upload("two", {"n": 2}, len(data), _stream(data[::-1]))
    stored = bytearray(on_host.path("one.tar").read_bytes())
    stored[len(stored) // 2] ^= 1
    on_host.path("one.tar").write_bytes(bytes(stored))
    received: list[bytes] = []

    async def read_one(area: BackupArea) -> None:
        async for chunk in area.read("one"):
            received.append(chunk)

    async with _area_at(server, alice_id) as area:
        with pytest.raises(SealedFileError, match="altered"):
            await read_one(area)
        assert len(b"".join(received)) < len(data) // 2 + sealed.CHUNK  # never the bad part
    # Two backups swapped on the host: each fails where it now is.
    one, two = on_host.path("one.tar"), on_host.path("two.tar")
    tmp = one.with_name("swap")
    one.rename(tmp)
    two.rename(one)
    tmp.rename(two)
    async with _area_at(server, alice_id) as area:
        with pytest.raises(SealedFileError):
            _ = [chunk async for chunk in area.read("two")]
    # Metadata altered: that backup is left out of the listing, the others are not.
    meta = bytearray(on_host.path("two.json").read_bytes())
    meta[-1] ^= 1
    on_host.path("two.json").write_bytes(bytes(meta))
    async with _area_at(server, alice_id) as area:
        assert [b.backup_id for b in await area.list()] == ["one"]


async def test_an_unreachable_peer(alice_id: Identity, host_id: Identity) -> None:
    target = PeerTarget("down", ("127.0.0.1:1",), host_id.public_line)
    with pytest.raises(PeerUnreachable):
        await backup_area.listing(alice_id, target)
    with pytest.raises(PeerUnreachable):
        await backup_area.upload(alice_id, target, NewBackup("x", {}, 1, _stream(b"x")))


async def test_leaving_a_download_early_ends_its_connection(
    server: NodeServer, alice_id: Identity
) -> None:
    target = peer_target(server)
    data = b"d" * (2 * MIB)
    await backup_area.upload(alice_id, target, NewBackup("long", META, len(data), _stream(data)))
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


async def test_sizes_and_metadata_that_cannot_be_stored(
    server: NodeServer, alice_id: Identity
) -> None:
    async with _area_at(server, alice_id) as area:
        with pytest.raises(ValueError, match="cannot have"):
            await area.upload("x", {}, -1, _stream(b""))
        with pytest.raises(ValueError, match="metadata"):
            await area.upload("x", {"pad": "x" * backup_area.MAX_METADATA}, 1, _stream(b"x"))


# --- a host that does not keep to the protocol (scripted frames) ---------------------------

KEYS = DataKeys.from_secret(bytes(range(32)))
AREA_OF = SealedArea(KEYS)
TAR = AREA_OF.stored(b"x.tar")
JSON = AREA_OF.stored(b"x.json")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[BackupArea, FakeChannel]]:
    """A backup area over a scripted channel: the test plays the host, request ids 1, 2..."""
    chan = FakeChannel()
    chan.feed(protocol.welcome({"protocol": 1}))
    link = PeerLink(chan, chan, chan, "peer:8022")  # type: ignore[arg-type]
    await link._start()
    yield BackupArea(link, KEYS), chan
    await link.close()


def _file(req: int, path: bytes, size: int) -> bytes:
    return protocol.entry(req, Entry(path, Kind.FILE, size, 0, 0o644))


def _sealed_file(name: bytes, plain: bytes) -> bytes:
    sealer = AREA_OF.sealer(name, len(plain))
    return sealer.head + sealer.update(plain)


async def _asked(chan: FakeChannel, count: int) -> None:
    """Wait until the client has sent ``count`` requests (HELLO not counted)."""
    for _ in range(400):
        if len(chan.requests()) - 1 >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the client sent {len(chan.requests()) - 1} requests, not {count}")


async def _read(area: BackupArea) -> bytes:
    return b"".join([chunk async for chunk in area.read("x")])


GOOD = _sealed_file(b"x.tar", b"abc")


@pytest.mark.parametrize(
    ("frames", "error", "message"),
    [
        ([_file(1, b"elsewhere", len(GOOD))], PathRefused, "not"),
        ([_file(1, TAR, len(GOOD)), _file(1, TAR, len(GOOD))], PathRefused, "not"),
        (
            [_file(1, TAR, 80), protocol.data(1, b"x" * 80), protocol.done(1)],
            SealedFileError,
            "not a sealed file",
        ),
        (
            [_file(1, TAR, 80), protocol.data(1, GOOD[:80]), protocol.done(1)],
            SealedFileError,
            "truncated",
        ),
        (
            [_file(1, TAR, len(GOOD) + 1), protocol.data(1, GOOD + b"!"), protocol.done(1)],
            SealedFileError,
            "longer",
        ),
    ],
)
async def test_a_host_that_sends_something_else_is_not_believed(
    scripted: tuple[BackupArea, FakeChannel],
    frames: list[bytes],
    error: type[Exception],
    message: str,
) -> None:
    area, chan = scripted
    chan.feed(*frames)
    with pytest.raises(error, match=message):
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


def _listing(req: int) -> list[bytes]:
    return [
        protocol.entry(req, Entry(AREA_OF.root, Kind.DIR, 0, 0, 0o755)),
        _file(req, TAR, sealed.stored_size(3)),
        _file(req, JSON, sealed.stored_size(10)),
        protocol.done(req),
    ]


async def test_metadata_the_host_inflates_or_loses(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    listing = asyncio.ensure_future(area.list())
    await _asked(chan, 1)
    chan.feed(*_listing(1))
    await _asked(chan, 2)
    big = _sealed_file(b"x.json", b" " * (backup_area.MAX_METADATA + 1))
    chan.feed(_file(2, JSON, len(big)))
    for start in range(0, len(big), protocol.CHUNK):
        chan.feed(protocol.data(2, big[start : start + protocol.CHUNK]))
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


async def test_a_host_that_keeps_offering_to_resume(
    scripted: tuple[BackupArea, FakeChannel],
) -> None:
    area, chan = scripted
    upload = asyncio.ensure_future(area.upload("x", {}, 1000, _stream(b"x" * 1000)))
    await _asked(chan, 1)
    chan.feed(protocol.offset(1, 100))
    await _asked(chan, 2)  # CLOSE (discard) of the same request
    chan.feed(protocol.ok(1))
    await _asked(chan, 3)  # OPEN again
    chan.feed(protocol.offset(2, 100))
    await _asked(chan, 4)
    chan.feed(protocol.ok(2))
    with pytest.raises(ProtocolError, match="resume"):
        await upload
    kinds = [kind for kind, _ in chan.requests()]
    assert kinds[-4:] == [Frame.OPEN, Frame.CLOSE, Frame.OPEN, Frame.CLOSE]


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
