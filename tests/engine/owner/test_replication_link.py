"""The client's side of the replication protocol, frame by frame, over a scripted channel.

A fake channel stands in for SSH so the dispatcher's corner cases are reached exactly:
pipelined answers, failures mapped to errors, streams read halfway, a lost connection with
a reader that is behind, and a host that breaks the protocol. The connect paths that need
a real socket run against loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
from typing import Any

import asyncssh
import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.errors import (
    HostRefused,
    MyNasError,
    PeerDiskFull,
    PeerUnreachable,
    ProtocolError,
    QuotaExceeded,
)
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.server import PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import answers, client, outbox
from custom_components.mynas.engine.owner.client import PeerLink, connect
from custom_components.mynas.engine.protocol import FailCode, Frame
from custom_components.mynas.engine.tree import Entry, Kind

from ..conftest import ServerFactory, address


class FakeChannel:
    """Both ends of a scripted channel: frames in (``feed``), frames out (``sent``)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.buffer = b""
        self.sent: list[bytes] = []
        self.write_error: BaseException | None = None
        self.drain_error: BaseException | None = None
        self.closed = False

    # reader
    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            item = await self.incoming.get()
            if item is None:
                partial, self.buffer = self.buffer, b""
                raise asyncio.IncompleteReadError(partial, n)
            if isinstance(item, BaseException):
                raise item
            self.buffer += item
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    # writer
    def write(self, data: bytes) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.sent.append(bytes(data))

    async def drain(self) -> None:
        if self.drain_error is not None:
            raise self.drain_error

    def close(self) -> None:
        self.closed = True

    # connection
    async def wait_closed(self) -> None:
        return None

    def feed(self, *frames: bytes | BaseException | None) -> None:
        for item in frames:
            self.incoming.put_nowait(item)

    def requests(self) -> list[tuple[Frame, bytes]]:
        """Decode every frame the client sent."""
        data = b"".join(self.sent)
        found = []
        while data:
            length, kind = protocol._HEAD.unpack_from(data)
            found.append((Frame(kind), data[5 : 4 + length]))
            data = data[4 + length :]
        return found


@pytest.fixture
async def chan() -> FakeChannel:
    """A scripted channel."""
    return FakeChannel()


async def _started(
    chan: FakeChannel, welcome: dict[str, Any] | None = None, address: str = "x:1"
) -> PeerLink:
    """A link over ``chan``, started by the host's WELCOME (``welcome``, else empty)."""
    chan.feed(protocol.welcome(welcome or {}))
    peer = PeerLink(chan, chan, chan, address)  # type: ignore[arg-type]
    await peer._start()
    return peer


@pytest.fixture
async def link(chan: FakeChannel) -> AsyncIterator[PeerLink]:
    """A started link over the scripted channel, closed at the end."""
    peer = await _started(chan, {"protocol": 1, "peer": "alice"}, "peer:8022")
    assert peer.welcome["peer"] == "alice"
    yield peer
    await peer.close()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _entry(req: int, name: bytes) -> bytes:
    return protocol.entry(req, Entry(name, Kind.FILE, 1, 5, 0o644))


async def test_pipelined_answers_reach_their_callbacks(link: PeerLink, chan: FakeChannel) -> None:
    """OK for several requests at once, FAIL mapped to the error it stands for."""
    heard: dict[str, MyNasError | None] = {}
    for name in ("a", "b", "c", "d", "e"):
        await link.put(name.encode(), 5, 0o644, b"x", lambda err, n=name: heard.__setitem__(n, err))
    await link.delete(b"f", lambda err: heard.__setitem__("f", err))
    await link.mkdir(b"g", None, lambda err: heard.__setitem__("g", err))
    await link.utime(b"h", 7, lambda err: heard.__setitem__("h", err))
    assert link.pending == 8
    chan.feed(
        protocol.ok(1, 2),
        protocol.fail(3, FailCode.QUOTA, "full", needed=10, available=4),
        protocol.fail(4, FailCode.DISK_FULL, "ENOSPC"),
        protocol.fail(5, FailCode.PATH, "no links"),
        protocol.ok(6, 7, 8),
    )
    await _settle()
    assert heard["a"] is None
    assert heard["b"] is None
    assert isinstance(heard["c"], QuotaExceeded)
    assert (heard["c"].needed, heard["c"].available) == (10, 4)
    assert isinstance(heard["d"], PeerDiskFull)
    assert isinstance(heard["e"], HostRefused)
    assert heard["e"].code == "path"
    assert heard["f"] is None
    assert heard["g"] is None
    assert heard["h"] is None
    assert link.pending == 0
    kinds = [kind for kind, _ in chan.requests()]
    assert kinds[0] is Frame.HELLO
    assert kinds[1:] == [Frame.PUT] * 5 + [Frame.DELETE, Frame.MKDIR, Frame.UTIME]


