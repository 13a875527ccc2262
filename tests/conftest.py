"""Fixtures shared by the Home Assistant tests."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

from homeassistant.core import HomeAssistant
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

# HA's loader finds the integration through this package (see DESIGN.md, toolchain facts).
import custom_components  # noqa: F401
from custom_components.mynas.const import (
    CONF_KEY_FILE,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PORT,
    CONF_STORAGE_ROOT,
    DOMAIN,
)
from custom_components.mynas.engine import identity, storage_root


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load custom_components/mynas in every test."""


@pytest.fixture(autouse=True)
def auto_socket_enabled(socket_enabled: None) -> None:
    """A node runs a real SSH server, and tests pair real nodes over 127.0.0.1."""


@pytest.fixture
def hass_config_dir(hass_tmp_config_dir: str) -> str:
    """A config dir per test: nodes write their keys there."""
    return hass_tmp_config_dir


@pytest.fixture
def usb_disk(hass: HomeAssistant) -> Iterator[Path]:
    """A directory on another filesystem than Home Assistant's config dir: our "USB disk".

    /dev/shm is a tmpfs on Linux, so it is a real separate filesystem, not a mock.
    """
    base = Path("/dev/shm")
    assert base.is_dir(), "these tests need /dev/shm (a tmpfs) as a second filesystem"
    assert not storage_root.same_filesystem(base, hass.config.config_dir)
    path = Path(tempfile.mkdtemp(prefix="mynas-usb-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node_root(tmp_path: Path) -> Path:
    """A storage root already claimed by a node (on the test machine's disk)."""
    root = tmp_path / "disk"
    root.mkdir()
    return root


@pytest.fixture
def node_entry(hass: HomeAssistant, node_root: Path, unused_tcp_port: int) -> MockConfigEntry:
    """A node entry whose storage root carries its marker, with its key in the config dir."""
    marker = storage_root.claim_root(node_root, "Alice")
    key_file = Path(hass.config.path(DOMAIN, f"{marker.node_id}.key"))
    node, _ = identity.load_or_create(key_file)
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Alice",
        unique_id=storage_root.filesystem_identity(node_root),
        data={
            CONF_NODE_NAME: "Alice",
            CONF_STORAGE_ROOT: str(node_root),
            CONF_PORT: unused_tcp_port,
            CONF_NODE_ID: marker.node_id,
            CONF_KEY_FILE: str(key_file),
            CONF_NODE_PUBLIC_KEY: node.public_line,
        },
    )
    entry.add_to_hass(hass)
    return entry


async def setup_entry(hass: HomeAssistant, entry: MockConfigEntry) -> Any:
    """Set up ``entry`` and wait until Home Assistant is idle."""
    result = await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return result


def unmount(path: Path) -> None:
    """Make a storage root vanish, as when the USB disk is unplugged."""
    shutil.rmtree(path)
    assert not os.path.exists(path)
