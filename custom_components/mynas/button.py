"""Buttons: back a folder up to a peer now, or verify its copy there."""

from __future__ import annotations

from homeassistant.components.button import ButtonEntity, ButtonEntityDescription
from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .const import SUBENTRY_FOLDER, SUBENTRY_PEER
from .coordinator import MyNasConfigEntry, SyncCoordinator
from .entity import PairEntity
from .models import SyncKind

PARALLEL_UPDATES = 1

SYNC_NOW = ButtonEntityDescription(key="sync_now", translation_key="sync_now")
VERIFY = ButtonEntityDescription(key="verify", translation_key="verify")


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add "sync now" and "verify" for every folder × peer pair."""
    runtime = entry.runtime_data
    peers = {
        sub.subentry_id: sub
        for sub in entry.subentries.values()
        if sub.subentry_type == SUBENTRY_PEER
    }
    for folder in entry.subentries.values():
        if folder.subentry_type == SUBENTRY_FOLDER:
            async_add_entities(
                [
                    PairButton(runtime.syncs, folder, peers[peer_id], description)
                    for (folder_id, peer_id) in runtime.manager.pairs
                    if folder_id == folder.subentry_id
                    for description in (SYNC_NOW, VERIFY)
                ],
                config_subentry_id=folder.subentry_id,
            )


class PairButton(PairEntity, ButtonEntity):
    """Starts a sync or a verify of one pair in the background (a running one is kept)."""

    def __init__(
        self,
        coordinator: SyncCoordinator,
        folder: ConfigSubentry,
        peer: ConfigSubentry,
        description: ButtonEntityDescription,
    ) -> None:
        """Create the button for ``description``."""
        super().__init__(coordinator, folder, peer, description.key)
        self.entity_description = description

    async def async_press(self) -> None:
        """Start the run; progress shows on the pair's sensors."""
        kind = SyncKind.SYNC if self.entity_description.key == SYNC_NOW.key else SyncKind.VERIFY
        self.coordinator.manager.start(self.pair, kind)
