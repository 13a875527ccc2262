"""Sensors for MyNAS: the node's disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import PERCENTAGE, UnitOfInformation
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import DiskCoordinator, MyNasConfigEntry
from .engine.storage_root import DiskUsage
from .entity import NodeEntity

# Coordinator-driven: no per-entity polling to throttle.
PARALLEL_UPDATES = 0


@dataclass(frozen=True, kw_only=True)
class DiskSensorDescription(SensorEntityDescription):
    """A disk figure and how to read it from DiskUsage."""

    value_fn: Callable[[DiskUsage], float | int]


def _size(key: str, value_fn: Callable[[DiskUsage], int]) -> DiskSensorDescription:
    return DiskSensorDescription(
        key=key,
        translation_key=key,
        device_class=SensorDeviceClass.DATA_SIZE,
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.GIGABYTES,
        suggested_display_precision=1,
        value_fn=value_fn,
    )


DISK_SENSORS: tuple[DiskSensorDescription, ...] = (
    _size("disk_total", lambda disk: disk.total),
    _size("disk_used", lambda disk: disk.used),
    _size("disk_free", lambda disk: disk.free),
    DiskSensorDescription(
        key="disk_used_percent",
        translation_key="disk_used_percent",
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=1,
        value_fn=lambda disk: disk.percent,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the node's disk sensors."""
    coordinator = entry.runtime_data.disk
    async_add_entities(DiskSensor(coordinator, description) for description in DISK_SENSORS)


class DiskSensor(NodeEntity, SensorEntity):
    """One figure about the disk that holds the storage root."""

    entity_description: DiskSensorDescription

    def __init__(self, coordinator: DiskCoordinator, description: DiskSensorDescription) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, description.key)
        self.entity_description = description

    @property
    def native_value(self) -> float | int:
        """Return the figure from the latest disk reading."""
        return self.entity_description.value_fn(self.coordinator.data)
