"""The node config flow: every error, its recovery, duplicates and reconfigure."""

from __future__ import annotations

import os
from pathlib import Path

from homeassistant.config_entries import SOURCE_USER
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas.const import (
    CONF_ALLOW_SAME_DISK,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_PORT,
    CONF_STORAGE_ROOT,
    DOMAIN,
)
from custom_components.mynas.engine import storage_root


def _form(name: str, root: Path | str, port: int = 8022, same_disk: bool = False) -> dict:
    return {
        CONF_NODE_NAME: name,
        CONF_STORAGE_ROOT: str(root),
        CONF_PORT: port,
        CONF_ALLOW_SAME_DISK: same_disk,
    }


async def _start(hass: HomeAssistant) -> str:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}
    return result["flow_id"]


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/self")
    path = tmp_path / "readonly"
    path.mkdir(mode=0o555)
    return path


async def test_user_creates_node_on_separate_disk(hass: HomeAssistant, usb_disk: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _form("  Alice's house ", usb_disk, 9022)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Alice's house"
    data = result["data"]
    assert data[CONF_NODE_NAME] == "Alice's house"
    assert data[CONF_STORAGE_ROOT] == str(usb_disk.resolve())
    assert data[CONF_PORT] == 9022
    marker = storage_root.read_marker(usb_disk)
    assert marker == storage_root.Marker(node_id=data[CONF_NODE_ID], node_name="Alice's house")
    entry = result["result"]
    assert entry.unique_id == storage_root.filesystem_identity(usb_disk)


@pytest.mark.parametrize(
    ("make_root", "error"),
    [
        (lambda tmp, ro: "relative/path", "not_absolute"),
        (lambda tmp, ro: tmp / "missing", "not_found"),
        (lambda tmp, ro: _file(tmp / "a-file"), "not_a_directory"),
        (lambda tmp, ro: ro, "not_writable"),
        (lambda tmp, ro: tmp, "same_disk"),
    ],
)
async def test_user_storage_root_errors_recover(
    hass: HomeAssistant,
    tmp_path: Path,
    readonly_dir: Path,
    usb_disk: Path,
    make_root,
    error: str,
) -> None:
    flow_id = await _start(hass)
    bad = make_root(tmp_path, readonly_dir)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", bad))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_STORAGE_ROOT: error}
    assert not hass.config_entries.async_entries(DOMAIN)
    # The form keeps what was typed, and a good answer then succeeds.
    assert result["data_schema"]({})[CONF_STORAGE_ROOT] == str(bad)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


async def test_user_same_disk_accepted_when_ticked(hass: HomeAssistant, tmp_path: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _form("Test box", tmp_path, same_disk=True)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert storage_root.read_marker(tmp_path) is not None


async def test_user_name_required(hass: HomeAssistant, usb_disk: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("   ", usb_disk))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_NODE_NAME: "name_required"}
    assert storage_root.read_marker(usb_disk) is None
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_duplicate_storage_root_aborts(hass: HomeAssistant, usb_disk: Path) -> None:
    flow_id = await _start(hass)
    first = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert first["type"] is FlowResultType.CREATE_ENTRY
    # The same folder, spelled differently, is still the same storage root.
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Bob", f"{usb_disk}/./"))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert storage_root.read_marker(usb_disk).node_name == "Alice"


async def test_user_reinstall_keeps_node_id(hass: HomeAssistant, usb_disk: Path) -> None:
    """Setting up again on a disk that already carries our marker keeps the node's id."""
    before = storage_root.claim_root(usb_disk, "Old name")
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("New name", usb_disk))
    assert result["data"][CONF_NODE_ID] == before.node_id
    assert storage_root.read_marker(usb_disk).node_name == "New name"


async def test_reconfigure_name_and_port(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    result = await node_entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_NODE_NAME: " ", CONF_PORT: 9000}
    )
    assert result["errors"] == {CONF_NODE_NAME: "name_required"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_NODE_NAME: "Alice & Bob", CONF_PORT: 9000}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert node_entry.title == "Alice & Bob"
    assert node_entry.data[CONF_NODE_NAME] == "Alice & Bob"
    assert node_entry.data[CONF_PORT] == 9000
    assert node_entry.data[CONF_STORAGE_ROOT] == str(node_root)
    await hass.async_block_till_done()
    # The reload that follows writes the new name into the disk's marker.
    assert storage_root.read_marker(node_root).node_name == "Alice & Bob"