async def test_requests_that_wait_for_their_answer(link: PeerLink, chan: FakeChannel) -> None:
    """OPEN gets an OFFSET, QUERY a REPLY, SYNC and CLOSE an OK."""
    task = asyncio.create_task(link.open_upload(b"big", 10, 5, 0o644))
    await _settle()
    chan.feed(protocol.offset(1, 4))
    assert await task == (1, 4)
    await link.send_data(1, b"abcdef")
    task2 = asyncio.create_task(link.close_upload(1, protocol.Close.FINISH))
    await _settle()
    chan.feed(protocol.ok(1))
    await task2
    task3 = asyncio.create_task(link.usage())
    await _settle()
    chan.feed(protocol.reply(2, {"used": 1, "quota": 2, "disk_free": 3}))
    assert await task3 == {"used": 1, "quota": 2, "disk_free": 3}
    task4 = asyncio.create_task(link.set_retention("Docs", 30))
    await _settle()
    chan.feed(protocol.fail(3, FailCode.PROTOCOL, "no"))
    with pytest.raises(HostRefused, match="no"):
        await task4
    task5 = asyncio.create_task(link.sync())
    await _settle()
    chan.feed(protocol.ok(4))
    await task5


async def test_streams_end_with_done_or_fail(link: PeerLink, chan: FakeChannel) -> None:
    """LIST yields entries (with hashes) until DONE; READ mixes ENTRY and DATA; FAIL raises."""
    chan.feed(
        protocol.entry(1, Entry(b"a", Kind.FILE, 1, 5, 0o644), b"h" * 32),
        protocol.entry(1, Entry(b"d", Kind.DIR, 0, 6, 0o755)),
        protocol.done(1),
    )
    got = [item async for item in link.list(b"", with_hash=True)]
    assert got == [
        (Entry(b"a", Kind.FILE, 1, 5, 0o644), b"h" * 32),
        (Entry(b"d", Kind.DIR, 0, 6, 0o755), None),
    ]
    chan.feed(_entry(2, b"f"), protocol.data(2, b"x"), protocol.done(2))
    got2 = [(kind, value) async for kind, value in link.read(b"f")]
    assert [kind for kind, _ in got2] == [Frame.ENTRY, Frame.DATA]
    assert bytes(got2[1][1]) == b"x"
    chan.feed(protocol.fail(3, FailCode.MISSING, "no such file or directory"))
    with pytest.raises(HostRefused) as caught:
        async for _ in link.list(b"nope"):
            pass
    assert caught.value.code == FailCode.MISSING
    chan.feed(protocol.data(4, b"?"), protocol.done(4))
    with pytest.raises(ProtocolError, match="unexpected DATA in a listing"):
        async for _ in link.list(b"x"):
            pass


async def test_an_upload_sends_whole_frames_and_ends_each_way(
    link: PeerLink, chan: FakeChannel
) -> None:
    """An upload resumes at the host's offset, sends CHUNK-sized frames, ends three ways."""
    task = asyncio.create_task(link.upload(b"big", 3 * client.Upload.piece_size, 5, 0o644))
    await _settle()
    chan.feed(protocol.offset(1, 7))
    upload = await task
    assert upload.offset == 7
    await upload.send(b"p" * upload.piece_size)
    await link.flush()
    data_frame = chan.requests()[-1]
    assert data_frame[0] is Frame.DATA
    assert len(chan.sent[-1]) == protocol.CHUNK  # a full piece is one whole CHUNK frame
    assert protocol.parse_data(data_frame[1]) == (1, memoryview(b"p" * upload.piece_size))
    for req, (end, how) in enumerate(
        [
            (client.Upload.finish, protocol.Close.FINISH),
            (client.Upload.abandon, protocol.Close.ABANDON),
            (client.Upload.discard, protocol.Close.DISCARD),
        ],
        start=1,
    ):
        ending = asyncio.create_task(end(client.Upload(link, req, 0)))
        await _settle()
        kind, body = chan.requests()[-1]
        assert (kind, protocol.parse_close(body)) == (Frame.CLOSE, (req, how))
        chan.feed(protocol.ok(req))
        await ending


