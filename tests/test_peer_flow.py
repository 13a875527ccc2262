"""Pairing a peer: the invite code, the confirmation, the connection test, reconfigure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from homeassistant.config_entries import ConfigEntryState, ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import our_invite, peer_flow
from custom_components.mynas.const import (
    CONF_ADDRESSES,
    CONF_INVITE,
    CONF_JAIL,
    CONF_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    CONF_QUOTA_GB,
    GB,
    SUBENTRY_PEER,
)
from custom_components.mynas.engine import identity, invite, node as engine_node
from custom_components.mynas.engine.host.server import PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner.run import PeerTarget
from custom_components.mynas.engine.storage_root import INTERNAL_DIR

from .conftest import setup_entry
from .flow_support import assert_translated, invite_code, node_server

PEER = ("config_subentries", "peer")


@pytest.fixture
def make_key(tmp_path: Path) -> Callable[[str], Identity]:
    """Keys of other nodes, by name."""

    def make(name: str) -> Identity:
        key, _ = identity.load_or_create(tmp_path / "keys" / f"{name}.key")
        return key

    return make


async def _start(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, Any]:
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, SUBENTRY_PEER), context={"source": "user"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}
    assert_translated(result, *PEER)
    return result


async def _paste(hass: HomeAssistant, entry: MockConfigEntry, code: str) -> dict[str, Any]:
    result = await _start(hass, entry)
    return await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_INVITE: code}
    )


async def _grant(hass: HomeAssistant, flow_id: str, quota_gb: int) -> dict[str, Any]:
    """Submit the quota; when a connection test runs, wait for it to end."""
    result = await hass.config_entries.subentries.async_configure(
        flow_id, {CONF_QUOTA_GB: quota_gb}
    )
    if result["type"] is FlowResultType.SHOW_PROGRESS:
        assert result["step_id"] == "test"
        assert_translated(result, *PEER)
        await hass.async_block_till_done()
        result = await hass.config_entries.subentries.async_configure(flow_id)
    return result


def _peer_subentries(entry: MockConfigEntry) -> list[ConfigSubentry]:
    return [sub for sub in entry.subentries.values() if sub.subentry_type == SUBENTRY_PEER]


def _add_peer(
    hass: HomeAssistant, entry: MockConfigEntry, key: Identity, addresses: list[str], jail: str
) -> ConfigSubentry:
    subentry = ConfigSubentry(
        data=MappingProxyType(
            {
                CONF_NAME: jail,
                CONF_JAIL: jail,
                CONF_ADDRESSES: addresses,
                CONF_PUBLIC_KEY: key.public_line,
                CONF_QUOTA: 7 * GB,
            }
        ),
        subentry_type=SUBENTRY_PEER,
        title=jail,
        unique_id=key.fingerprint,
    )
    hass.config_entries.async_add_subentry(entry, subentry)
    return subentry


# --- pasting the code ----------------------------------------------------------------------


async def test_pair_while_node_not_loaded(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key
) -> None:
    """The node is not running (disk away?): no test, the peer is created at once."""
    bob = make_key("bob")
    code = invite_code("Bob", ["bob.example:9100", "[2001:db8::7]:9100"], bob.public_line)
    result = await _paste(hass, node_entry, f"  {code[:30]}\n{code[30:]}  ")  # wrapped by chat
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "confirm"
    assert_translated(result, *PEER)
    placeholders = result["description_placeholders"]
    assert placeholders["name"] == "Bob"
    assert placeholders["addresses"] == "bob.example:9100, [2001:db8::7]:9100"
    assert placeholders["fingerprint"] == bob.fingerprint
    # Our own code, to send back, names us with our key.
    ours = invite.decode(placeholders["our_code"])
    assert ours.name == "Alice"
    assert ours.public_key == node_entry.data[CONF_NODE_PUBLIC_KEY]
    assert result["data_schema"]({})[CONF_QUOTA_GB] == peer_flow.DEFAULT_QUOTA_GB

    result = await _grant(hass, result["flow_id"], 5)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Bob"
    assert result["unique_id"] == bob.fingerprint
    assert result["data"] == {
        CONF_NAME: "Bob",
        CONF_JAIL: "Bob",
        CONF_ADDRESSES: ["bob.example:9100", "[2001:db8::7]:9100"],
        CONF_PUBLIC_KEY: bob.public_line,
        CONF_QUOTA: 5 * GB,
    }
    (subentry,) = _peer_subentries(node_entry)
    assert subentry.unique_id == bob.fingerprint
    assert subentry.data[CONF_QUOTA] == 5_000_000_000


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("hello, here is my code", invite.NOT_AN_INVITE),
        ("mynas2:abcdefghijklmnopqrstuvwxyz", invite.NEWER_VERSION),
        ("TRUNCATE", invite.DAMAGED),
        ("", invite.NOT_AN_INVITE),
    ],
)
async def test_invalid_code_says_why_and_recovers(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key, code: str, reason: str
) -> None:
    bob = make_key("bob")
    good = invite_code("Bob", ["127.0.0.1:9"], bob.public_line)
    if code == "TRUNCATE":
        code = good[:-4]
    result = await _start(hass, node_entry)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_INVITE: code}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_INVITE: "invalid_invite"}
    assert result["description_placeholders"]["reason"] == reason
    assert_translated(result, *PEER)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_INVITE: good}
    )
    assert result["step_id"] == "confirm"


async def test_our_own_code_is_refused(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    ours = our_invite.our_code(hass, dict(node_entry.data), {})
    result = await _paste(hass, node_entry, ours)
    assert result["errors"] == {CONF_INVITE: "own_invite"}
    assert_translated(result, *PEER)
    # Our key under another name and address is still us.
    disguised = invite_code("Mallory", ["10.9.9.9:1"], node_entry.data[CONF_NODE_PUBLIC_KEY])
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_INVITE: disguised}
    )
    assert result["errors"] == {CONF_INVITE: "own_invite"}
    assert not _peer_subentries(node_entry)


async def test_duplicate_peer_aborts(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key
) -> None:
    bob = make_key("bob")
    result = await _paste(hass, node_entry, invite_code("Bob", ["10.0.0.2:9100"], bob.public_line))
    result = await _grant(hass, result["flow_id"], 1)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    # The same key, even with a new name and address, is the same peer.
    result = await _paste(hass, node_entry, invite_code("Bobby", ["10.0.0.3:1"], bob.public_line))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert_translated(result, *PEER)
    assert len(_peer_subentries(node_entry)) == 1


async def test_duplicate_key_under_another_unique_id_aborts(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key
) -> None:
    """A peer saved with another unique id (older data) is still recognised by its key."""
    carol = make_key("carol")
    subentry = _add_peer(hass, node_entry, carol, ["10.0.0.4:8022"], "Carol")
    hass.config_entries.async_update_subentry(node_entry, subentry, unique_id="legacy-id")
    result = await _paste(
        hass, node_entry, invite_code("Carol", ["10.0.0.4:8022"], carol.public_line)
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"


async def test_peers_with_one_name_get_distinct_jails(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path, make_key
) -> None:
    # A removed peer's data is still on the disk under "Dave" (kept, or not settled yet):
    # a new peer called Dave must not get that folder.
    (node_root / "Dave").mkdir()
    (node_root / INTERNAL_DIR / "peers" / "Dave").mkdir(parents=True)
    # Only Erin's trash is left: a new Erin must not inherit it either.
    (node_root / INTERNAL_DIR / "trash" / "Erin").mkdir(parents=True)
    jails = []
    for number, name in enumerate(["Bob", "Bob", "bob", "Dave", "Erin", "Ünïcode & Co!", "..."]):
        key = make_key(f"peer{number}")
        result = await _paste(hass, node_entry, invite_code(name, ["10.0.0.9:1"], key.public_line))
        result = await _grant(hass, result["flow_id"], 1)
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert result["data"][CONF_NAME] == name
        jails.append(result["data"][CONF_JAIL])
    assert jails == ["Bob", "Bob-2", "bob-3", "Dave-2", "Erin-2", "n-code-Co", "peer"]


def test_jail_names_when_nothing_is_on_disk(tmp_path: Path) -> None:
    assert peer_flow.names_on_disk(str(tmp_path / "missing")) == set()
    assert peer_flow.jail_name("x" * 80, set()) == "x" * 48


# --- the connection test, against real nodes on 127.0.0.1 ----------------------------------


async def test_online_peer_is_created_at_once(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    """Bob already added us: the test passes and the peer is created without a question."""
    await setup_entry(hass, node_entry)
    alice = PeerGrant("alice", node_entry.data[CONF_NODE_PUBLIC_KEY], GB)
    async with node_server(tmp_path / "bob.key", tmp_path / "bob", [alice]) as bob:
        address = f"127.0.0.1:{bob.port}"
        result = await _paste(
            hass, node_entry, invite_code("Bob", [address], bob.identity.public_line)
        )
        result = await _grant(hass, result["flow_id"], 2)
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert result["data"][CONF_ADDRESSES] == [address]
        assert result["data"][CONF_QUOTA] == 2 * GB
        await hass.async_block_till_done(wait_background_tasks=True)
    # The node restarted with its new peer.
    assert node_entry.state is ConfigEntryState.LOADED
    assert [peer.name for peer in node_entry.runtime_data.node.peers.values()] == ["Bob"]


async def test_waiting_for_the_friend_to_add_us(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    """Carol's node answers with the key in her code but does not know ours yet."""
    await setup_entry(hass, node_entry)
    async with node_server(tmp_path / "carol.key", tmp_path / "carol") as carol:
        code = invite_code("Carol", [f"127.0.0.1:{carol.port}"], carol.identity.public_line)
        result = await _paste(hass, node_entry, code)
        result = await _grant(hass, result["flow_id"], 3)
        assert result["type"] is FlowResultType.FORM
        assert result["step_id"] == "tested_waiting"
        assert_translated(result, *PEER)
        assert invite.decode(result["description_placeholders"]["our_code"]).name == "Alice"
        assert "refused our key" in result["description_placeholders"]["error"]
        result = await hass.config_entries.subentries.async_configure(result["flow_id"], {})
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert result["data"][CONF_QUOTA] == 3 * GB
        assert result["unique_id"] == carol.identity.fingerprint
        await hass.async_block_till_done(wait_background_tasks=True)


