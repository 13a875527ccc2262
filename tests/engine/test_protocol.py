"""The frame codec and the server's buffered frame reader, without SSH."""

from __future__ import annotations

import asyncio
import struct

from hypothesis import given, settings, strategies as st
import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.errors import ProtocolError
from custom_components.mynas.engine.protocol import MAX_FRAME, Frame, FrameReader

MTIME = 1_700_000_000_123_456_789


class Pieces:
    """A stream that hands out given pieces, one per call, and counts the calls."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.reads = 0
        self.exact_reads = 0

    async def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if n >= 0 and len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece

    async def readexactly(self, n: int) -> bytes:
        self.exact_reads += 1
        data = b""
        while len(data) < n and self.pieces:
            data += await self.read(n - len(data))
        if len(data) < n:
            raise asyncio.IncompleteReadError(data, n)
        return data


def frames(count: int, size: int = 100) -> list[bytes]:
    return [
        protocol.put(n, b"dir/f%d" % n, MTIME, 0o644, bytes([n % 256]) * size) for n in range(count)
    ]


async def read_all(reader: FrameReader) -> list[tuple[Frame, bytes]]:
    found = []
    while True:
        try:
            found.append(await reader.read_frame())
        except asyncio.IncompleteReadError as err:
            partial = err.partial
            break
    assert partial == b""  # ended cleanly, between frames
    return found


def expected(encoded: list[bytes]) -> list[tuple[Frame, bytes]]:
    return [(Frame(data[4]), data[5:]) for data in encoded]


async def test_one_read_serves_many_small_frames() -> None:
    encoded = frames(200)
    stream = Pieces([b"".join(encoded)])
    reader = FrameReader(stream, read_size=1 << 20)
    assert await read_all(reader) == expected(encoded)
    assert stream.reads == 2  # the frames, then the end
    assert stream.exact_reads == 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=40),
    read_size=st.sampled_from([1, 5, 64, 1000, 4096]),
)
async def test_frames_cut_anywhere_come_out_whole(
    sizes: list[int], cuts: list[int], read_size: int
) -> None:
    """Whatever the stream's pieces and the read size, the same frames come out."""
    encoded = [protocol.data(n, bytes([n]) * size) for n, size in enumerate(sizes)]
    stream = b"".join(encoded)
    pieces = []
    position = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        if position >= len(stream):
            break
        pieces.append(stream[position : position + cut])
        position += cut
    reader = FrameReader(Pieces(pieces), read_size=read_size)
    assert await read_all(reader) == expected(encoded)


async def test_a_frame_cut_by_a_read_is_completed_exactly() -> None:
    """The missing part of a frame is read in one piece; the next read starts clean."""
    big = protocol.data(1, b"x" * 10_000)
    small = protocol.data(2, b"y")
    stream = Pieces([big[:3000], big[3000:] + small])
    reader = FrameReader(stream, read_size=3000)
    assert await reader.read_frame() == (Frame.DATA, big[5:])
    assert stream.exact_reads == 1
    assert reader.buffered == 0
    assert await reader.read_frame() == (Frame.DATA, small[5:])


async def test_bodies_do_not_keep_the_read_buffer_alive() -> None:
    encoded = frames(3)
    reader = FrameReader(Pieces([b"".join(encoded)]))
    _, body = await reader.read_frame()
    assert type(body) is bytes
    assert len(body) == len(encoded[0]) - 5


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (struct.pack(">IB", MAX_FRAME + 1, Frame.PUT), "limit"),
        (struct.pack(">IB", 0, Frame.PUT), "limit"),
        (struct.pack(">IB", 10, 99), "unknown frame type 99"),
    ],
)
async def test_bad_heads_are_refused_before_the_body(head: bytes, why: str) -> None:
    stream = Pieces([head + b"z" * 64])
    charged = []

    async def charge(size: int) -> None:
        charged.append(size)

    reader = FrameReader(stream, charge=charge)
    with pytest.raises(ProtocolError, match=why):
        await reader.read_frame()
    assert charged == []  # nothing was taken for a frame that is refused


async def test_end_of_stream_mid_frame_reports_what_came() -> None:
    data = protocol.data(1, b"abc" * 100)
    reader = FrameReader(Pieces([data[:2]]))  # not even a whole head
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        await reader.read_frame()
    assert caught.value.partial == data[:2]
    reader = FrameReader(Pieces([data[:50]]), read_size=1000)
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        await reader.read_frame()
    assert caught.value.partial == data[:50]


async def test_charge_comes_before_the_body_is_read() -> None:
    """A budget that makes the reader wait stops it before it takes the body."""
    big = protocol.data(1, b"b" * 5000)
    stream = Pieces([big[:100], big[100:]])
    gate = asyncio.Event()
    charged = []

    async def charge(size: int) -> None:
        charged.append(size)
        await gate.wait()

    reader = FrameReader(stream, charge=charge, read_size=100)
    task = asyncio.create_task(reader.read_frame())
    await asyncio.sleep(0.01)
    assert charged == [len(big) - 5]
    assert stream.exact_reads == 0  # waiting for the budget, not reading
    gate.set()
    assert await task == (Frame.DATA, big[5:])


