"""Setting up, reloading and unloading a node entry: its server, its thread, its disk."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
import socket
import threading
from unittest.mock import patch

from freezegun.api import FrozenDateTimeFactory
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr, entity_registry as er, issue_registry as ir
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed

from custom_components.mynas import async_remove_config_entry_device, texts
from custom_components.mynas.const import (
    CONF_KEY_FILE,
    CONF_OVERDUE_HOURS,
    CONF_PORT,
    DOMAIN,
    EVENT_UNKNOWN_KEY,
)
from custom_components.mynas.engine import identity, storage_root
from custom_components.mynas.engine.errors import AuthRefused
from custom_components.mynas.engine.node import Node
from custom_components.mynas.engine.owner import client
from custom_components.mynas.models import SyncKind

from .conftest import BOB_ID, PHOTOS_ID, Bob, RunningNode, add_peer, make_tree, setup_entry, unmount


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def _engine_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "mynas-engine"]


def _storage_issue(hass: HomeAssistant, entry: MockConfigEntry) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, f"storage_{entry.entry_id}")


async def test_setup_and_unload(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    port = node_entry.data[CONF_PORT]
    assert await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.LOADED
    assert node_entry.runtime_data.node_data.data.disk.total > 0
    # The node's SSH server answers while the entry is loaded, from its own thread.
    assert await _listening(port)
    assert len(_engine_threads()) == 1
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    assert node_entry.state is ConfigEntryState.NOT_LOADED
    assert not await _listening(port)
    assert _engine_threads() == []


async def test_unload_while_a_sync_runs(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, running_node: RunningNode
) -> None:
    """Unloading cancels a running sync, in HA and in the engine, and leaves nothing behind."""
    source = make_tree(tmp_path / "big", {"big.bin": b"\0" * 3_000_000})
    running_node.protect(source, bwlimit=0.5)  # 6 s at 0.5 MB/s
    await setup_entry(hass, node_entry)
    manager = node_entry.runtime_data.manager
    pair = manager.pairs[0]
    assert manager.running(pair)
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    assert not manager.running(pair)
    assert _engine_threads() == []
    status = manager.data.pairs[pair]
    assert status.state == "idle"
    assert status.last_success is None


async def test_setup_retries_when_port_in_use(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    port = node_entry.data[CONF_PORT]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        await setup_entry(hass, node_entry)
        assert node_entry.state is ConfigEntryState.SETUP_RETRY
        assert f"Port {port} is already in use" in str(node_entry.reason)
        assert _engine_threads() == []


async def test_setup_retries_when_the_server_cannot_start(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    with patch.object(Node, "start", side_effect=OSError(errno.EIO, "I/O error")):
        await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_RETRY
    assert "could not start: [Errno 5] I/O error" in str(node_entry.reason)
    assert _engine_threads() == []


@pytest.mark.parametrize(
    "failing",
    [
        # The server itself fails in an unexpected way...
        "custom_components.mynas.engine.node.Node.start",
        # ... or a step after it has started.
        "custom_components.mynas.hass_entry._forget_stale_pairs",
        "custom_components.mynas.hass_entry.async_check_orphans",
    ],
)
async def test_setup_stops_the_node_when_a_step_fails(
    hass: HomeAssistant, node_entry: MockConfigEntry, failing: str
) -> None:
    with patch(failing, side_effect=RuntimeError("boom")):
        await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_ERROR
    assert not await _listening(node_entry.data[CONF_PORT])
    assert _engine_threads() == []


async def test_setup_retries_when_disk_missing_then_recovers(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    freezer: FrozenDateTimeFactory,
) -> None:
    marker = storage_root.marker_path(node_root)
    saved = marker.read_bytes()
    unmount(node_root)
    await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_RETRY
    assert "is missing" in str(node_entry.reason)
    issue = _storage_issue(hass, node_entry)
    assert issue is not None
    assert issue.translation_key == "storage_missing"
    assert issue.translation_placeholders == {
        "node": "Alice",
        "path": str(node_root),
        "since": texts.since(dt_util.utcnow()),
        "folders": "-",
    }
    assert _engine_threads() == []
    # The disk is plugged in again: the next retry starts the node and clears the issue.
    marker.parent.mkdir(parents=True)
    marker.write_bytes(saved)
    freezer.tick(60)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    assert _storage_issue(hass, node_entry) is None


@pytest.mark.parametrize(
    ("change_disk", "expected", "issue_key"),
    [
        # The mount point is there but empty: the disk is not mounted.
        (
            lambda root: storage_root.marker_path(root).unlink(),
            "holds no MyNAS marker",
            "storage_missing",
        ),
        # Another MyNAS disk is mounted in its place.
        (
            lambda root: storage_root.write_marker(root, storage_root.Marker("other", "Eve")),
            "belongs to another MyNAS node",
            "storage_foreign",
        ),
    ],
)
async def test_setup_refuses_another_disk(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    change_disk,
    expected: str,
    issue_key: str,
) -> None:
    change_disk(node_root)
    await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_RETRY
    assert expected in str(node_entry.reason)
    # Nothing was written over the other disk's marker.
    marker = storage_root.read_marker(node_root)
    assert marker is None or marker.node_id == "other"
    issue = _storage_issue(hass, node_entry)
    assert issue is not None
    assert issue.translation_key == issue_key
    assert issue.severity is ir.IssueSeverity.ERROR


async def test_home_assistant_stop_stops_the_node(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    port = node_entry.data[CONF_PORT]
    await setup_entry(hass, node_entry)
    assert await _listening(port)
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STOP)
    await hass.async_block_till_done()
    assert not await _listening(port)
    assert _engine_threads() == []
    assert not node_entry.runtime_data.engine.running
    # Unloading afterwards (as the tests' teardown does) is harmless.
    assert await hass.config_entries.async_unload(node_entry.entry_id)


async def test_a_new_subentry_restarts_the_node_with_it(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> None:
    await setup_entry(hass, node_entry)
    before = node_entry.runtime_data
    assert before.manager.peers == {}
    add_peer(hass, node_entry, bob)
    await hass.async_block_till_done(wait_background_tasks=True)
    after = node_entry.runtime_data
    assert after is not before
    assert list(after.manager.peers) == [BOB_ID]
    assert not before.engine.running
    assert len(_engine_threads()) == 1
    # An options change alone (a removed peer's data kept) does not restart anything.
    hass.config_entries.async_update_entry(node_entry, options={"kept_data": ["eve"]})
    await hass.async_block_till_done()
    assert node_entry.runtime_data is after


async def test_options_flow_restarts_with_the_new_threshold(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """The options flow reloads by itself: no update listener may stand in its way."""
    await setup_entry(hass, node_entry)
    result = await hass.config_entries.options.async_init(node_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "settings"}
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"addresses": "alice.example.org", CONF_OVERDUE_HOURS: 48}
    )
    await hass.async_block_till_done()
    assert node_entry.options[CONF_OVERDUE_HOURS] == 48
    assert node_entry.state is ConfigEntryState.LOADED
    assert node_entry.runtime_data.manager.overdue_after.total_seconds() == 48 * 3600


async def _set_up(hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob) -> None:
    """Set the node up with Bob as its peer (no folder), idle."""
    add_peer(hass, node_entry, bob)
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)


async def test_server_events_reach_home_assistant(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    """A stranger's key fires an event; a peer connecting to us counts as seen."""
    await _set_up(hass, node_entry, bob)
    events: list[dict[str, str]] = []
    hass.bus.async_listen(EVENT_UNKNOWN_KEY, lambda event: events.append(event.data))
    manager = node_entry.runtime_data.manager
    address = f"127.0.0.1:{node_entry.data[CONF_PORT]}"
    alice_key = node_entry.data["public_key"]
    stranger, _ = await hass.async_add_executor_job(identity.load_or_create, tmp_path / "eve.key")
    with pytest.raises(AuthRefused):
        await bob.engine.run(client.connect(stranger, address, alice_key))
    await hass.async_block_till_done()
    assert events == [{"entry_id": node_entry.entry_id, "fingerprint": stranger.fingerprint}]
    # Bob connects to us: he is seen (without becoming "reachable": that is our test).
    manager.data.peers[BOB_ID].last_seen = None
    link = await bob.engine.run(client.connect(bob.identity, address, alice_key))
    await bob.engine.run(link.close())
    await hass.async_block_till_done()
    assert manager.data.peers[BOB_ID].last_seen is not None