async def test_unreachable_friend(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key, unused_tcp_port_factory
) -> None:
    await setup_entry(hass, node_entry)
    dave = make_key("dave")
    address = f"127.0.0.1:{unused_tcp_port_factory()}"  # nobody listens there
    result = await _paste(hass, node_entry, invite_code("Dave", [address], dave.public_line))
    result = await _grant(hass, result["flow_id"], 1)
    assert result["step_id"] == "tested_unreachable"
    assert_translated(result, *PEER)
    placeholders = result["description_placeholders"]
    assert placeholders["addresses"] == address
    assert address in placeholders["error"]
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)


async def test_another_key_answers_at_the_address(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, make_key
) -> None:
    """The code names Erin's key, but Carol's node answers at its address."""
    await setup_entry(hass, node_entry)
    erin = make_key("erin")
    async with node_server(tmp_path / "carol.key", tmp_path / "carol") as carol:
        code = invite_code("Erin", [f"127.0.0.1:{carol.port}"], erin.public_line)
        result = await _paste(hass, node_entry, code)
        result = await _grant(hass, result["flow_id"], 1)
        assert result["step_id"] == "tested_key_mismatch"
        assert_translated(result, *PEER)
        assert result["description_placeholders"]["fingerprint"] == erin.fingerprint
        assert result["description_placeholders"]["error"]
        # Pairing anyway pins the key from the code, never the one that answered.
        result = await hass.config_entries.subentries.async_configure(result["flow_id"], {})
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert result["data"][CONF_PUBLIC_KEY] == erin.public_line
        assert result["unique_id"] == erin.fingerprint
        await hass.async_block_till_done(wait_background_tasks=True)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (RuntimeError("engine exploded"), "engine exploded"),
        (asyncio.CancelledError(), "interrupted"),
    ],
)
async def test_test_failures_are_unreachable(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    make_key,
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
    expected: str,
) -> None:
    """A broken test (the node stopping under it, a bug) ends as "unreachable", not a crash."""
    await setup_entry(hass, node_entry)

    async def broken(_identity: Identity, _target: PeerTarget) -> None:
        raise failure

    monkeypatch.setattr(engine_node, "probe", broken)
    frank = make_key("frank")
    result = await _paste(
        hass, node_entry, invite_code("Frank", ["127.0.0.1:9"], frank.public_line)
    )
    result = await _grant(hass, result["flow_id"], 1)
    assert result["step_id"] == "tested_unreachable"
    assert expected in result["description_placeholders"]["error"]
    monkeypatch.undo()
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)


