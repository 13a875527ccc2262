"""ANNOUNCE and CHECK on a live host: addresses only from the pinned peer, checks that cannot scan.

A real NodeServer on 127.0.0.1; the peer talks through the owner's ``PeerLink`` (or frame by
frame with ``Raw``); the addresses it asks the host to dial are real listeners on loopback:
the peer's own server, another node's, a port nothing listens on, something that is not SSH.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
from pathlib import Path
import socket
import struct

import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.errors import AuthRefused, HostRefused, PeerUnreachable
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client
from custom_components.mynas.engine.protocol import Frame
from custom_components.mynas.engine.reachability import (
    AddressCheck,
    Cause,
    Outcome,
    diagnose,
    dial_check,
)

from ..conftest import DEFAULT_QUOTA, ServerFactory, address
from .test_server_attacks import Events, Raw, raw_frame

QUICK = Limits(check_every=0.0, check_timeout=2.0, free_failures=1000)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def not_ssh() -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP service that answers like a web server's admin page, and counts connections."""
    seen: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()
        await server.wait_closed()


async def alice_node(
    make_server: ServerFactory, tmp_path: Path, host_id: Identity, alice_id: Identity
) -> NodeServer:
    """Alice's own node, which knows the host as its peer (so a dial back can log in)."""
    storage = tmp_path / "alice-storage"
    storage.mkdir()
    return await make_server(
        [PeerGrant("host", host_id.public_line, DEFAULT_QUOTA)],
        storage=storage,
        identity=alice_id,
    )


async def test_welcome_lists_what_the_host_serves(server: NodeServer, alice_id: Identity) -> None:
    async with await client.connect(alice_id, address(server), server.identity.public_line) as link:
        assert link.serves("announce")
        assert link.serves("check")
        assert not link.serves("teleport")


async def test_an_announce_is_kept_for_its_peer_only_as_addresses(
    make_server: ServerFactory, alice_id: Identity, bob_id: Identity, mallory_id: Identity
) -> None:
    events = Events()
    server = await make_server(on_event=events)
    key = server.identity.public_line
    async with await client.connect(alice_id, address(server), key) as link:
        await link.announce(["Alice.Example:8022", "[2001:DB8::1]:8022", "alice.example:8022"])
    record = server.reach.announced["alice"]
    assert record.addresses == ("alice.example:8022", "[2001:db8::1]:8022")
    assert "bob" not in server.reach.announced
    announced = [data for kind, data in events.seen if kind == "addresses_announced"]
    assert announced == [
        {"peer": "alice", "addresses": list(record.addresses), "since": record.since}
    ]
    since = record.since
    # The same set again: nothing new to tell, "since" stays.
    async with await client.connect(alice_id, address(server), key) as link:
        await link.announce(["alice.example:8022", "[2001:db8::1]:8022"])
    assert server.reach.announced["alice"].since == since
    assert events.count("addresses_announced") == 1
    # Whatever else a body carries changes no key: Mallory's key still gets nowhere.
    raw = await Raw.open(server, alice_id)
    body = b'{"addresses":["h.example:1"],"public_key":"%s"}' % mallory_id.public_line.encode()
    raw.send(raw_frame(Frame.ANNOUNCE, struct.pack(">I", 5) + body))
    answers = await raw.until_ok(5)
    assert answers[5][0] is Frame.OK
    raw.conn.close()
    assert server.reach.announced["alice"].addresses == ("h.example:1",)
    with pytest.raises(AuthRefused):
        await client.connect(mallory_id, address(server), key)
    async with await client.connect(alice_id, address(server), key) as link:
        assert link.welcome["peer"] == "alice"
    async with await client.connect(bob_id, address(server), key) as link:
        assert link.welcome["peer"] == "bob"


async def test_a_bad_address_is_refused_and_a_bad_list_ends_the_session(
    server: NodeServer, alice_id: Identity
) -> None:
    key = server.identity.public_line
    async with await client.connect(alice_id, address(server), key) as link:
        with pytest.raises(HostRefused, match="no port") as caught:
            await link.announce(["alice.example"])
        assert caught.value.code == "invalid"
        await link.announce(["alice.example:8022"])  # the session goes on
    assert server.reach.announced["alice"].addresses == ("alice.example:8022",)
    raw = await Raw.open(server, alice_id)
    too_many = [f"h{n}.example:1" for n in range(protocol.MAX_ANNOUNCED + 1)]
    raw.send(
        raw_frame(
            Frame.ANNOUNCE,
            struct.pack(">I", 1) + b'{"addresses":%s}' % (str(too_many).replace("'", '"').encode()),
        )
    )
    with pytest.raises(asyncio.IncompleteReadError):
        await raw.recv()
    raw.conn.close()
    assert server.reach.announced["alice"].addresses == ("alice.example:8022",)


