"""ThreadedNode: the node on the engine's own thread, driven from the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
import errno
import os
from pathlib import Path
import random
import socket
import threading

import pytest

from custom_components.mynas.engine import (
    BackupMissing,
    FolderConfig,
    NewBackup,
    PeerConfig,
    QuotaExceeded,
    StoredBackup,
    ThreadedNode,
)
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import sealed
from custom_components.mynas.engine.owner.backup_area import OpenStream, SealedArea
from custom_components.mynas.engine.owner.keys import DataKeys

from .conftest import ServerFactory, address


def _engine_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "mynas-engine"]


@pytest.fixture
async def node(alice_id: Identity, storage_dir: Path) -> AsyncIterator[ThreadedNode]:
    running = ThreadedNode(alice_id, storage_dir)
    yield running
    await running.stop()


async def test_start_and_stop_the_thread_with_the_node(node: ThreadedNode) -> None:
    await node.start("127.0.0.1", 0, [])
    assert node.engine.running
    assert _engine_threads()
    assert await node.known_pairs() == []
    assert await node.hosted() == {}
    await node.stop()
    await node.stop()  # idempotent
    assert not node.engine.running
    assert _engine_threads() == []


async def test_a_failed_start_stops_the_thread(node: ThreadedNode) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError) as err:
            await node.start("127.0.0.1", taken.getsockname()[1], [])
    assert err.value.errno == errno.EADDRINUSE
    assert not node.engine.running
    assert _engine_threads() == []


async def test_methods_run_on_the_engine_thread(node: ThreadedNode) -> None:
    await node.start("127.0.0.1", 0, [])
    where = await node.run(_thread_name())
    assert where == "mynas-engine"
    assert threading.current_thread().name != where


async def _thread_name() -> str:
    return threading.current_thread().name


@dataclass
class _Report:
    done: int


async def test_relay_runs_on_the_caller_loop_with_copies(node: ThreadedNode) -> None:
    """The engine updates what it reports in place: each call hands over a copy."""
    await node.start("127.0.0.1", 0, [])
    got: list[tuple[str, int]] = []
    relayed = node.relay(lambda report: got.append((threading.current_thread().name, report.done)))

    async def report_twice() -> None:
        report = _Report(1)
        relayed(report)
        report.done = 2
        relayed(report)

    await node.run(report_twice())
    await asyncio.sleep(0)
    assert got == [(threading.current_thread().name, 1), (threading.current_thread().name, 2)]


async def test_stop_waits_for_cancelled_work_to_unwind(node: ThreadedNode) -> None:
    await node.start("127.0.0.1", 0, [])
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    unwound: list[str] = []

    async def slow_to_cancel() -> None:
        loop.call_soon_threadsafe(started.set)
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.1)  # e.g. the index writes of a cancelled push
            unwound.append("done")

    waiting = asyncio.ensure_future(node.run(slow_to_cancel()))
    await started.wait()
    await node.stop()
    assert unwound == ["done"]
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_folder_pushed_plain_then_converted_through_the_node(
    alice_id: Identity, server: NodeServer, tmp_path: Path
) -> None:
    """What Home Assistant drives: a plain folder (as set up before), then its conversion."""
    (tmp_path / "alice-root").mkdir()
    node = ThreadedNode(alice_id, tmp_path / "alice-root")
    try:
        await _convert_through(node, server, tmp_path)
    finally:
        await node.stop()


async def _convert_through(node: ThreadedNode, server: NodeServer, tmp_path: Path) -> None:
    source = tmp_path / "Photos"
    source.mkdir()
    (source / "beach.jpg").write_bytes(b"JPEG")
    peer = PeerConfig(
        "host", "Host", "host", (address(server),), server.identity.public_line, 1 << 20
    )
    await node.start("127.0.0.1", 0, [peer])
    folder = FolderConfig("f1", "Photos", str(source))
    pushed = await node.push(folder, "host")
    assert pushed.files_sent == 1
    converted = await node.convert(replace(folder, encrypted=True), "host")
    assert (converted.files_sent, converted.replaced_plain) == (1, True)
    again = await node.push(replace(folder, encrypted=True), "host")
    assert again.files_sent == 0
    restored = await node.restore("Photos", "host", str(tmp_path / "back"))
    assert (restored.files, restored.failed) == (1, 0)
    assert (tmp_path / "back" / "beach.jpg").read_bytes() == b"JPEG"


# --- backups: streams across the thread hop --------------------------------------------


def _peer(server: NodeServer) -> PeerConfig:
    return PeerConfig(
        id="host",
        name="Host",
        jail="host",
        addresses=(address(server),),
        public_key=server.identity.public_line,
        quota=0,
    )


@pytest.fixture
async def alice(alice_id: Identity, tmp_path: Path) -> AsyncIterator[ThreadedNode]:
    """Alice's node, on a storage root of its own (the host's is ``storage_dir``)."""
    root = tmp_path / "alice-root"
    root.mkdir()
    running = ThreadedNode(alice_id, root)
    yield running
    await running.stop()


@pytest.fixture
async def paired(alice: ThreadedNode, server: NodeServer) -> ThreadedNode:
    await alice.start("127.0.0.1", 0, [_peer(server)])
    return alice


def _chunks_on(loop_names: list[str], data: bytes, size: int = 100_000) -> OpenStream:
    """An ``open_stream`` that notes the thread each chunk is read on."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            loop_names.append(threading.current_thread().name)
            yield data[start : start + size]

    async def open_stream() -> AsyncIterator[bytes]:
        return chunks()

    return open_stream


