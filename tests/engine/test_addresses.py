"""Friends who move: announced addresses learned, kept, and dialed after the typed ones.

The address book alone; then two real nodes on loopback (announcements, the order addresses
are tried in, a learned address where another host answers, a restart); then Alice's node in
a network namespace of its own whose address changes, and Bob's next sync that still reaches
her without anybody editing anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
import json
from pathlib import Path
import socket
import time

import pytest

from custom_components.mynas.engine.addresses import (
    ADDRESSES_FILE,
    AddressBook,
    host_addresses,
    own_addresses,
)
from custom_components.mynas.engine.errors import HostKeyMismatch, PeerUnreachable
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity

from .conftest import ServerFactory, address, wait_until
from .friends_support import Friend, files, friend
from .netns_support import Namespaces, in_namespace

# --- the book --------------------------------------------------------------------------------


def test_the_book_orders_typed_then_learned_then_the_hint(tmp_path: Path) -> None:
    book = AddressBook(tmp_path / ADDRESSES_FILE)
    assert book.dial_order("alice", ["a.example:8022"]) == ("a.example:8022",)
    assert book.learn("alice", ["[2001:db8::1]:8022", "a.example:8022"], since=100.0)
    assert not book.learn("alice", ["[2001:db8::1]:8022", "a.example:8022"])
    assert book.hint("alice", "198.51.100.7")
    assert not book.hint("alice", "198.51.100.7")
    assert not book.hint("alice", "?")
    assert book.dial_order("alice", ["a.example:8022", "a.example:8022"]) == (
        "a.example:8022",
        "[2001:db8::1]:8022",
        "198.51.100.7:8022",
    )
    # The hint takes the port of the peer's other addresses (8022 when it has none).
    assert book.dial_order("alice", ["a.example:9000"])[-1] == "198.51.100.7:9000"
    assert book.used("alice", "[2001:db8::1]:8022")
    assert not book.used("alice", "[2001:db8::1]:8022")
    view = book.view("alice", ["a.example:8022"])
    assert view["typed"] == ["a.example:8022"]
    assert view["learned"][0] == {"address": "[2001:db8::1]:8022", "since": 100.0}
    assert view["in_use"]["address"] == "[2001:db8::1]:8022"
    # A learned address announced again keeps its first "since"; a new one gets now.
    assert book.learn("alice", ["[2001:db8::1]:8022", "b.example:8022"])
    learned = {seen.address: seen.since for seen in book.peer("alice").learned}
    assert learned["[2001:db8::1]:8022"] == 100.0
    assert learned["b.example:8022"] > 100.0


def test_the_book_survives_a_restart_and_forgets_removed_peers(tmp_path: Path) -> None:
    path = tmp_path / ".mynas" / ADDRESSES_FILE
    book = AddressBook(path)
    book.learn("alice", ["a.example:8022"], since=5.0)
    book.hint("bob", "2001:db8::2")
    text = book.dump()
    assert text is not None
    assert book.dump() is None  # nothing new since
    book.write(text)
    again = AddressBook(path)
    assert again.dial_order("alice", []) == ("a.example:8022",)
    assert again.dial_order("bob", []) == ("[2001:db8::2]:8022",)
    again.keep_only(["bob"])
    again.write(again.dump() or "")
    assert json.loads(path.read_text())["peers"].keys() == {"bob"}
    path.write_text("{not json")
    assert AddressBook(path).dial_order("bob", []) == ()


def test_host_addresses_are_the_global_stable_ipv6_ones(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "20010020000000010000000000000001 02 40 00 00     eth0\n"  # global, stable
        "20010020000000010000000000000002 02 40 00 01     eth0\n"  # temporary
        "20010020000000010000000000000003 02 40 00 20     eth0\n"  # deprecated
        "fd000000000000000000000000000004 02 40 00 00     eth0\n"  # unique local
        "garbage\n"
        "zz010020000000010000000000000005 02 40 00 00     eth0\n"
    )
    assert host_addresses(8022, str(table)) == ["[2001:20:0:1::1]:8022"]
    assert host_addresses(8022, str(tmp_path / "none")) == []


def test_own_addresses_keep_the_typed_ones_first() -> None:
    assert own_addresses(["Home.Example:8022", "bad"], ["1.2.3.4:8022"], ["home.example:8022"]) == (
        "home.example:8022",
        "1.2.3.4:8022",
    )


# --- two nodes on loopback ---------------------------------------------------------------------


@pytest.fixture
async def friends(tmp_path: Path) -> AsyncIterator[Callable[..., Friend]]:
    """Make friends (started by the test); every node is stopped at the end."""
    made: list[Friend] = []

    def make(name: str, **options: object) -> Friend:
        made.append(friend(tmp_path, name, **options))
        return made[-1]

    yield make
    for one in made:
        await one.node.stop()


async def start_pair(
    alice: Friend, bob: Friend, *, alice_addresses: tuple[str, ...] = ()
) -> tuple[str, str]:
    """Start both on 127.0.0.1 and pair them there; return their addresses."""
    await alice.node.start("127.0.0.1", 0, [], on_event=alice.on_event, addresses=alice_addresses)
    await bob.node.start("127.0.0.1", 0, [], on_event=bob.on_event)
    at_alice = f"127.0.0.1:{(await alice.node.run(_port(alice)))}"
    at_bob = f"127.0.0.1:{(await bob.node.run(_port(bob)))}"
    await alice.node.set_peers([bob.peer_config((at_bob,))])
    await bob.node.set_peers([alice.peer_config((at_alice,))])
    return at_alice, at_bob


async def _port(one: Friend) -> int:
    return one.node._node.server.port


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_a_node_learns_what_its_friend_announces_and_keeps_it(
    friends: Callable[..., Friend],
) -> None:
    alice, bob = friends("alice"), friends("bob")
    await start_pair(alice, bob, alice_addresses=("alice.example:8022",))
    assert alice.node.own_addresses == ("alice.example:8022",)
    result = await alice.node.push(alice.folder, "bob")  # announces on the way
    assert result.files_sent == 1
    # Bob stores what he hears on his own loop: under load, a moment after the push ends.
    stored = ("peer_addresses", {"peer_id": "alice"})
    await wait_until(lambda: stored in bob.events, "Bob storing Alice's announcement")
    view = await bob.node.peer_addresses("alice")
    assert [seen["address"] for seen in view["learned"]] == ["alice.example:8022"]
    assert view["hint"]["address"] == "127.0.0.1"
    # Nothing new: the next link does not announce again.
    assert await alice.node.announce() == {}
    # A new address: every peer hears it at once.
    await alice.node.set_addresses(["alice.example:8022", "[2001:db8::a]:8022"])
    await wait_until(
        lambda: len(bob.events_of("addresses_announced")) == 2, "a second announcement"
    )
    # Bob's node restarts: what it learned is still there.
    await bob.node.stop()
    bob.node = type(bob.node)(bob.identity, bob.storage)
    await bob.node.start("127.0.0.1", 0, [alice.peer_config(("127.0.0.1:9",))])
    view = await bob.node.peer_addresses("alice")
    assert [seen["address"] for seen in view["learned"]] == [
        "alice.example:8022",
        "[2001:db8::a]:8022",
    ]


async def test_learned_addresses_are_tried_after_the_typed_ones(
    friends: Callable[..., Friend],
    make_server: ServerFactory,
    mallory_id: Identity,
    tmp_path: Path,
) -> None:
    alice, bob = friends("alice"), friends("bob", dial_timeout=5.0)
    at_alice, _ = await start_pair(alice, bob)
    other_storage = tmp_path / "mallory-storage"
    other_storage.mkdir()
    mallory: NodeServer = await make_server([], storage=other_storage, identity=mallory_id)
    # Alice says she is at Mallory's address (an old one, taken by someone else) and at her
    # real one; Bob only typed a port where nothing listens.
    await alice.node.set_addresses([address(mallory), at_alice])
    await wait_until(lambda: len(bob.events_of("addresses_announced")) == 1, "the announcement")
    stale = free_address()
    await bob.node.set_peers([alice.peer_config((stale,))])
    # (The hint, 127.0.0.1 with the typed port, is the typed address itself here.)
    assert await bob.node.run(_order(bob)) == (stale, address(mallory), at_alice)
    result = await bob.node.push(bob.folder, "alice")
    assert result.files_sent == 1
    assert files(alice.replica_of(bob)) == {"hello.txt": b"bob's first file\n"}
    view = await bob.node.peer_addresses("alice")
    assert view["in_use"]["address"] == at_alice
    # Another key at a *typed* address is never passed over: it may be an impostor.
    await bob.node.set_peers([alice.peer_config((address(mallory), at_alice))])
    with pytest.raises(HostKeyMismatch):
        await bob.node.push(bob.folder, "alice")


async def _order(one: Friend) -> tuple[str, ...]:
    return one.node._node.dial_order("alice")


async def test_a_peer_nowhere_to_be_found_says_where_it_was_tried(
    friends: Callable[..., Friend],
) -> None:
    alice, bob = friends("alice"), friends("bob", dial_timeout=2.0)
    await start_pair(alice, bob)
    nowhere = free_address()
    await bob.node.set_peers([alice.peer_config((nowhere,))])
    with pytest.raises(PeerUnreachable) as caught:
        await bob.node.push(bob.folder, "alice")
    assert nowhere in str(caught.value)


# --- Alice moves ----------------------------------------------------------------------------------

ALICE_OLD = "2001:20:0:1::a"
ALICE_NEW = "2001:20:0:1::c"
BOB = "2001:20:0:1::b"


async def test_alice_moves_and_bobs_next_sync_still_reaches_her(
    netns: Namespaces,
    tmp_path: Path,
) -> None:
    """Alice's node gets a new address (an ISP renumbering): Bob's next sync finds her.

    ORCHIDv2 addresses (2001:20::/28) are global to Python and routed nowhere in the world;
    here they exist only on the veth pair between the two namespaces.
    """
    ns_alice, ns_bob = netns.add("a"), netns.add("b")
    if_alice, if_bob = netns.link(ns_alice, ns_bob)
    netns.assign(ns_alice, if_alice, f"{ALICE_OLD}/64")
    netns.assign(ns_bob, if_bob, f"{BOB}/64")
    netns.addresses.add(ALICE_NEW)
    alice = friend(tmp_path, "alice", refresh_every=0.2)
    bob = friend(tmp_path, "bob", dial_timeout=3.0)
    in_namespace(alice.node, ns_alice)
    in_namespace(bob.node, ns_bob)
    try:
        # Each types the address the other's invite code carried, once.
        await alice.node.start(
            "", 8022, [bob.peer_config((f"[{BOB}]:8022",))], on_event=alice.on_event
        )
        await bob.node.start(
            "", 8022, [alice.peer_config((f"[{ALICE_OLD}]:8022",))], on_event=bob.on_event
        )
        await wait_until(
            lambda: alice.node.own_addresses == (f"[{ALICE_OLD}]:8022",), "alice's own address"
        )
        assert (await bob.node.push(bob.folder, "alice")).files_sent == 1
        assert (await alice.node.push(alice.folder, "bob")).files_sent == 1
        # Her address changes; nobody edits anything.
        netns.unassign(ns_alice, if_alice, f"{ALICE_OLD}/64")
        netns.assign(ns_alice, if_alice, f"{ALICE_NEW}/64")
        await wait_until(
            lambda: alice.node.own_addresses == (f"[{ALICE_NEW}]:8022",), "alice's new address"
        )

        async def learned() -> list[str]:
            view = await bob.node.peer_addresses("alice")
            return [seen["address"] for seen in view["learned"]]

        deadline = time.monotonic() + 15
        while f"[{ALICE_NEW}]:8022" not in await learned():
            assert time.monotonic() < deadline, "bob never learned alice's new address"
            await asyncio.sleep(0.05)
        # Bob's next daily sync: a new file, to her new address.
        (bob.source / "monday.txt").write_text("new on monday\n")
        result = await bob.node.push(bob.folder, "alice")
        assert result.files_sent == 1
        assert files(alice.replica_of(bob)) == {
            "hello.txt": b"bob's first file\n",
            "monday.txt": b"new on monday\n",
        }
        view = await bob.node.peer_addresses("alice")
        assert view["typed"] == [f"[{ALICE_OLD}]:8022"]  # what the user typed stays
        assert view["in_use"]["address"] == f"[{ALICE_NEW}]:8022"
    finally:
        await alice.node.stop()
        await bob.node.stop()
