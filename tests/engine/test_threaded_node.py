"""ThreadedNode: the node on the engine's own thread, driven from the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
import errno
from pathlib import Path
import socket
import threading

import pytest

from custom_components.mynas.engine import FolderConfig, PeerConfig, ThreadedNode
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity

from .conftest import address


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