async def test_a_backup_goes_up_and_comes_down_across_the_hop(
    paired: ThreadedNode, storage_dir: Path, alice_id: Identity
) -> None:
    data = random.Random(7).randbytes(2_500_000)
    read_on: list[str] = []
    reports: list[tuple[str, int]] = []
    stored = await paired.upload_backup(
        "host",
        NewBackup("b1", {"name": "one"}, len(data), _chunks_on(read_on, data)),
        progress=lambda sent: reports.append((threading.current_thread().name, sent)),
    )
    here = threading.current_thread().name
    assert stored == StoredBackup("b1", len(data), {"name": "one"})
    assert set(read_on) == {here}  # the caller's stream is read on the caller's loop
    await asyncio.sleep(0)
    assert reports
    assert {name for name, _ in reports} == {here}
    assert reports[-1][1] == len(data)
    area = SealedArea(DataKeys.of(alice_id))
    on_host = (storage_dir / "alice" / os.fsdecode(area.stored(b"b1.tar"))).read_bytes()
    assert (
        sealed.open_sealed(DataKeys.of(alice_id).contents, area.jail_path(b"b1.tar"), on_host)[1]
        == data
    )
    assert await paired.list_backups("host") == [stored]
    assert await paired.get_backup("host", "b1") == stored
    chunks = await paired.download_backup("host", "b1")
    assert b"".join([chunk async for chunk in chunks]) == data
    await paired.delete_backup("host", "b1")
    assert await paired.list_backups("host") == []
    with pytest.raises(BackupMissing):
        await paired.download_backup("host", "b1")


async def test_the_stream_s_own_error_comes_back_as_it_is(paired: ThreadedNode) -> None:
    class Broken(Exception):
        pass

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise Broken("reading the archive failed")

    async def open_stream() -> AsyncIterator[bytes]:
        return chunks()

    with pytest.raises(Broken):
        await paired.upload_backup("host", NewBackup("b2", {}, 5000, open_stream))
    assert await paired.list_backups("host") == []


async def test_an_upload_refused_never_opens_the_stream(
    alice: ThreadedNode, make_server: ServerFactory, alice_id: Identity
) -> None:
    server = await make_server([PeerGrant("alice", alice_id.public_line, 1 << 20)])
    await alice.start("127.0.0.1", 0, [_peer(server)])
    node = alice
    opened: list[bool] = []

    async def open_stream() -> AsyncIterator[bytes]:
        opened.append(True)
        raise AssertionError("never opened")

    with pytest.raises(QuotaExceeded):
        await node.upload_backup("host", NewBackup("b3", {}, 5 << 20, open_stream))
    assert opened == []


async def test_stop_closes_a_download_left_open(paired: ThreadedNode, server: NodeServer) -> None:
    data = b"y" * (3 << 20)
    await paired.upload_backup("host", NewBackup("b4", {}, len(data), _chunks_on([], data)))
    chunks = await paired.download_backup("host", "b4")
    assert await anext(chunks)
    assert server.peer_state["alice"].connections == 1
    await paired.stop()
    for _ in range(100):
        if server.peer_state["alice"].connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.peer_state["alice"].connections == 0
    await chunks.aclose()  # after stop: nothing left to close, no error


async def test_backups_of_an_unknown_peer(paired: ThreadedNode) -> None:
    with pytest.raises(KeyError):
        await paired.download_backup("nobody", "b5")
    with pytest.raises(KeyError):
        await paired.list_backups("nobody")
