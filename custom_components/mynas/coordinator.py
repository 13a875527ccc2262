"""Coordinators: the node's disk and hosted space (polled), sync and peer state (as it changes)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import CALLBACK_TYPE, HomeAssistant
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed
from homeassistant.util import dt as dt_util

from . import issues, texts
from .const import (
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_STORAGE_ROOT,
    DISK_SCAN_INTERVAL,
    DOMAIN,
    LOGGER,
    QUOTA_FULL_FROM,
    TRASH_CHECK_INTERVAL,
    TRASH_LARGE_SHARE,
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
        # A full jail's trash figures, and when they were taken (walking it takes a while).
        self._trash: dict[str, tuple[datetime, dict[str, Any]]] = {}

    async def _async_update_data(self) -> NodeData:
        entry = self.config_entry
        try:
            disk = await self.hass.async_add_executor_job(measure_root, self.root, self.node_id)
        except StorageRootError as err:
            # Scheduled runs wait: the index lives on that disk, and a folder path may now
            # show another disk's content.
            self._manager.set_storage_ok(False, str(err))
            issues.storage_problem(
                self.hass,
                entry.entry_id,
                entry.data[CONF_NODE_NAME],
                err.problem,
                err.path,
                [setup.config.name for setup in self._manager.folders.values()],
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
        await self._check_trash(hosted)
        return NodeData(disk=disk, hosted=hosted)

    async def _check_trash(self, hosted: dict[str, JailUsage]) -> None:
        """A friend's space here full, much of it trash: say so (their backups wait)."""
        now = dt_util.utcnow()
        peers = self._manager.peers
        for peer_id in set(self._trash) - set(hosted):
            del self._trash[peer_id]
        for peer_id, usage in hosted.items():
            full = usage.quota > 0 and usage.used + usage.reserved >= usage.quota * QUOTA_FULL_FROM
            if not full or peer_id not in peers:
                self._trash.pop(peer_id, None)
                issues.hosted_trash_full(self.hass, peer_id, None)
                continue
            known = self._trash.get(peer_id)
            if known is None or now - known[0] >= TRASH_CHECK_INTERVAL:
                try:
                    known = (now, await self._node.hosted_trash(peer_id))
                except (MyNasError, OSError, KeyError) as err:
                    LOGGER.debug("Could not measure the trash of %s: %s", peer_id, err)
                    continue
                self._trash[peer_id] = known
            report = known[1]
            trash = int(report["trash"])
            if trash < usage.used * TRASH_LARGE_SHARE:
                issues.hosted_trash_full(self.hass, peer_id, None)
                continue
            issues.hosted_trash_full(
                self.hass,
                peer_id,
                {
                    "peer": peers[peer_id].name,
                    "trash": texts.size(trash),
                    "quota": texts.size(usage.quota),
                    "days": str(report["trash_days"]),
                    "frees_at": _day(report["trash_oldest"], report["trash_days"]),
                    "until": _day(report["trash_newest"], report["trash_days_longest"]),
                },
            )


def _day(stamp: float | None, days: int) -> str:
    """When a trash part stamped ``stamp`` leaves, kept ``days`` days (``-``: no trash)."""
    if stamp is None:
        return texts.NONE
    return texts.since(dt_util.utc_from_timestamp(stamp + days * 86400))


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
