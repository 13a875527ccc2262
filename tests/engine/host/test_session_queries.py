"""What encrypted replicas ask of the host: ``stat`` (is a path there?) and ``HEADS``.

A live NodeServer on 127.0.0.1 and the owner's own PeerLink; the jail is filled directly on
disk. Both are announced in WELCOME, so an owner falls back for hosts that lack them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import contextlib
import os
from pathlib import Path

import pytest

from custom_components.mynas.engine import protocol, tree
from custom_components.mynas.engine.errors import HostRefused, MyNasError
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client
from custom_components.mynas.engine.owner.client import PeerLink

from ..conftest import address


@pytest.fixture
async def link(server: NodeServer, alice_id: Identity) -> AsyncIterator[PeerLink]:
    """Alice's link to the server, closed at the end."""
    peer = await client.connect(alice_id, address(server), server.identity.public_line)
    yield peer
    await peer.close()


def _fill(jail: Path) -> None:
    (jail / "F" / "sub").mkdir(parents=True)
    (jail / "F" / "a").write_bytes(b"0123456789")
    (jail / "F" / "empty").write_bytes(b"")
    (jail / "F" / "sub" / "b").write_bytes(b"xy")


async def test_stat_says_what_is_there(link: PeerLink, storage_dir: Path) -> None:
    _fill(storage_dir / "alice")
    assert link.serves("stat")
    assert await link.exists(b"F")
    assert await link.exists(b"F/a")
    assert not await link.exists(b"G")
    for refused in (b"F/a/below-a-file", b"../outside"):
        with pytest.raises(HostRefused):
            await link.exists(refused)
    # The same answers from an older host, which is asked for a listing instead.
    link.welcome["features"].remove("stat")
    assert await link.exists(b"F")
    assert await link.exists(b"F/a")
    assert not await link.exists(b"G")


async def test_a_stat_without_a_hex_path_breaks_the_protocol(link: PeerLink) -> None:
    with pytest.raises(MyNasError):
        await link._request(lambda req: protocol.query(req, {"op": "stat", "path": "zz"}))


async def test_heads_gives_each_file_its_first_bytes(link: PeerLink, storage_dir: Path) -> None:
    _fill(storage_dir / "alice")
    assert link.serves_heads
    async with contextlib.aclosing(link.heads(b"F", 4)) as items:
        got = [(item.path, item.kind, item.size, head) async for item, head in items]
    assert got == [
        (b"F/a", tree.Kind.FILE, 10, b"0123"),
        (b"F/empty", tree.Kind.FILE, 0, None),
        (b"F/sub", tree.Kind.DIR, 0, None),
        (b"F/sub/b", tree.Kind.FILE, 2, b"xy"),
    ]
    async with contextlib.aclosing(link.heads(b"F", 0)) as items:
        assert [head async for _, head in items] == [None, None, None, None]
    with pytest.raises(HostRefused):
        async with contextlib.aclosing(link.heads(b"missing", 4)) as items:
            [_ async for _ in items]
    # A file that shrinks between the listing and its read: the entry says so.
    os.truncate(storage_dir / "alice" / "F" / "a", 2)
    async with contextlib.aclosing(link.heads(b"F", 4)) as items:
        first = await anext(items)
    assert (first[0].size, first[1]) == (2, b"01")