async def test_a_check_dials_back_each_announced_address_and_says_what_answered(
    make_server: ServerFactory,
    tmp_path: Path,
    host_id: Identity,
    alice_id: Identity,
    mallory_id: Identity,
) -> None:
    server = await make_server(limits=QUICK)
    alice = await alice_node(make_server, tmp_path, host_id, alice_id)
    other_storage = tmp_path / "other"
    other_storage.mkdir()
    other = await make_server([], storage=other_storage, identity=mallory_id)
    closed = f"127.0.0.1:{free_port()}"
    async with not_ssh() as (web, _):
        mine = [address(alice), address(other), closed, web]
        async with await client.connect(alice_id, address(server), host_id.public_line) as link:
            await link.announce(mine)
            answer = await link.check()
    found = {item["address"]: AddressCheck.from_dict(item) for item in answer["results"]}
    assert [item["address"] for item in answer["results"]] == mine
    assert found[address(alice)].outcome is Outcome.OURS
    assert found[address(alice)].detail == "our key answered"
    assert found[address(other)].outcome is Outcome.OTHER_KEY
    assert mallory_id.fingerprint in found[address(other)].detail
    assert found[closed].outcome is Outcome.REFUSED
    assert found[web].outcome is Outcome.NOT_SSH
    assert answer["seen_from"] == "127.0.0.1"
    assert diagnose(found.values()) is Cause.REACHABLE
    # The dial back logged in as the host: alice's node saw its peer, not a failed login.
    assert alice.peer_state["host"].last_seen is not None


async def test_a_check_dials_nothing_the_peer_did_not_announce(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    server = await make_server(limits=QUICK)
    async with not_ssh() as (web, seen):
        async with await client.connect(
            alice_id, address(server), server.identity.public_line
        ) as link:
            await link.announce(["127.0.0.1:9"])
            answer = await link.check([web, "127.0.0.1:9"])
        await asyncio.sleep(0.1)
        assert seen == []  # never dialed
    outcomes = {item["address"]: item["outcome"] for item in answer["results"]}
    assert outcomes[web] == "skipped"
    assert outcomes["127.0.0.1:9"] == "refused"


async def test_a_check_dials_at_most_a_few_addresses(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    server = await make_server(limits=QUICK)
    ports = [free_port() for _ in range(protocol.MAX_CHECKED + 2)]
    mine = [f"127.0.0.1:{port}" for port in ports]
    async with await client.connect(alice_id, address(server), server.identity.public_line) as link:
        await link.announce(mine)
        answer = await link.check()
    outcomes = [item["outcome"] for item in answer["results"]]
    assert outcomes == ["refused"] * protocol.MAX_CHECKED + ["skipped"] * 2


async def test_checks_are_rate_limited_per_peer(
    make_server: ServerFactory, alice_id: Identity, bob_id: Identity
) -> None:
    server = await make_server(limits=Limits(check_every=600.0, check_timeout=1.0))
    key = server.identity.public_line
    async with await client.connect(alice_id, address(server), key) as link:
        await link.announce([f"127.0.0.1:{free_port()}"])
        await link.check()
        with pytest.raises(HostRefused, match="retry in") as caught:
            await link.check()
        assert caught.value.code == "busy"
    # Another peer has its own allowance.
    async with await client.connect(bob_id, address(server), key) as link:
        answer = await link.check()
    assert answer["results"] == []


async def test_a_removed_peer_is_forgotten(
    server: NodeServer, alice_id: Identity, bob_id: Identity
) -> None:
    async with await client.connect(alice_id, address(server), server.identity.public_line) as link:
        await link.announce(["alice.example:8022"])
    await server.set_peers([PeerGrant("bob", bob_id.public_line, DEFAULT_QUOTA)])
    assert "alice" not in server.reach.announced


async def test_dial_check_outcomes_without_a_host(alice_id: Identity) -> None:
    key = alice_id.public_line
    assert (await dial_check("no port", key)).outcome is Outcome.UNREACHABLE
    # (Names are not resolved in tests: the plugin blocks DNS.)


async def test_dial_check_without_a_login_still_knows_the_key(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    server = await make_server()  # our host key; no login offered at all
    check = await dial_check(address(server), server.identity.public_line)
    assert check == AddressCheck(address(server), Outcome.OURS, "our key answered (login refused)")
    assert (await dial_check(address(server), alice_id.public_line)).outcome is Outcome.OTHER_KEY


def test_diagnose_names_the_most_useful_cause() -> None:
    def causes(*outcomes: Outcome) -> Cause:
        return diagnose(AddressCheck(f"h:{n}", outcome) for n, outcome in enumerate(outcomes))

    assert causes() is Cause.NO_ADDRESS
    assert causes(Outcome.SKIPPED) is Cause.UNKNOWN
    assert causes(Outcome.TIMEOUT, Outcome.OURS) is Cause.REACHABLE
    assert causes(Outcome.REFUSED, Outcome.OTHER_KEY) is Cause.OTHER_HOST
    assert causes(Outcome.NOT_SSH) is Cause.OTHER_HOST
    assert causes(Outcome.TIMEOUT, Outcome.REFUSED) is Cause.PORT_CLOSED
    assert causes(Outcome.TIMEOUT, Outcome.UNREACHABLE) is Cause.NO_INBOUND
    assert AddressCheck.from_dict("nonsense").outcome is Outcome.SKIPPED
    assert AddressCheck.from_dict({"address": "h:1", "outcome": "new"}).outcome is Outcome.SKIPPED


async def test_an_unreachable_peer_is_still_an_error_for_a_link(alice_id: Identity) -> None:
    with pytest.raises(PeerUnreachable):
        await client.connect(alice_id, f"127.0.0.1:{free_port()}", alice_id.public_line)
