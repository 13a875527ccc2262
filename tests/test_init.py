"""Setting up and unloading a node entry."""

from __future__ import annotations

from pathlib import Path

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas.engine import storage_root

from .conftest import setup_entry, unmount


async def test_setup_and_unload(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    assert await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.LOADED
    assert node_entry.runtime_data.node_data.data.disk.total > 0
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    assert node_entry.state is ConfigEntryState.NOT_LOADED


async def test_setup_retries_when_disk_missing(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    unmount(node_root)
    await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_RETRY
    assert "is missing" in str(node_entry.reason)


@pytest.mark.parametrize(
    ("change_disk", "expected"),
    [
        # The mount point is there but empty: the disk is not mounted.
        (lambda root: storage_root.marker_path(root).unlink(), "holds no MyNAS marker"),
        # Another MyNAS disk is mounted in its place.
        (
            lambda root: storage_root.write_marker(root, storage_root.Marker("other", "Eve")),
            "belongs to another MyNAS node",
        ),
    ],
)
async def test_setup_refuses_another_disk(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path, change_disk, expected: str
) -> None:
    change_disk(node_root)
    await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.SETUP_RETRY
    assert expected in str(node_entry.reason)
    # Nothing was written over the other disk's marker.
    marker = storage_root.read_marker(node_root)
    assert marker is None or marker.node_id == "other"
