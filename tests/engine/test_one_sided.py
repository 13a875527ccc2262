"""One-sided pairs: Alice cannot accept connections, yet both folders are backed up.

Behind carrier-grade NAT (a router namespace that lets nothing in), Alice's node keeps a
connection open to Bob's; Bob's pushes, verifies and restores to her run over channels
inside it. Then the same on loopback, where the details can be poked at: stale channels,
turning it off, the reader that puts bytes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
import socket
import time

import pytest

from custom_components.mynas.engine.errors import PeerUnreachable
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.node import Inbound
from custom_components.mynas.engine.reachability import Cause
from custom_components.mynas.engine.reverse import Prefixed

from .friends_support import Friend, files, friend
from .netns_support import PORT, WAN_FRIEND, WAN_ROUTER, Home, Namespaces, in_namespace

PUBLIC = f"{WAN_ROUTER}:{PORT}"


async def _has_reverse(one: Friend, jail: str) -> bool:
    return one.node._node.server.has_reverse(jail)


async def _waiting(one: Friend, jail: str) -> int:
    return one.node._node.server.reverse_waiting(jail)


async def wait_for_channels(one: Friend, jail: str, count: int = 2, timeout: float = 20) -> None:
    """Until ``jail``'s peer holds ``count`` idle reverse channels at ``one``'s server."""
    deadline = time.monotonic() + timeout
    while await one.node.run(_waiting(one, jail)) < count:
        assert time.monotonic() < deadline, f"{jail} never kept its channels at {one.name}'s"
        await asyncio.sleep(0.05)


async def test_behind_cgnat_both_folders_are_still_backed_up(
    netns: Namespaces, tmp_path: Path
) -> None:
    home = Home(netns)
    home.no_inbound()
    alice = friend(tmp_path, "alice")
    bob = friend(tmp_path, "bob", limits=Limits(check_every=0.0, check_timeout=2.0),
                 dial_timeout=2.0)  # fmt: skip
    in_namespace(alice.node, home.home)
    in_namespace(bob.node, home.friend)
    try:
        await alice.node.start(
            "", PORT, [bob.peer_config((f"{WAN_FRIEND}:{PORT}",))], addresses=(PUBLIC,)
        )
        await bob.node.start("", PORT, [alice.peer_config((PUBLIC,))])
        # Bob cannot reach her: not even a "refused" comes back.
        with pytest.raises(PeerUnreachable):
            await bob.node.push(bob.folder, "alice")
        # Her check says why; from then on she keeps a connection open to Bob.
        report = await alice.node.check_reachability()
        assert report.cause is Cause.NO_INBOUND
        await wait_for_channels(bob, "alice")
        assert await alice.node.kept_connections() == {"bob": f"{WAN_FRIEND}:{PORT}"}

        # Bob's folder is backed up at Alice's...
        assert (await bob.node.push(bob.folder, "alice")).files_sent == 1
        assert files(alice.replica_of(bob)) == files(bob.source)
        view = await bob.node.peer_addresses("alice")
        assert view["in_use"]["address"] == f"{WAN_ROUTER} (its connection to us)"
        # ...and Alice's at Bob's, as before (she can connect out).
        assert (await alice.node.push(alice.folder, "bob")).files_sent == 1
        assert files(bob.replica_of(alice)) == files(alice.source)
        # Verify and restore work both ways.
        assert (await bob.node.verify(bob.folder, "alice")).clean
        restored = tmp_path / "bob-restored"
        result = await bob.node.restore(bob.folder.name, "alice", str(restored))
        assert result.files == 1
        assert files(restored) == files(bob.source)
        # One transfer after another: a fresh idle channel is always there.
        (bob.source / "tuesday.txt").write_text("more\n")
        assert (await bob.node.push(bob.folder, "alice")).files_sent == 1
        assert (await bob.node.probe("alice")).status == "online"
    finally:
        await alice.node.stop()
        await bob.node.stop()


def closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def start_pair(alice: Friend, bob: Friend, alice_typed: str) -> str:
    """Alice and Bob on loopback; Bob knows Alice only at ``alice_typed``."""
    await alice.node.start("127.0.0.1", 0, [])
    await bob.node.start("127.0.0.1", 0, [])
    at_bob = f"127.0.0.1:{await bob.node.run(_port(bob))}"
    await alice.node.set_peers([bob.peer_config((at_bob,))])
    await bob.node.set_peers([alice.peer_config((alice_typed,))])
    return at_bob


async def _port(one: Friend) -> int:
    return one.node._node.server.port


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Friend, Friend]]:
    alice = friend(tmp_path, "alice")
    bob = friend(tmp_path, "bob", dial_timeout=2.0)
    yield alice, bob
    await alice.node.stop()
    await bob.node.stop()


@pytest.fixture
async def kept_open(pair: tuple[Friend, Friend]) -> tuple[Friend, Friend]:
    """Alice, whom Bob cannot dial, told she takes no connections: Bob holds her channels."""
    alice, bob = pair
    await start_pair(alice, bob, closed_address())
    await alice.node.set_inbound(Inbound.NO)
    await wait_for_channels(bob, "alice")
    return alice, bob


async def test_a_node_told_it_takes_no_connections_keeps_one_open(
    kept_open: tuple[Friend, Friend],
) -> None:
    alice, bob = kept_open
    assert (await bob.node.push(bob.folder, "alice")).files_sent == 1
    assert files(alice.replica_of(bob)) == files(bob.source)
    # Told it takes connections after all: it lets go, and Bob finds nothing to dial.
    await alice.node.set_inbound(Inbound.YES)
    deadline = time.monotonic() + 10
    while await bob.node.run(_has_reverse(bob, "alice")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises(PeerUnreachable):
        await bob.node.push(bob.folder, "alice")


async def test_stale_channels_are_passed_over_and_limits_hold(
    kept_open: tuple[Friend, Friend],
) -> None:
    _, bob = kept_open

    async def close_one_idle_channel() -> None:
        server = bob.node._node.server
        slot = await server.take_reverse("alice")
        assert slot is not None
        slot.writer.close()

    await bob.node.run(close_one_idle_channel())
    # A new one replaces it only once Alice sees hers closed; a push meanwhile still works.
    assert (await bob.node.push(bob.folder, "alice")).files_sent == 1


async def test_take_reverse_waits_for_a_channel_then_gives_up(
    pair: tuple[Friend, Friend],
) -> None:
    alice, bob = pair
    await start_pair(alice, bob, closed_address())

    async def take(wait: float) -> object:
        return await bob.node._node.server.take_reverse("alice", wait=wait)

    assert await bob.node.run(take(0.0)) is None
    started = time.monotonic()
    assert await bob.node.run(take(0.3)) is None
    assert time.monotonic() - started >= 0.25


async def test_prefixed_reader_gives_back_what_was_read_first() -> None:
    class Rest:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def read(self, n: int = -1) -> bytes:
            out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
            return out

        async def readexactly(self, n: int) -> bytes:
            if len(self.data) < n:
                raise asyncio.IncompleteReadError(self.data, n)
            return await self.read(n)

    reader = Prefixed(b"abc", Rest(b"defgh"))  # type: ignore[arg-type]
    assert await reader.read(2) == b"ab"
    assert await reader.readexactly(3) == b"cde"
    assert await reader.read() == b"fgh"
    reader = Prefixed(b"ab", Rest(b"c"))  # type: ignore[arg-type]
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        await reader.readexactly(5)
    assert caught.value.partial == b"abc"
    assert await Prefixed(b"xy", Rest(b"")).readexactly(2) == b"xy"  # type: ignore[arg-type]