async def test_unload_waits_for_the_engine_to_unwind(
    hass: HomeAssistant, node_entry: MockConfigEntry, running_node: RunningNode
) -> None:
    """A cancelled push finishes its cleanup (the index writes) before the node closes."""
    running_node.protect({"a": b"a"})
    started = asyncio.Event()
    unwound: list[str] = []

    async def slow_to_cancel(*_args: object, **_kwargs: object) -> None:
        hass.loop.call_soon_threadsafe(started.set)
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # e.g. the shielded flush of acknowledged files
            unwound.append("done")

    with patch("custom_components.mynas.engine.node.push_folder", slow_to_cancel):
        await setup_entry(hass, node_entry)
        await started.wait()
        manager = node_entry.runtime_data.manager
        assert await hass.config_entries.async_unload(node_entry.entry_id)
    assert unwound == ["done"]
    assert _engine_threads() == []
    # A stopped node takes no more runs, and late server news changes nothing.
    with pytest.raises(HomeAssistantError) as err:
        manager.start(manager.pairs[0], SyncKind.SYNC)
    assert err.value.translation_key == "node_not_loaded"
    manager.contact(BOB_ID, dt_util.utcnow())
    assert manager.data.peers[BOB_ID].last_seen is None


@pytest.fixture
async def protecting(running_node: RunningNode) -> None:
    """The node set up with Bob as its peer and a one-file folder, Photos, sent to him."""
    await running_node({"a": b"a"})


