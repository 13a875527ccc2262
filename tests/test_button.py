"""Buttons: back up now, verify — both return at once and run in the background."""

from __future__ import annotations

from pathlib import Path

from homeassistant.components.button import DOMAIN as BUTTON_DOMAIN, SERVICE_PRESS
from homeassistant.const import ATTR_ENTITY_ID, Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_capture_events
from syrupy.assertion import SnapshotAssertion

from custom_components.mynas.const import EVENT_SYNC_FINISHED
from custom_components.mynas.models import SyncState

from .conftest import PAIR, Bob, gated_pushes, snapshot_entities, unmount

SYNC_NOW = "button.photos_back_up_to_bob_now"
VERIFY = "button.photos_verify_copy_on_bob"


@pytest.fixture
def platforms() -> list[Platform]:
    """Only buttons, so that the snapshot is about them."""
    return [Platform.BUTTON]


async def _press(hass: HomeAssistant, entity_id: str) -> None:
    await hass.services.async_call(
        BUTTON_DOMAIN, SERVICE_PRESS, {ATTR_ENTITY_ID: entity_id}, blocking=True
    )


async def test_snapshot(
    hass: HomeAssistant, synced_node: MockConfigEntry, snapshot: SnapshotAssertion
) -> None:
    snapshot_entities(hass, snapshot, synced_node)


async def test_sync_now_returns_at_once_and_syncs_in_the_background(
    hass: HomeAssistant, synced_node: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    (tmp_path / "photos" / "new.jpg").write_bytes(b"new")
    manager = synced_node.runtime_data.manager
    events = async_capture_events(hass, EVENT_SYNC_FINISHED)
    with gated_pushes(hass) as (entered, release):
        await _press(hass, SYNC_NOW)  # returns while the push is held in the engine
        assert await entered.get() == "Photos"
        assert manager.running(PAIR)
        assert events == []
        release.set()
    await hass.async_block_till_done(wait_background_tasks=True)
    assert [(e.data["kind"], e.data["status"]) for e in events] == [("sync", "success")]
    assert (bob.replica("Photos") / "new.jpg").read_bytes() == b"new"
    assert manager.data.pairs[PAIR].state is SyncState.IDLE


async def test_verify_runs_in_the_background(
    hass: HomeAssistant, synced_node: MockConfigEntry, bob: Bob
) -> None:
    events = async_capture_events(hass, EVENT_SYNC_FINISHED)
    await _press(hass, SYNC_NOW)
    await hass.async_block_till_done(wait_background_tasks=True)
    await _press(hass, VERIFY)
    assert synced_node.runtime_data.manager.running(PAIR)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert [(e.data["kind"], e.data["status"]) for e in events] == [
        ("sync", "success"),
        ("verify", "success"),
    ]


async def test_press_without_the_disk_says_why(
    hass: HomeAssistant, synced_node: MockConfigEntry, node_root: Path
) -> None:
    unmount(node_root)
    await synced_node.runtime_data.node_data.async_refresh()
    with pytest.raises(HomeAssistantError) as err:
        await _press(hass, SYNC_NOW)
    assert err.value.translation_key == "storage_unavailable"
    assert "backup disk of Alice is missing" in str(err.value)
