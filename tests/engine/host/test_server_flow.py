"""How the replication session paces itself: batch flushes, byte budgets, back-pressure.

A live NodeServer on 127.0.0.1, driven frame by frame (``Raw``); the host's disk is made slow
on purpose (a write that waits for the test) to see what the session holds meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
import contextlib
import os
from pathlib import Path
import struct
import threading
import time
from typing import Any

import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.host.upload import Upload
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.protocol import Close, Frame

from ..conftest import ServerFactory, wait_until
from .test_server_attacks import MTIME, Raw, disk_charge, temps

KIB = 1 << 10


def puts(count: int, size: int, first: int = 1, prefix: bytes = b"f") -> list[bytes]:
    return [
        protocol.put(first + n, prefix + b"%04d" % n, MTIME, 0o644, bytes([n % 256]) * size)
        for n in range(count)
    ]


async def acked(raw: Raw, count: int, timeout: float = 10.0) -> set[int]:
    """Collect OK frames until ``count`` requests are acknowledged; return their ids."""
    done: set[int] = set()
    while len(done) < count:
        kind, body = await raw.recv(timeout)
        assert kind is Frame.OK, kind
        done.update(protocol.parse_ok(body))
    return done


@contextlib.contextmanager
def slow_disk(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> Iterator[threading.Event]:
    """Make ``cls.name`` (run in a worker thread) wait until the event is set."""
    gate = threading.Event()
    real = getattr(cls, name)

    def waiting(self: Any, *args: Any) -> Any:
        gate.wait(30)
        return real(self, *args)

    monkeypatch.setattr(cls, name, waiting)
    try:
        yield gate
    finally:
        gate.set()


class Sampler:
    """Samples a figure while the test waits; keeps the highest value seen."""

    def __init__(self, figure: Callable[[], int]) -> None:
        self.figure = figure
        self.high = 0

    async def settle(self, rounds: int = 20) -> int:
        """Sample until the figure has stopped moving; return it."""
        last, same = -1, 0
        while same < rounds:
            await asyncio.sleep(0.01)
            value = self.figure()
            self.high = max(self.high, value)
            same = same + 1 if value == last else 0
            last = value
        return last


def alice_held(server: NodeServer) -> Sampler:
    """Samples what alice's sessions hold of her byte budget."""
    return Sampler(lambda: server.peer_budget("alice").used)


async def stalled_within(server: NodeServer, budget: int) -> Sampler:
    """Wait until alice's sessions stall with ``budget`` spent, and never more; the sampler."""
    held = alice_held(server)
    assert await held.settle() > budget // 2
    assert held.high <= budget
    return held


async def budget_given_back(server: NodeServer) -> None:
    await wait_until(lambda: server.peer_budget("alice").used == 0, "the budget given back")


# --- batch flushes ----------------------------------------------------------------------------


async def three_small_puts(
    make_server: ServerFactory, alice_id: Identity, *, age: float, idle: float
) -> tuple[Raw, float]:
    """Three small PUTs to a server whose batches wait ``age``/``idle`` s; when they were sent."""
    server = await make_server(limits=Limits(free_failures=1000, batch_age=age, batch_idle=idle))
    raw = await Raw.open(server, alice_id)
    sent = time.monotonic()
    raw.send(*puts(3, 100))
    return raw, sent


@pytest.mark.parametrize("age", [0.3, 0.0])
async def test_a_batch_is_acknowledged_once_it_is_old(
    make_server: ServerFactory, alice_id: Identity, age: float
) -> None:
    """A peer that pauses after a few files hears about them after batch_age, not never."""
    raw, started = await three_small_puts(make_server, alice_id, age=age, idle=60)
    assert await acked(raw, 3) == {1, 2, 3}
    assert time.monotonic() - started >= age * 0.8
    await raw.close()