@pytest.mark.usefixtures("protecting")
async def test_removing_a_folder_forgets_its_index(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """Re-added later, the folder adopts what Bob really holds instead of a stale index."""
    index = node_entry.runtime_data.node.index
    assert await hass.async_add_executor_job(index.folders) == [("Photos", BOB_ID)]
    hass.config_entries.async_remove_subentry(node_entry, PHOTOS_ID)
    await hass.async_block_till_done(wait_background_tasks=True)
    index = node_entry.runtime_data.node.index
    assert await hass.async_add_executor_job(index.folders) == []


@pytest.mark.usefixtures("protecting")
async def test_removing_the_node_drops_its_state_but_keeps_its_key(
    hass: HomeAssistant, hass_storage: dict[str, object], node_entry: MockConfigEntry
) -> None:
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    key = f"{DOMAIN}.{node_entry.entry_id}"
    assert key in hass_storage
    await hass.config_entries.async_remove(node_entry.entry_id)
    await hass.async_block_till_done()
    assert key not in hass_storage
    assert Path(node_entry.data[CONF_KEY_FILE]).exists()


@pytest.mark.usefixtures("protecting")
async def test_removing_a_peer_leaves_no_entity_of_it_behind(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """Its device and its pairs' entities (on the folder's device) go; the folder stays."""
    registry = er.async_get(hass)

    def bobs() -> list[str]:
        return [
            entity.entity_id
            for entity in er.async_entries_for_config_entry(registry, node_entry.entry_id)
            if "bob" in entity.entity_id
        ]

    assert "button.photos_back_up_to_bob_now" in bobs()
    hass.config_entries.async_remove_subentry(node_entry, BOB_ID)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    assert bobs() == []
    assert all(state.state != "unavailable" for state in hass.states.async_all())
    devices = dr.async_entries_for_config_entry(dr.async_get(hass), node_entry.entry_id)
    assert sorted(device.name for device in devices) == ["Alice", "Photos"]


async def test_only_a_leftover_device_may_be_deleted(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> None:
    await _set_up(hass, node_entry, bob)
    devices = dr.async_get(hass)
    for device in dr.async_entries_for_config_entry(devices, node_entry.entry_id):
        # The node's and Bob's devices stand for something: removing them is refused.
        assert not await async_remove_config_entry_device(hass, node_entry, device)
    leftover = devices.async_get_or_create(
        config_entry_id=node_entry.entry_id, identifiers={(DOMAIN, "gone")}, name="Gone"
    )
    assert await async_remove_config_entry_device(hass, node_entry, leftover)