async def test_a_download_yields_entries_and_their_data(link: PeerLink, chan: FakeChannel) -> None:
    """READ's answer as typed items: an Entry per file or directory, then the file's bytes."""
    chan.feed(
        protocol.entry(1, Entry(b"d", Kind.DIR, 0, 6, 0o755)),
        _entry(1, b"d/f"),
        protocol.data(1, b"x"),
        protocol.done(1),
    )
    got = [item async for item in link.download(b"d")]
    assert got[:2] == [Entry(b"d", Kind.DIR, 0, 6, 0o755), Entry(b"d/f", Kind.FILE, 1, 5, 0o644)]
    assert isinstance(got[2], memoryview)
    assert bytes(got[2]) == b"x"
    chan.feed(protocol.fail(2, FailCode.PATH, "a symlink"))
    with pytest.raises(HostRefused, match="a symlink"):
        async for _ in link.download(b"link"):
            pass


async def test_a_stream_left_early_drops_its_late_frames(link: PeerLink, chan: FakeChannel) -> None:
    """A reader that stops halfway: the rest of that answer is dropped, the link goes on."""
    # The rest of the answer is still on its way when the reader leaves...
    async with contextlib.aclosing(link.read(b"f")) as frames:
        chan.feed(_entry(1, b"f"))
        async for _ in frames:
            break
    chan.feed(protocol.data(1, b"late"), protocol.done(1))
    async with contextlib.aclosing(link.list(b"g")) as entries:
        chan.feed(_entry(2, b"g"))
        async for _ in entries:
            break
    chan.feed(protocol.fail(2, FailCode.IO, "late failure"))
    # ... or already queued.
    async with contextlib.aclosing(link.list(b"h")) as entries:
        chan.feed(_entry(3, b"h"), _entry(3, b"i"), protocol.done(3))
        async for _ in entries:
            await _settle()
            break
    sync = asyncio.create_task(link.sync())
    await _settle()
    chan.feed(protocol.ok(4))
    await sync  # still answered, nothing was mistaken for it
    assert link._answers.abandoned == set()


async def test_a_lost_connection_reaches_a_reader_that_is_behind(
    link: PeerLink, chan: FakeChannel
) -> None:
    """The queue is full when the link dies: the reader gets what came, then the error."""
    chan.feed(*(_entry(1, b"f%d" % i) for i in range(300)))
    stream = link.list(b"")
    first = await anext(stream)
    assert first[0].path == b"f0"
    for _ in range(50):
        await asyncio.sleep(0)
    assert link._answers._streams[1].queue.full()
    await link.close()
    received = [first]

    async def read_the_rest() -> None:
        async for item in stream:
            received.append(item)

    with pytest.raises(PeerUnreachable, match="connection lost"):
        await asyncio.wait_for(read_the_rest(), 5)  # never a hang
    assert 256 <= len(received) < 300
    with pytest.raises(PeerUnreachable):
        await link.usage()


async def test_the_end_of_the_channel_fails_everything_pending(
    link: PeerLink, chan: FakeChannel
) -> None:
    """EOF from the host: callbacks and waiting requests hear PeerUnreachable."""
    heard: list[MyNasError | None] = []
    await link.put(b"a", 5, 0o644, b"x", heard.append)
    waiting = asyncio.create_task(link.usage())
    listing = asyncio.create_task(anext(link.list(b"")))
    await _settle()
    chan.feed(None)
    with pytest.raises(PeerUnreachable, match="peer:8022"):
        await waiting
    with pytest.raises(PeerUnreachable):
        await listing
    assert len(heard) == 1
    assert isinstance(heard[0], PeerUnreachable)
    with pytest.raises(PeerUnreachable):
        await link.put(b"b", 5, 0o644, b"x", heard.append)
    with pytest.raises(PeerUnreachable):
        await link.flush()


@pytest.mark.parametrize(
    "frame",
    [
        protocol.ok(99),
        protocol.data(7, b"x"),
        protocol.done(7),
        protocol.frame(Frame.PUT, b"\0" * 20),
        protocol.frame(Frame.ENTRY, b"\0\0\0\1\7" + b"\0" * 20),
        protocol.frame(Frame.ENTRY, b"\0\0\0\1\0" + b"\0" * 18 + b"\5abc"),
        protocol.frame(Frame.OK, b"\0\0\1"),
    ],
    ids=[
        "unknown id",
        "stray data",
        "stray done",
        "put from host",
        "bad kind",
        "truncated",
        "bad ok",
    ],
)
async def test_a_host_breaking_the_protocol_is_cut_off(
    link: PeerLink, chan: FakeChannel, frame: bytes
) -> None:
    """Anything malformed or unasked for ends the link with ProtocolError."""
    waiting = asyncio.create_task(link.usage())
    await _settle()
    chan.feed(frame)
    with pytest.raises(ProtocolError):
        await waiting
    assert chan.closed


