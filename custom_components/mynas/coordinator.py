"""Coordinators: the node's disk and hosted space (polled), sync and peer state (as it changes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import CALLBACK_TYPE, HomeAssistant
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed

from . import issues
from .const import (
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_STORAGE_ROOT,
    DISK_SCAN_INTERVAL,
    DOMAIN,
    LOGGER,
)
from .engine import (
    DiskUsage,
    EngineLoop,
    JailUsage,
    MyNasError,
    StorageRootError,
    ThreadedNode,
    measure_root,
)
from .models import SyncData

if TYPE_CHECKING:
    from .reach import ReachCoordinator
    from .sync_manager import SyncManager


@dataclass(slots=True)
class MyNasRuntimeData:
    """What a loaded node entry holds while it runs."""

    node: ThreadedNode
    node_data: NodeCoordinator
    syncs: SyncCoordinator
    manager: SyncManager
    reach: ReachCoordinator

    @property
    def engine(self) -> EngineLoop:
        """The engine's loop thread, the node's (to see whether it still runs)."""
        return self.node.engine


type MyNasConfigEntry = ConfigEntry[MyNasRuntimeData]


@dataclass(frozen=True, slots=True)
class NodeData:
    """The node's disk, and the space each peer uses on it (by peer id)."""

    disk: DiskUsage
    hosted: dict[str, JailUsage]

    @property
    def hosted_total(self) -> int:
        """Space all peers use here, trash included."""
        return sum(usage.used for usage in self.hosted.values())


class NodeCoordinator(DataUpdateCoordinator[NodeData]):
    """Polls the disk and the hosted space; fails (entities unavailable) without the disk."""

    config_entry: MyNasConfigEntry

    def __init__(
        self,
        hass: HomeAssistant,
        entry: MyNasConfigEntry,
        node: ThreadedNode,
        manager: SyncManager,
    ) -> None:
        """Poll the disk of ``entry``'s storage root; pause ``manager`` while it is gone."""
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=f"{DOMAIN} node",
            update_interval=DISK_SCAN_INTERVAL,
        )
        self._node = node
        self._manager = manager
        self.root: str = entry.data[CONF_STORAGE_ROOT]
        self.node_id: str = entry.data[CONF_NODE_ID]

    async def _async_update_data(self) -> NodeData:
        entry = self.config_entry
        try:
            disk = await self.hass.async_add_executor_job(measure_root, self.root, self.node_id)
        except StorageRootError as err:
            # Scheduled runs wait: the index lives on that disk, and a folder path may now
            # show another disk's content.
            self._manager.set_storage_ok(False, str(err))
            issues.storage_problem(
                self.hass, entry.entry_id, entry.data[CONF_NODE_NAME], err.problem, err.path
            )
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key=err.problem.value,
                translation_placeholders={"path": err.path},
            ) from err
        issues.storage_problem(
            self.hass, entry.entry_id, entry.data[CONF_NODE_NAME], None, self.root
        )
        self._manager.set_storage_ok(True)
        try:
            hosted = await self._node.hosted()
        except (MyNasError, OSError, RuntimeError) as err:  # RuntimeError: the engine stopped
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key="hosted_unreadable",
                translation_placeholders={"error": str(err) or type(err).__name__},
            ) from err
        return NodeData(disk=disk, hosted=hosted)


class SyncCoordinator(DataUpdateCoordinator[SyncData]):
    """Hands pair and peer state to entities whenever the sync manager changes it."""

    config_entry: MyNasConfigEntry

    def __init__(self, hass: HomeAssistant, entry: MyNasConfigEntry, manager: SyncManager) -> None:
        """Follow ``manager``; no polling (the manager ticks every minute)."""
        super().__init__(hass, LOGGER, config_entry=entry, name=f"{DOMAIN} syncs")
        self.manager = manager
        self._unsub_manager: CALLBACK_TYPE | None = manager.async_add_listener(
            lambda: self.async_set_updated_data(manager.data)
        )

    async def async_shutdown(self) -> None:
        """Stop following the manager, then shut down as any coordinator (idempotent)."""
        if self._unsub_manager is not None:
            self._unsub_manager()
            self._unsub_manager = None
        await super().async_shutdown()

    async def _async_update_data(self) -> SyncData:
        return self.manager.data
