"""Binary sensors: a peer's connectivity, a folder's backup overdue."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

from freezegun.api import FrozenDateTimeFactory
from homeassistant.const import Platform
from homeassistant.core import Event, EventStateChangedData, HomeAssistant, callback
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.event import async_track_state_change_event
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from syrupy.assertion import SnapshotAssertion

from custom_components.mynas.const import CONF_OVERDUE_HOURS

from .conftest import BOB_ID, Bob, RunningNode, add_peer, setup_entry, snapshot_entities

CONNECTED = "binary_sensor.bob_connection"
OVERDUE = "binary_sensor.photos_backup_to_bob_overdue"
PROBE_ALL = "custom_components.mynas.sync_manager.PeerProber.probe_all"


@pytest.fixture
def platforms() -> list[Platform]:
    """Only binary sensors, so that the snapshot is about them."""
    return [Platform.BINARY_SENSOR]


def _state(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


async def _advance(hass: HomeAssistant, freezer: FrozenDateTimeFactory, delta: timedelta) -> None:
    freezer.tick(delta)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)


async def _overdue_after(
    hass: HomeAssistant, freezer: FrozenDateTimeFactory, delay: timedelta
) -> None:
    """Not overdue until ``delay`` from now, overdue a minute after."""
    await _advance(hass, freezer, delay - timedelta(minutes=1))
    assert _state(hass, OVERDUE) == "off"
    await _advance(hass, freezer, timedelta(minutes=2))
    assert _state(hass, OVERDUE) == "on"


async def test_snapshot(
    hass: HomeAssistant, synced_node: MockConfigEntry, snapshot: SnapshotAssertion
) -> None:
    snapshot_entities(hass, snapshot, synced_node)
    for entity in er.async_entries_for_config_entry(er.async_get(hass), synced_node.entry_id):
        assert entity.has_entity_name
        assert entity.translation_key in ("connected", "overdue")


async def test_connected_follows_the_peer(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    assert _state(hass, CONNECTED) == "on"
    state = hass.states.get(CONNECTED)
    assert state is not None
    assert state.attributes["reachability"] == "online"
    assert state.attributes["error"] is None
    await bob.stop()
    await _advance(hass, freezer, timedelta(minutes=10, seconds=1))  # the next probe
    state = hass.states.get(CONNECTED)
    assert state is not None
    assert state.state == "off"
    assert state.attributes["reachability"] == "unreachable"
    assert "connection refused" in state.attributes["error"]
    await bob.start()
    await _advance(hass, freezer, timedelta(minutes=10))
    assert _state(hass, CONNECTED) == "on"


async def test_overdue_flips_on_after_the_threshold(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    """Last success 2 h ago, Bob gone: overdue once 36 h (the default) have passed."""
    assert _state(hass, OVERDUE) == "off"
    await bob.stop()
    await _overdue_after(hass, freezer, timedelta(hours=34))  # 36 h after the last success
    # Bob is back: the next retry succeeds and the backup is no longer overdue.
    await bob.start()
    await _advance(hass, freezer, timedelta(hours=6))
    assert _state(hass, OVERDUE) == "off"


async def test_overdue_threshold_is_an_option(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
    running_node: RunningNode,
) -> None:
    hass.config_entries.async_update_entry(node_entry, options={CONF_OVERDUE_HOURS: 48})
    await running_node({"a": b"a"})
    await bob.stop()
    await _overdue_after(hass, freezer, timedelta(hours=48))


async def test_a_pair_that_never_succeeded_becomes_overdue(
    hass: HomeAssistant,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
    running_node: RunningNode,
) -> None:
    """Retries keep failing: counted from the first attempt, not the latest one."""
    await bob.stop()
    await running_node({"a": b"a"})
    assert _state(hass, OVERDUE) == "off"  # a new folder is not overdue at once
    for _ in range(7):
        await _advance(hass, freezer, timedelta(hours=5, minutes=59))
    assert _state(hass, OVERDUE) == "on"


async def test_a_reload_never_shows_connected_as_unknown(
    hass: HomeAssistant, synced_node: MockConfigEntry
) -> None:
    """A reload (every change of a peer or folder) goes unavailable → the last known state.

    The last test's outcome is stored: the entity comes back with it at once rather than
    "unknown" until the next test, which the activity log would show.
    """
    seen: list[str] = []

    @callback
    def record(event: Event[EventStateChangedData]) -> None:
        if event.data["new_state"] is not None:
            seen.append(event.data["new_state"].state)

    async_track_state_change_event(hass, [CONNECTED], record)
    with patch(PROBE_ALL, lambda self, now=None: None):  # no new test: the stored outcome
        assert await hass.config_entries.async_reload(synced_node.entry_id)
        await hass.async_block_till_done(wait_background_tasks=True)
    assert seen == ["unavailable", "on"]


async def test_connected_is_unavailable_until_the_first_test(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    add_peer(hass, node_entry, bob)
    with patch(PROBE_ALL, lambda self, now=None: None):
        await setup_entry(hass, node_entry)
        assert _state(hass, CONNECTED) == "unavailable"  # nothing to say yet, not "unknown"
    await node_entry.runtime_data.manager.probe(BOB_ID)
    await hass.async_block_till_done()
    assert _state(hass, CONNECTED) == "on"
