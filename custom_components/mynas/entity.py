"""Base entity for MyNAS."""

from __future__ import annotations

from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import CONF_NODE_NAME, DOMAIN
from .coordinator import DiskCoordinator, MyNasConfigEntry


def node_device_info(entry: MyNasConfigEntry) -> DeviceInfo:
    """Return the device that stands for this node."""
    return DeviceInfo(
        identifiers={(DOMAIN, entry.entry_id)},
        name=entry.data[CONF_NODE_NAME],
        manufacturer="MyNAS",
        model="MyNAS node",
        entry_type=DeviceEntryType.SERVICE,
    )


class NodeEntity(CoordinatorEntity[DiskCoordinator]):
    """An entity of the node device, fed by the disk coordinator."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: DiskCoordinator, key: str) -> None:
        """Attach the entity to the node's device, unique per entry and ``key``."""
        super().__init__(coordinator)
        entry = coordinator.config_entry
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_device_info = node_device_info(entry)