async def test_a_dispatcher_failure_never_leaves_requests_hanging(
    link: PeerLink, chan: FakeChannel
) -> None:
    """Even an unexpected error while reading fails what is pending."""
    waiting = asyncio.create_task(link.usage())
    await _settle()
    chan.feed(RuntimeError("bug"))
    with pytest.raises(PeerUnreachable, match="bug"):
        await waiting


@pytest.mark.parametrize(
    "error", [BrokenPipeError("Channel not open for sending"), asyncssh.ConnectionLost("gone")]
)
async def test_a_dead_channel_on_write_is_peer_unreachable(
    link: PeerLink, chan: FakeChannel, error: BaseException
) -> None:
    """Writing or draining into a closed channel raises PeerUnreachable, never OSError."""
    heard: list[MyNasError | None] = []
    await link.put(b"a", 5, 0o644, b"x", heard.append)
    chan.drain_error = error
    with pytest.raises(PeerUnreachable):
        await link.usage()
    assert len(heard) == 1
    assert isinstance(heard[0], PeerUnreachable)

    fresh = FakeChannel()
    other = await _started(fresh)
    fresh.write_error = error
    try:
        # Queued, then written at the end of this pass of the loop: the write fails and
        # the request hears it.
        await other.put(b"a", 5, 0o644, b"x", heard.append)
        await asyncio.sleep(0)
        assert len(heard) == 2
        assert isinstance(heard[1], PeerUnreachable)
        with pytest.raises(PeerUnreachable):
            await other.put(b"a", 5, 0o644, b"x", heard.append)
    finally:
        await other.close()

    # A write of COALESCE bytes or more is not deferred: it fails at once.
    third = FakeChannel()
    last = await _started(third)
    third.write_error = error
    try:
        with pytest.raises(PeerUnreachable):
            await last.put(b"a", 5, 0o644, b"x" * outbox.COALESCE, heard.append)
    finally:
        await last.close()


async def test_frames_of_one_loop_pass_go_out_in_one_write(
    link: PeerLink, chan: FakeChannel
) -> None:
    """Small requests are coalesced in order; flush(), a wait, or COALESCE bytes write them."""
    chan.sent.clear()
    for name in (b"a", b"b", b"c"):
        await link.put(name, 5, 0o644, b"x", lambda _err: None)
    await link.delete(b"d", lambda _err: None)
    assert chan.sent == []  # nothing written before the loop gets a turn
    await asyncio.sleep(0)
    assert len(chan.sent) == 1
    assert [kind for kind, _ in chan.requests()] == [Frame.PUT] * 3 + [Frame.DELETE]
    assert [protocol.parse_put(body).path for _, body in chan.requests()[:3]] == [
        b"a",
        b"b",
        b"c",
    ]

    chan.sent.clear()
    await link.mkdir(b"e", None, lambda _err: None)
    await link.flush()  # at once, without waiting for the loop
    assert [kind for kind, _ in chan.requests()] == [Frame.MKDIR]

    chan.sent.clear()
    big = b"y" * (outbox.COALESCE // 2)
    await link.put(b"f", 5, 0o644, big, lambda _err: None)
    assert chan.sent == []
    await link.put(b"g", 5, 0o644, big, lambda _err: None)
    # Past COALESCE: whole SSH packets are written before put() returns...
    assert len(chan.sent) == 1
    assert len(chan.sent[0]) % outbox.PACKET == 0
    await asyncio.sleep(0)
    # ...and the tail at the end of the loop's pass.
    assert len(chan.sent) == 2
    assert 0 < len(chan.sent[1]) < outbox.PACKET
    assert [protocol.parse_put(body).path for _, body in chan.requests()] == [b"f", b"g"]


async def test_queued_frames_are_dropped_when_the_link_closes(chan: FakeChannel) -> None:
    """A request queued as the link closes fails; its frame is never written."""
    peer = await _started(chan)
    chan.sent.clear()
    heard: list[MyNasError | None] = []
    await peer.put(b"a", 5, 0o644, b"x", heard.append)
    await peer.close()
    await asyncio.sleep(0)
    assert chan.sent == []
    assert len(heard) == 1
    assert isinstance(heard[0], PeerUnreachable)


async def test_a_big_put_drains_as_it_goes(link: PeerLink, chan: FakeChannel) -> None:
    """Past the drain threshold, sending waits for the channel's flow control."""
    drained = 0
    real = chan.drain

    async def counting() -> None:
        nonlocal drained
        drained += 1
        await real()

    chan.drain = counting  # type: ignore[method-assign]
    for _ in range(3):
        await link.put(b"a", 5, 0o644, b"x" * (300 * 1024), lambda _err: None)
    assert drained >= 1


async def test_the_host_must_welcome_us(chan: FakeChannel) -> None:
    """Anything but WELCOME first is a protocol error."""
    chan.feed(protocol.ok(1))
    peer = PeerLink(chan, chan, chan, "x:1")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="expected WELCOME"):
        await peer._start()