async def test_closing_the_dialog_during_the_test(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the dialog while the test runs stops the test; nothing is created."""
    await setup_entry(hass, node_entry)
    started = asyncio.Event()
    stopped: list[bool] = []
    loop = asyncio.get_running_loop()

    async def slow(_identity: Identity, _target: PeerTarget) -> None:
        loop.call_soon_threadsafe(started.set)
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(True)

    monkeypatch.setattr(engine_node, "probe", slow)
    gina = make_key("gina")
    result = await _paste(hass, node_entry, invite_code("Gina", ["127.0.0.1:9"], gina.public_line))
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_QUOTA_GB: 1}
    )
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    await started.wait()
    hass.config_entries.subentries.async_abort(result["flow_id"])
    await hass.async_block_till_done()
    await node_entry.runtime_data.engine.run(asyncio.sleep(0))
    assert stopped == [True]
    assert not _peer_subentries(node_entry)


# --- reconfigure ---------------------------------------------------------------------------


async def _reconfigure(
    hass: HomeAssistant, entry: MockConfigEntry, subentry: ConfigSubentry
) -> dict[str, Any]:
    result = await entry.start_subentry_reconfigure_flow(hass, subentry.subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert_translated(result, *PEER)
    return result


async def test_reconfigure_addresses_and_quota(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key
) -> None:
    bob = make_key("bob")
    subentry = _add_peer(hass, node_entry, bob, ["bob.example:9100", "10.0.0.2:9100"], "Bob")
    result = await _reconfigure(hass, node_entry, subentry)
    assert result["description_placeholders"] == {
        "name": "Bob",
        "fingerprint": bob.fingerprint,
        "port": "9100",
    }
    defaults = result["data_schema"]({})
    assert defaults == {CONF_ADDRESSES: "bob.example:9100\n10.0.0.2:9100", CONF_QUOTA_GB: 7}
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        {
            # A bare host gets Bob's port (9100), not ours.
            CONF_ADDRESSES: "Bob.Example\n203.0.113.9:7000, 2001:db8::9 [2001:db8::8] bob.example",
            CONF_QUOTA_GB: 250,
        },
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert_translated(result, *PEER)
    updated = node_entry.subentries[subentry.subentry_id]
    assert updated.data[CONF_ADDRESSES] == [
        "bob.example:9100",
        "203.0.113.9:7000",
        "[2001:db8::9]:9100",
        "[2001:db8::8]:9100",
    ]
    assert updated.data[CONF_QUOTA] == 250 * GB
    # The key, the name, the jail and the identity stay.
    assert updated.data[CONF_PUBLIC_KEY] == bob.public_line
    assert updated.data[CONF_JAIL] == "Bob"
    assert updated.unique_id == bob.fingerprint


@pytest.mark.parametrize(
    ("typed", "error"),
    [
        ("bob.example\nnot a host!", "bad_address"),
        ("bob.example:0", "bad_address"),
        ("", "no_address"),
        (" \n , ", "no_address"),
        ("\n".join(f"10.0.1.{n}" for n in range(1, 10)), "too_many_addresses"),
    ],
)
async def test_reconfigure_errors_recover(
    hass: HomeAssistant, node_entry: MockConfigEntry, make_key, typed: str, error: str
) -> None:
    bob = make_key("bob")
    subentry = _add_peer(hass, node_entry, bob, ["bob.example:9100"], "Bob")
    result = await _reconfigure(hass, node_entry, subentry)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_ADDRESSES: typed, CONF_QUOTA_GB: 9}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_ADDRESSES: error}
    assert_translated(result, *PEER)
    # What was typed is shown again.
    assert result["data_schema"]({}) == {CONF_ADDRESSES: typed, CONF_QUOTA_GB: 9}
    assert node_entry.subentries[subentry.subentry_id].data == subentry.data
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_ADDRESSES: "bob.example", CONF_QUOTA_GB: 9}
    )
    assert result["type"] is FlowResultType.ABORT
    assert node_entry.subentries[subentry.subentry_id].data[CONF_ADDRESSES] == ["bob.example:9100"]


def test_peer_port() -> None:
    assert peer_flow.peer_port(["[2001:db8::1]:9200", "a.example:1"]) == 9200
    assert peer_flow.peer_port([]) == peer_flow.DEFAULT_PORT
