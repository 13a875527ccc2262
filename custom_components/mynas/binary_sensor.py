"""Binary sensors: whether a peer answers, and whether a folder's backup is overdue."""

from __future__ import annotations

from homeassistant.components.binary_sensor import (
    BinarySensorEntity,
    BinarySensorEntityDescription,
)
from homeassistant.components.binary_sensor.const import BinarySensorDeviceClass
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import MyNasConfigEntry
from .engine import Reachability
from .entity import PairEntity, PeerStatusEntity, add_per_pair, add_per_peer

PARALLEL_UPDATES = 0

CONNECTED = BinarySensorEntityDescription(
    key="connected",
    translation_key="connected",
    device_class=BinarySensorDeviceClass.CONNECTIVITY,
)
OVERDUE = BinarySensorEntityDescription(
    key="overdue",
    translation_key="overdue",
    device_class=BinarySensorDeviceClass.PROBLEM,
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add a connectivity sensor per peer and an overdue sensor per pair."""
    syncs = entry.runtime_data.syncs
    add_per_peer(
        entry, async_add_entities, lambda peer: [PeerConnected(syncs, peer, CONNECTED.key)]
    )
    add_per_pair(
        entry,
        async_add_entities,
        lambda folder, peer: [BackupOverdue(syncs, folder, peer, OVERDUE.key)],
    )


class PeerConnected(PeerStatusEntity, BinarySensorEntity):
    """On while the peer answers our connection tests with its pinned key."""

    entity_description = CONNECTED

    @property
    def available(self) -> bool:
        """Unavailable only until the peer was first tested: there is nothing to say yet."""
        return super().available and self.status.reachability is not None

    @property
    def is_on(self) -> bool:
        """Whether the last test reached the peer."""
        return self.status.reachability is Reachability.ONLINE

    @property
    def extra_state_attributes(self) -> dict[str, str | None]:
        """Why the peer is not reachable, in one word and one sentence."""
        status = self.status
        return {
            "reachability": status.reachability.value if status.reachability else None,
            "error": status.error,
        }


class BackupOverdue(PairEntity, BinarySensorEntity):
    """On when the pair's last successful sync is older than the node's threshold."""

    entity_description = OVERDUE

    @property
    def is_on(self) -> bool:
        """Whether the backup is overdue."""
        return self.coordinator.manager.is_overdue(self.pair)
