"""Coordinators that bring the node's state into Home Assistant."""

from __future__ import annotations

from dataclasses import dataclass

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed

from .const import CONF_NODE_ID, CONF_STORAGE_ROOT, DISK_SCAN_INTERVAL, DOMAIN, LOGGER
from .engine import storage_root
from .engine.storage_root import DiskUsage


@dataclass(slots=True)
class MyNasRuntimeData:
    """What a loaded node entry holds while it runs."""

    disk: DiskCoordinator


type MyNasConfigEntry = ConfigEntry[MyNasRuntimeData]


def read_disk(root: str, node_id: str) -> DiskUsage:
    """Check that the storage root is still our disk, then measure it (blocking)."""
    storage_root.check_root(root, node_id)
    return storage_root.disk_usage(root)


class DiskCoordinator(DataUpdateCoordinator[DiskUsage]):
    """Polls the storage root's disk; fails (entities unavailable) when the disk is gone."""

    config_entry: MyNasConfigEntry

    def __init__(self, hass: HomeAssistant, entry: MyNasConfigEntry) -> None:
        """Poll the disk of ``entry``'s storage root."""
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=f"{DOMAIN} disk",
            update_interval=DISK_SCAN_INTERVAL,
        )
        self.root: str = entry.data[CONF_STORAGE_ROOT]
        self.node_id: str = entry.data[CONF_NODE_ID]

    async def _async_update_data(self) -> DiskUsage:
        try:
            return await self.hass.async_add_executor_job(read_disk, self.root, self.node_id)
        except storage_root.StorageRootError as err:
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key=err.problem.value,
                translation_placeholders={"path": err.path},
            ) from err
