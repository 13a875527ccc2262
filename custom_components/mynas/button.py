"""Buttons: back a folder up to a peer now, or verify its copy there; check reachability."""

from __future__ import annotations

from homeassistant.components.button import ButtonEntity, ButtonEntityDescription
from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .coordinator import MyNasConfigEntry, SyncCoordinator
from .entity import PairEntity, ReachNodeEntity, add_per_pair
from .models import SyncKind
from .reach import ReachCoordinator

PARALLEL_UPDATES = 1

SYNC_NOW = ButtonEntityDescription(key="sync_now", translation_key="sync_now")
VERIFY = ButtonEntityDescription(key="verify", translation_key="verify")
CHECK_REACHABILITY = ButtonEntityDescription(
    key="check_reachability", translation_key="check_reachability"
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add "sync now" and "verify" for every folder × peer pair; the node's check button."""
    async_add_entities([ReachabilityButton(entry.runtime_data.reach)])
    syncs = entry.runtime_data.syncs
    add_per_pair(
        entry,
        async_add_entities,
        lambda folder, peer: [
            PairButton(syncs, folder, peer, description) for description in (SYNC_NOW, VERIFY)
        ],
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


class ReachabilityButton(ReachNodeEntity, ButtonEntity):
    """Asks every friend to dial our addresses back; the sensor and a repair issue tell."""

    entity_description = CHECK_REACHABILITY

    def __init__(self, coordinator: ReachCoordinator) -> None:
        """Create the node's "check reachability" button."""
        super().__init__(coordinator, CHECK_REACHABILITY.key)

    async def async_press(self) -> None:
        """Run the check (a few seconds: each friend dials with a short timeout)."""
        await self.coordinator.async_check()