async def test_ready_fill_and_the_end() -> None:
    encoded = frames(2)
    stream = asyncio.StreamReader()
    reader = FrameReader(stream)
    assert not reader.ready()
    stream.feed_data(encoded[0][:20])
    await reader.fill()
    assert reader.buffered == 20
    assert not reader.ready()
    stream.feed_data(encoded[0][20:] + encoded[1][:3])
    await reader.fill()
    assert reader.ready()
    assert await reader.read_frame() == expected(encoded)[0]
    assert not reader.ready()  # 3 bytes: not even a head
    assert not reader.ended
    stream.feed_data(encoded[1][3:])
    stream.feed_eof()
    assert await reader.read_frame() == expected(encoded)[1]
    await reader.fill()
    assert reader.ended
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read_frame()


async def test_fill_can_be_cancelled_without_losing_bytes() -> None:
    """A timed-out fill takes nothing: what arrives afterwards is read whole."""
    encoded = frames(1)
    stream = asyncio.StreamReader()
    reader = FrameReader(stream)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await reader.fill()
    stream.feed_data(encoded[0])
    stream.feed_eof()
    assert await read_all(reader) == expected(encoded)


async def test_read_frame_still_works_alone() -> None:
    """The plain two-read decoder (used by the client) agrees with the buffered one."""
    encoded = frames(3)
    stream = asyncio.StreamReader()
    stream.feed_data(b"".join(encoded))
    stream.feed_eof()
    assert [await protocol.read_frame(stream) for _ in encoded] == expected(encoded)


async def test_read_frame_refuses_bad_heads() -> None:
    for head, why in (
        (struct.pack(">IB", MAX_FRAME + 1, Frame.PUT), "limit"),
        (struct.pack(">IB", 5, 99), "unknown frame type 99"),
    ):
        stream = asyncio.StreamReader()
        stream.feed_data(head + b"body!")
        with pytest.raises(ProtocolError, match=why):
            await protocol.read_frame(stream)


def test_encoders_refuse_what_would_break_the_limits() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        protocol.data(1, bytes(MAX_FRAME))
    with pytest.raises(ProtocolError, match="path of"):
        protocol.delete(1, b"p" * (protocol.MAX_PATH + 1))
    with pytest.raises(ProtocolError, match="truncated entry"):
        protocol.parse_entry(struct.pack(">IBQqH", 1, 0, 0, 0, 0))


async def test_peek_names_the_next_whole_frame_only() -> None:
    stream = asyncio.StreamReader()
    reader = FrameReader(stream)
    first = protocol.mkdir(1, b"d", None)
    stream.feed_data(first + struct.pack(">IB", 1, 99) + protocol.delete(2, b"x")[:6])
    await reader.fill()
    assert reader.peek() is Frame.MKDIR
    await reader.read_frame()
    assert reader.peek() is None  # an unknown type: read_frame will say so
    with pytest.raises(ProtocolError, match="unknown frame type"):
        await reader.read_frame()


def test_heads_round_trip_and_limit() -> None:
    encoded = protocol.heads(7, b"dir/sub", 66)
    assert Frame(encoded[4]) is Frame.HEADS
    assert protocol.parse_heads(encoded[5:]) == (7, 66, b"dir/sub")
    with pytest.raises(ProtocolError, match="limit"):
        protocol.heads(1, b"d", protocol.MAX_HEAD + 1)
    with pytest.raises(ProtocolError, match="limit"):
        protocol.parse_heads(struct.pack(">IH", 1, protocol.MAX_HEAD + 1) + b"\x00\x01d")


def test_announce_and_check_round_trip_without_duplicates() -> None:
    body = protocol.announce(7, ["a.example:8022", "[2001:db8::1]:8022", "a.example:8022"])[5:]
    assert protocol.parse_announce(body) == (7, ["a.example:8022", "[2001:db8::1]:8022"])
    assert protocol.parse_check(protocol.check(8)[5:]) == (8, [])
    assert protocol.parse_check(protocol.check(9, ["h:1"])[5:]) == (9, ["h:1"])
    # A body that carries more than addresses: the rest is not read (never a key change).
    extra = struct.pack(">I", 3) + b'{"addresses":["h:1"],"public_key":"ssh-ed25519 AAAA"}'
    assert protocol.parse_announce(extra) == (3, ["h:1"])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"addresses":["h:1"', "bad JSON"),
        (b'{"addresses":"h:1"}', "a list"),
        (b'{"addresses":[1]}', "a string"),
        (b'{"addresses":[""]}', "a string"),
        (b'{"addresses":["' + b"h" * 256 + b'"]}', "a string"),
        (
            b'{"addresses":[' + b",".join(b'"h%d:1"' % n for n in range(9)) + b"]}",
            "at most 8",
        ),
        (b'{"addresses":[], "pad":"' + b" " * 4096 + b'"}', "limit 4096"),
    ],
)
def test_announce_refuses_what_breaks_its_limits(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        protocol.parse_announce(struct.pack(">I", 1) + body)
