"""Base entities: the node's, a peer's, and a folder × peer pair's (on the folder's device)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import CONF_NODE_NAME, DOMAIN, SUBENTRY_FOLDER, SUBENTRY_PEER
from .coordinator import MyNasConfigEntry, NodeCoordinator, SyncCoordinator
from .models import PairStatus, PeerStatus
from .reach import ReachCoordinator


def subentries(entry: MyNasConfigEntry, kind: str) -> dict[str, ConfigSubentry]:
    """The entry's peers or folders (``kind``), by subentry id."""
    return {sid: sub for sid, sub in entry.subentries.items() if sub.subentry_type == kind}


def add_per_peer(
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
    make: Callable[[ConfigSubentry], Iterable[Entity]],
) -> None:
    """Add what ``make(peer)`` gives for every peer, each on its peer's subentry."""
    for peer in subentries(entry, SUBENTRY_PEER).values():
        async_add_entities(list(make(peer)), config_subentry_id=peer.subentry_id)


def add_per_pair(
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
    make: Callable[[ConfigSubentry, ConfigSubentry], Iterable[Entity]],
) -> None:
    """Add what ``make(folder, peer)`` gives for every folder x peer pair, on the folder."""
    peers = subentries(entry, SUBENTRY_PEER)
    pairs = entry.runtime_data.manager.pairs
    for folder in subentries(entry, SUBENTRY_FOLDER).values():
        async_add_entities(
            [
                entity
                for folder_id, peer_id in pairs
                if folder_id == folder.subentry_id
                for entity in make(folder, peers[peer_id])
            ],
            config_subentry_id=folder.subentry_id,
        )


def device_identifier(entry_id: str, subentry_id: str | None = None) -> tuple[str, str]:
    """The identifier of the node's device, or of a peer's or folder's (one per subentry)."""
    return (DOMAIN, entry_id if subentry_id is None else f"{entry_id}_{subentry_id}")


def node_device(entry: MyNasConfigEntry) -> DeviceInfo:
    """The device that stands for this node."""
    return DeviceInfo(
        identifiers={device_identifier(entry.entry_id)},
        name=entry.data[CONF_NODE_NAME],
        manufacturer="MyNAS",
        model="MyNAS node",
        entry_type=DeviceEntryType.SERVICE,
    )


def subentry_device(
    hass: HomeAssistant, entry: MyNasConfigEntry, subentry: ConfigSubentry, model: str
) -> DeviceInfo:
    """A device for a peer or a folder (a device belongs to exactly one subentry)."""
    return DeviceInfo(
        identifiers={device_identifier(entry.entry_id, subentry.subentry_id)},
        name=subentry.title,
        manufacturer="MyNAS",
        model=model,
        entry_type=DeviceEntryType.SERVICE,
        via_device_id=dr.async_get_device_id_by_identifier(
            hass, device_identifier(entry.entry_id), config_entry_id=entry.entry_id
        ),
    )


def pair_unique_id_prefix(entry_id: str, folder_id: str, peer_id: str) -> str:
    """What the unique id of every entity of one folder × peer pair starts with."""
    return f"{entry_id}_{folder_id}_{peer_id}_"


class _OnNodeDevice[C: NodeCoordinator | ReachCoordinator](CoordinatorEntity[C]):
    """An entity of the node's device, unique per entry and key."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: C, key: str) -> None:
        """Attach to the node's device, unique per entry and ``key``."""
        super().__init__(coordinator)
        entry = coordinator.config_entry
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_device_info = node_device(entry)


class _OnPeerDevice[C: NodeCoordinator | ReachCoordinator](_OnNodeDevice[C]):
    """An entity of a peer's device, unique per entry, peer and key."""

    def __init__(self, coordinator: C, peer: ConfigSubentry, key: str) -> None:
        """Attach to ``peer``'s device."""
        super().__init__(coordinator, f"{peer.subentry_id}_{key}")
        self.peer_id = peer.subentry_id
        self._attr_device_info = subentry_device(
            coordinator.hass, coordinator.config_entry, peer, "Peer"
        )


class NodeEntity(_OnNodeDevice[NodeCoordinator]):
    """An entity of the node's device."""


class PeerHostedEntity(_OnPeerDevice[NodeCoordinator]):
    """A figure about the space a peer uses on our disk, on the peer's device."""


class PeerStatusEntity(CoordinatorEntity[SyncCoordinator]):
    """A figure about a peer's reachability, on the peer's device."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: SyncCoordinator, peer: ConfigSubentry, key: str) -> None:
        """Attach to ``peer``'s device."""
        super().__init__(coordinator)
        entry = coordinator.config_entry
        self.peer_id = peer.subentry_id
        self._attr_unique_id = f"{entry.entry_id}_{peer.subentry_id}_{key}"
        self._attr_device_info = subentry_device(coordinator.hass, entry, peer, "Peer")

    @property
    def status(self) -> PeerStatus:
        """The peer's current status."""
        return self.coordinator.data.peers.get(self.peer_id) or PeerStatus()


class PairEntity(CoordinatorEntity[SyncCoordinator]):
    """An entity of one folder × peer pair, on the folder's device, named after the peer."""

    _attr_has_entity_name = True

    def __init__(
        self, coordinator: SyncCoordinator, folder: ConfigSubentry, peer: ConfigSubentry, key: str
    ) -> None:
        """Attach to ``folder``'s device; the name says which peer."""
        super().__init__(coordinator)
        entry = coordinator.config_entry
        self.pair = (folder.subentry_id, peer.subentry_id)
        self._attr_unique_id = (
            pair_unique_id_prefix(entry.entry_id, folder.subentry_id, peer.subentry_id) + key
        )
        self._attr_device_info = subentry_device(
            coordinator.hass, entry, folder, "Protected folder"
        )
        self._attr_translation_placeholders = {"peer": peer.title}

    @property
    def status(self) -> PairStatus:
        """The pair's current status."""
        return self.coordinator.data.pairs.get(self.pair) or PairStatus()


class ReachNodeEntity(_OnNodeDevice[ReachCoordinator]):
    """An entity about whether friends can reach this node, on the node's device."""


class ReachPeerEntity(_OnPeerDevice[ReachCoordinator]):
    """An entity about where a peer is reached, on the peer's device."""
