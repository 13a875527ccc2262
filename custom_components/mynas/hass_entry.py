"""Home Assistant entry points of MyNAS: set up and unload a node."""

from __future__ import annotations

from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryNotReady
from homeassistant.helpers import config_validation as cv

from .const import CONF_NODE_ID, CONF_NODE_NAME, CONF_STORAGE_ROOT, DOMAIN
from .coordinator import DiskCoordinator, MyNasConfigEntry, MyNasRuntimeData
from .engine import storage_root

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)

PLATFORMS: list[Platform] = [Platform.SENSOR]


async def async_setup_entry(hass: HomeAssistant, entry: MyNasConfigEntry) -> bool:
    """Start the node: check its disk, then poll it."""
    try:
        await hass.async_add_executor_job(
            storage_root.open_root,
            entry.data[CONF_STORAGE_ROOT],
            entry.data[CONF_NODE_ID],
            entry.data[CONF_NODE_NAME],
        )
    except storage_root.StorageRootError as err:
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key=err.problem.value,
            translation_placeholders={"path": err.path},
        ) from err
    disk = DiskCoordinator(hass, entry)
    await disk.async_config_entry_first_refresh()
    entry.runtime_data = MyNasRuntimeData(disk=disk)
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: MyNasConfigEntry) -> bool:
    """Stop the node."""
    return await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