def test_fail_frames_map_to_errors() -> None:
    """Quota and disk-full keep their figures; the rest is a HostRefused with its code."""
    quota = answers.error_from_fail({"code": "quota", "needed": 5, "available": 1})
    assert isinstance(quota, QuotaExceeded)
    assert (quota.needed, quota.available) == (5, 1)
    assert isinstance(answers.error_from_fail({"code": "disk_full"}), PeerDiskFull)
    other = answers.error_from_fail({"code": "changed", "message": "moved"})
    assert isinstance(other, HostRefused)
    assert other.code == "changed"
    assert str(other) == "moved"
    assert str(answers.error_from_fail({})) == "refused by the host"


# --- connect over real sockets ---------------------------------------------------------------


async def test_a_silent_port_times_out(
    alice_id: Identity, host_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something that accepts and never speaks SSH: PeerUnreachable, timed out."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(client, "CONNECT_TIMEOUT", 0.3)
    try:
        with pytest.raises(PeerUnreachable, match="timed out"):
            await connect(alice_id, f"127.0.0.1:{port}", host_id.public_line)
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_host_that_drops_us_after_login(
    make_server: ServerFactory, alice_id: Identity, host_id: Identity
) -> None:
    """Logged in, then refused a channel: PeerUnreachable says replication did not start."""
    server = await make_server(
        [PeerGrant("alice", alice_id.public_line, 1 << 20)],
        limits=Limits(connections_per_peer=0),
    )
    with pytest.raises(PeerUnreachable, match="would not start replication"):
        await connect(alice_id, address(server), host_id.public_line)


async def test_a_real_link_answers_usage(
    server: Any, alice_id: Identity, host_id: Identity
) -> None:
    """Over loopback: connect, ask the usage, close (as a context manager)."""
    async with await connect(alice_id, address(server), host_id.public_line) as peer:
        usage = await peer.usage()
        assert usage["quota"] == 16 << 20
        await peer.set_retention("Docs", 60)
    with pytest.raises(PeerUnreachable):
        await peer.usage()


async def test_a_request_cancelled_while_sending_drops_its_late_answer(
    link: PeerLink, chan: FakeChannel
) -> None:
    """Cancelled while the channel is full: the answer that comes later is ignored."""
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    chan.drain = blocked  # type: ignore[method-assign]
    task = asyncio.create_task(link.usage())
    await _settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    chan.feed(protocol.reply(1, {"used": 0}))
    waiting = asyncio.create_task(link.sync())
    await _settle()
    chan.feed(protocol.ok(2))
    await waiting  # the link is still fine


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(113, "No route to host"), "No route to host"),
        (asyncssh.DisconnectError(11, "bye"), "bye"),
    ],
)
async def test_connection_failures_become_peer_unreachable(
    alice_id: Identity,
    host_id: Identity,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    reason: str,
) -> None:
    """Whatever stops the SSH connection, the caller sees PeerUnreachable with the reason."""

    async def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(client.asyncssh, "create_connection", failing)
    with pytest.raises(PeerUnreachable, match=reason):
        await connect(alice_id, "127.0.0.1:1", host_id.public_line)


async def test_a_host_that_never_welcomes_us_is_dropped(
    server: Any, alice_id: Identity, host_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while starting the protocol closes the SSH connection it opened."""

    async def no_welcome(self: PeerLink) -> None:
        raise ProtocolError("expected WELCOME, got OK")

    monkeypatch.setattr(PeerLink, "_start", no_welcome)
    with pytest.raises(ProtocolError, match="WELCOME"):
        await connect(alice_id, address(server), host_id.public_line)
    await asyncio.sleep(0.05)
    assert server._connections == set()