async def test_a_batch_is_acknowledged_when_the_channel_goes_quiet(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    raw, started = await three_small_puts(make_server, alice_id, age=60, idle=0.05)
    assert await acked(raw, 3) == {1, 2, 3}
    assert time.monotonic() - started < 10
    await raw.close()


async def test_a_batch_that_is_young_and_fed_waits_to_grow(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    """Without the timers, a batch is written when full or asked (SYNC): none too early."""
    raw, _ = await three_small_puts(make_server, alice_id, age=60, idle=60)
    with pytest.raises(TimeoutError):
        await raw.recv(timeout=0.5)
    answers = await raw.sync(99)
    assert set(answers) == {1, 2, 3, 99}
    await raw.close()


async def test_frames_in_tiny_pieces_are_read_whole(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Frames cut into 3-byte SSH packets (heads split too) are put back together."""
    raw = await Raw.open(server, alice_id)
    stream = b"".join(puts(5, 300)) + protocol.sync(99)
    for start in range(0, len(stream), 3):
        raw.writer.write(stream[start : start + 3])
    answers = await raw.until_ok(99)
    assert set(answers) == {1, 2, 3, 4, 5, 99}
    assert (storage_dir / "alice" / "f0004").read_bytes() == bytes([4]) * 300
    await raw.close()


# --- byte budgets and back-pressure -------------------------------------------------------------


BUDGET = 256 * KIB


async def budgeted(make_server: ServerFactory, **limits: int) -> NodeServer:
    """A server whose sessions and peers may each hold ``BUDGET`` bytes, failures tolerated."""
    return await make_server(
        limits=Limits(free_failures=1000, session_bytes=BUDGET, peer_bytes=BUDGET, **limits)
    )


async def test_a_session_holds_no_more_than_its_budget_while_the_disk_is_slow(
    make_server: ServerFactory,
    alice_id: Identity,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session stops reading (the peer is held back by SSH flow control), nothing fails."""
    # Batches of 1 MiB: without the budget the session would hold three of them.
    server = await budgeted(make_server, batch_files=64)
    # 8 MiB: more than the budget plus what asyncssh takes in (about two 2 MiB windows).
    frames = puts(500, 16 * KIB)
    with slow_disk(monkeypatch, Jail, "write_batch") as gate:
        raw = await Raw.open(server, alice_id)
        raw.send(*frames)
        held = await stalled_within(server, BUDGET)  # stalled with its budget spent...
        waiting = raw.writer.channel.get_write_buffer_size()
        assert waiting > 1024 * KIB  # ...and the peer's data waits on the peer's side
        gate.set()
        assert await acked(raw, len(frames)) == set(range(1, len(frames) + 1))
    assert held.high <= BUDGET
    assert (storage_dir / "alice" / "f0499").read_bytes() == bytes([499 % 256]) * 16 * KIB
    await raw.close()
    await budget_given_back(server)


async def test_sessions_of_one_peer_share_its_budget(
    make_server: ServerFactory, alice_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = 384 * KIB
    limits = Limits(free_failures=1000, batch_files=64, session_bytes=256 * KIB, peer_bytes=peer)
    server = await make_server(limits=limits)
    with slow_disk(monkeypatch, Jail, "write_batch") as gate:
        first = await Raw.open(server, alice_id)
        second = await Raw.open(server, alice_id, conn=first.conn)
        first.send(*puts(60, 16 * KIB, prefix=b"a"))
        second.send(*puts(60, 16 * KIB, prefix=b"b"))
        await stalled_within(server, peer)
        gate.set()
        assert len(await acked(first, 60)) == len(await acked(second, 60)) == 60
    await first.close()


async def test_an_upload_holds_no_more_than_its_budget(
    make_server: ServerFactory,
    alice_id: Identity,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await budgeted(make_server, upload_group=128 * KIB)
    content = os.urandom(4 << 20)
    with slow_disk(monkeypatch, Upload, "write_many") as gate:
        raw = await Raw.open(server, alice_id)
        raw.send(protocol.open_upload(1, b"big.bin", len(content), MTIME, 0o644))
        kind, _ = await raw.recv()
        assert kind is Frame.OFFSET
        for start in range(0, len(content), 64 * KIB):
            raw.send(protocol.data(1, content[start : start + 64 * KIB]))
        raw.send(protocol.close(1, Close.FINISH))
        await stalled_within(server, BUDGET)
        gate.set()
        assert await acked(raw, 1) == {1}
    assert (storage_dir / "alice" / "big.bin").read_bytes() == content
    await raw.close()


async def test_a_cut_while_the_budget_is_spent_leaves_nothing_held(
    make_server: ServerFactory,
    alice_id: Identity,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await budgeted(make_server, batch_files=4)
    with slow_disk(monkeypatch, Jail, "write_batch") as gate:
        raw = await Raw.open(server, alice_id)
        raw.send(*puts(100, 16 * KIB))
        await alice_held(server).settle()
        raw.conn.abort()
        gate.set()
    await budget_given_back(server)
    jail = server.jail("alice")
    await wait_until(lambda: jail.quota.reserved == 0, "the reservations given back")
    assert temps(storage_dir, "alice") == []
    assert jail.quota.used == disk_charge(storage_dir, "alice")


async def test_a_cut_while_an_upload_is_being_written_waits_for_the_write(
    make_server: ServerFactory,
    alice_id: Identity,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The write running in a worker thread ends before the partial is closed and kept."""
    limits = Limits(free_failures=1000, upload_group=64 * KIB)
    server = await make_server(limits=limits)
    content = os.urandom(1 << 20)
    fds = len(os.listdir("/proc/self/fd"))
    with slow_disk(monkeypatch, Upload, "write_many") as gate:
        raw = await Raw.open(server, alice_id)
        raw.send(protocol.open_upload(1, b"big.bin", len(content), MTIME, 0o644))
        assert (await raw.recv())[0] is Frame.OFFSET
        raw.send(
            *(protocol.data(1, content[n : n + 64 * KIB]) for n in range(0, 512 * KIB, 64 * KIB))
        )
        await alice_held(server).settle()
        raw.conn.abort()
        await asyncio.sleep(0.1)
        gate.set()
    jail = server.jail("alice")
    await budget_given_back(server)
    await wait_until(lambda: jail.quota.reserved == 0, "the upload abandoned")
    (name,) = os.listdir(storage_dir / ".mynas" / "partial" / "alice")
    kept = (storage_dir / ".mynas" / "partial" / "alice" / name).read_bytes()
    assert 0 < len(kept) <= 512 * KIB
    assert content.startswith(kept)  # what was written, in order, nothing else
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2, "the fds closed")


# --- requests on paths, in groups ---------------------------------------------------------------


async def test_requests_on_paths_are_answered_in_groups_and_made_durable(
    server: NodeServer, alice_id: Identity, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MKDIR/UTIME/DELETE already read go to the disk together: one hop, one syncfs."""
    synced = []
    real = Jail.sync

    def spy(self: Jail) -> None:
        synced.append(True)
        real(self)

    monkeypatch.setattr(Jail, "sync", spy)
    raw = await Raw.open(server, alice_id)
    raw.send(*puts(50, 10))
    await raw.sync(999)
    ops = [protocol.delete(100 + n, b"f%04d" % n) for n in range(50)]
    ops += [protocol.mkdir(200 + n, b"d%02d/e" % n, MTIME) for n in range(20)]
    ops += [protocol.utime(300, b"d00", MTIME + 5), protocol.delete(301, b"missing")]
    raw.send(b"".join(ops))
    answers = await raw.until_ok(300)
    oks = {kind for kind, _ in answers.values()}
    assert Frame.OK in oks
    assert fail_code(await raw.recv()) == "missing"  # one failure, the others done
    assert len(synced) < 10  # far fewer than one per request
    assert sorted(os.listdir(storage_dir / "alice")) == [f"d{n:02d}" for n in range(20)]
    assert (storage_dir / "alice" / "d00").stat().st_mtime_ns == MTIME + 5
    await raw.close()


def fail_code(answer: tuple[Frame, bytes]) -> str:
    kind, body = answer
    assert kind is Frame.FAIL
    return str(protocol.parse_fail(body)[1]["code"])


async def test_a_group_whose_sync_fails_is_not_acknowledged(
    server: NodeServer, alice_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_self: Jail) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Jail, "sync", broken)
    raw = await Raw.open(server, alice_id)
    raw.send(protocol.mkdir(1, b"a", None), protocol.mkdir(2, b"b", None))
    codes = {fail_code(await raw.recv()) for _ in range(2)}
    assert codes == {"io"}
    await raw.close()


async def test_a_broken_request_in_a_group_ends_the_session_after_the_others(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    raw = await Raw.open(server, alice_id)
    broken = struct.pack(">IB", 3, Frame.MKDIR) + b"xy"  # too short for its fields
    raw.send(protocol.mkdir(1, b"a", None), protocol.mkdir(2, b"b", None), broken)
    rest = await raw.ended()
    assert rest.startswith(protocol.ok(1, 2))
    assert sorted(os.listdir(storage_dir / "alice")) == ["a", "b"]


async def test_close_waits_for_the_maintenance_under_way(make_server: ServerFactory) -> None:
    """A trash purge running in a thread when the server closes ends before close() returns:
    nothing writes into the storage afterwards (Home Assistant may delete it next)."""
    server = await make_server(limits=Limits(persist_every=0.01, purge_every=0.0))
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    purge = server.space.purge

    def slow_purge(now: float | None = None) -> int:
        started.set()
        release.wait(5)
        freed = purge(now)
        finished.set()
        return freed

    server.space.purge = slow_purge  # type: ignore[method-assign]
    assert await asyncio.to_thread(started.wait, 5)
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.2)
    assert not closing.done()  # still waiting for the purge
    release.set()
    await closing
    assert finished.is_set()
