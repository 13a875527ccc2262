"""The node-wide bandwidth limits: every push shares the upload one, every restore the download.

Alice's node sends one folder to two friends (two live servers) at once, then brings it back
from both at once: together the runs never pass the node's limit (beyond the one second of
burst a token bucket allows), where per-run limits would let each go at the full rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
import os
from pathlib import Path
import time

import pytest

from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.node import FolderConfig, Node, PeerConfig
from custom_components.mynas.engine.owner.throttle import Throttle

from .conftest import MIB, ServerFactory, address

RATE = 2 * MIB
FILES = 3  # of 1 MiB each, per folder
QUOTA = 64 * MIB


async def _friend(
    make_server: ServerFactory, who: Identity, alice_id: Identity, storage: Path
) -> NodeServer:
    storage.mkdir()
    return await make_server(
        [PeerGrant("alice", alice_id.public_line, QUOTA)], identity=who, storage=storage
    )


def _peer(peer_id: str, server: NodeServer) -> PeerConfig:
    return PeerConfig(
        peer_id, peer_id, peer_id, (address(server),), server.identity.public_line, QUOTA
    )


@pytest.fixture
async def friends(
    make_server: ServerFactory,
    host_id: Identity,
    bob_id: Identity,
    alice_id: Identity,
    tmp_path: Path,
) -> list[PeerConfig]:
    """Two friends' servers that keep alice's folders."""
    carol = await _friend(make_server, host_id, alice_id, tmp_path / "carol-storage")
    bob = await _friend(make_server, bob_id, alice_id, tmp_path / "bob-storage")
    return [_peer("carol", carol), _peer("bob", bob)]


@pytest.fixture
def folder(tmp_path: Path) -> FolderConfig:
    """A folder of FILES random MiB."""
    path = tmp_path / "photos"
    path.mkdir()
    for number in range(FILES):
        (path / f"p{number}.jpg").write_bytes(os.urandom(MIB))
    return FolderConfig("photos", "photos", str(path))


@contextlib.asynccontextmanager
async def _node(
    alice_id: Identity, tmp_path: Path, friends: list[PeerConfig], **limits: int | None
) -> AsyncIterator[Node]:
    storage = tmp_path / "alice-storage"
    storage.mkdir(exist_ok=True)
    node = Node(alice_id, storage, **limits)
    await node.start("127.0.0.1", 0, friends)
    try:
        yield node
    finally:
        await node.stop()


async def _timed_pushes(node: Node, folder: FolderConfig, friends: list[PeerConfig]) -> float:
    started = time.monotonic()
    results = await asyncio.gather(*(node.push(folder, peer.id) for peer in friends))
    elapsed = time.monotonic() - started
    assert [result.bytes_sent for result in results] == [FILES * MIB] * len(friends)
    return elapsed


async def test_two_parallel_pushes_share_the_upload_limit(
    alice_id: Identity, tmp_path: Path, friends: list[PeerConfig], folder: FolderConfig
) -> None:
    """Two friends at once: 6 MiB at 2 MiB/s take at least (6 - 2 of burst) / 2 = 2 s."""
    async with _node(alice_id, tmp_path, friends, upload_limit=RATE) as node:
        elapsed = await _timed_pushes(node, folder, friends)
    total = FILES * MIB * len(friends)
    assert elapsed >= (total - RATE) / RATE * 0.95, elapsed
    # The same limit per run would have let each take its own 2 MiB/s: 0.5 s.
    assert elapsed > ((FILES * MIB - RATE) / RATE) * 3


async def test_without_a_limit_the_same_pushes_are_fast(
    alice_id: Identity, tmp_path: Path, friends: list[PeerConfig], folder: FolderConfig
) -> None:
    """The control: nothing else in the setup makes them slow."""
    async with _node(alice_id, tmp_path, friends) as node:
        elapsed = await _timed_pushes(node, folder, friends)
    assert elapsed < (FILES * MIB * len(friends) - RATE) / RATE * 0.9, elapsed


async def test_two_parallel_restores_share_the_download_limit(
    alice_id: Identity, tmp_path: Path, friends: list[PeerConfig], folder: FolderConfig
) -> None:
    """Back from both friends at once, under a download limit the pushes did not have."""
    async with _node(alice_id, tmp_path, friends, download_limit=RATE) as node:
        await _timed_pushes(node, folder, friends)  # no upload limit: quick
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                node.restore(folder.name, peer.id, str(tmp_path / f"back-from-{peer.id}"))
                for peer in friends
            )
        )
        elapsed = time.monotonic() - started
    assert [result.bytes for result in results] == [FILES * MIB] * len(friends)
    for peer in friends:
        for number in range(FILES):
            name = f"p{number}.jpg"
            restored = tmp_path / f"back-from-{peer.id}" / name
            assert restored.read_bytes() == (Path(folder.path) / name).read_bytes()
    total = FILES * MIB * len(friends)
    assert elapsed >= (total - RATE) / RATE * 0.95, elapsed


@pytest.mark.parametrize(("own", "node"), [(MIB, 4 * MIB), (4 * MIB, MIB), (None, MIB)])
async def test_a_run_waits_for_its_own_limit_and_the_node_s(own: int | None, node: int) -> None:
    """The lower of a run's own limit and the node's holds: 3 MiB at 1 MiB/s, 1 s of burst."""
    throttle = Throttle(own, Throttle(node))
    started = time.monotonic()
    for _ in range(6):
        await throttle.consume(MIB // 2)
    assert time.monotonic() - started >= 1.9
