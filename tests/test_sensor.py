"""The node's disk sensors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
import shutil

from freezegun.api import FrozenDateTimeFactory
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr, entity_registry as er
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed

from custom_components.mynas.const import DISK_SCAN_INTERVAL

from .conftest import setup_entry, unmount

# Polls run as background tasks at a random sub-second offset: step a little past each one.
NEXT_POLL = DISK_SCAN_INTERVAL + timedelta(seconds=1)
SENSORS = ("disk_size", "disk_used", "disk_free", "disk_used_percent")


def _state(hass: HomeAssistant, key: str) -> str:
    state = hass.states.get(f"sensor.alice_{key}")
    assert state is not None, key
    return state.state


async def test_sensors_show_what_df_shows(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    await setup_entry(hass, node_entry)
    usage = shutil.disk_usage(node_root)
    # The sensors keep bytes natively and show GB; compare the native figures.
    registry = er.async_get(hass)
    for key, expected in (
        ("disk_size", usage.total),
        ("disk_used", usage.used),
        ("disk_free", usage.free),
    ):
        entity_id = f"sensor.alice_{key}"
        assert registry.async_get(entity_id) is not None
        state = hass.states.get(entity_id)
        assert state.attributes["unit_of_measurement"] == "GB"
        # disk_free moves as the machine writes; allow 64 MiB of drift between readings.
        assert float(state.state) == pytest.approx(expected / 1e9, abs=0.07)
    percent = float(_state(hass, "disk_used_percent"))
    assert percent == pytest.approx(100 * usage.used / (usage.used + usage.free), abs=0.2)


async def test_sensors_belong_to_node_device(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    await setup_entry(hass, node_entry)
    devices = dr.async_entries_for_config_entry(dr.async_get(hass), node_entry.entry_id)
    assert len(devices) == 1
    device = devices[0]
    assert device.identifiers == {("mynas", node_entry.entry_id)}
    assert device.name == "Alice"
    entities = er.async_entries_for_device(er.async_get(hass), device.id)
    assert sorted(e.translation_key for e in entities) == sorted(
        ["disk_total", "disk_used", "disk_free", "disk_used_percent", "hosted_total"]
    )
    assert all(
        e.has_entity_name
        for e in er.async_entries_for_config_entry(er.async_get(hass), node_entry.entry_id)
    )


async def test_sensors_unavailable_when_disk_vanishes_then_recover(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    freezer: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await setup_entry(hass, node_entry)
    marker = node_root / ".mynas" / "node.json"
    saved = marker.read_bytes()
    unmount(node_root)
    for _ in range(3):
        freezer.tick(NEXT_POLL)
        async_fire_time_changed(hass)
        await hass.async_block_till_done(wait_background_tasks=True)
    for key in SENSORS:
        assert _state(hass, key) == STATE_UNAVAILABLE
    # One log line for the outage, not one per poll.
    missing = [r for r in caplog.records if "is missing" in r.getMessage()]
    assert len(missing) == 1
    # The disk comes back: the sensors follow.
    marker.parent.mkdir(parents=True)
    marker.write_bytes(saved)
    freezer.tick(NEXT_POLL)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert float(_state(hass, "disk_size")) > 0
