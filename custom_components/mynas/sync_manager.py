"""One node's syncs: the parts that run, schedule, remember and watch, put together.

Each part is a module of its own: ``runs`` (a sync or verify of a folder × peer pair),
``scheduler`` (when a pair is due, when it is overdue), ``persistence`` (what survives a
restart), ``updates`` (how the entities hear of changes), ``peer_prober`` (what we know
of each peer) and ``folder_watch`` (syncs after changes). ``SyncManager`` builds them for
one node and is what the rest of the integration talks to: entities, services, diagnostics
and the coordinators.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.util import dt as dt_util

from . import issues, texts
from .const import (
    CONF_ENCRYPTED,
    CONF_OVERDUE_HOURS,
    CONF_UNREACHABLE_HOURS,
    CONF_VERIFY_DAYS,
    DEFAULT_OVERDUE_HOURS,
    DEFAULT_UNREACHABLE_HOURS,
    DEFAULT_VERIFY_DAYS,
)
from .engine import PeerConfig, Progress, ThreadedNode
from .folder_watch import FolderWatcher, Watched
from .models import FolderSetup, Pair, SyncContext, SyncData, SyncKind
from .peer_prober import PeerProber
from .persistence import SyncStore
from .runs import Runs
from .scheduler import Overdue, Scheduler
from .updates import EntityUpdates


def _hours(options: dict[str, Any], key: str, default: float) -> timedelta:
    return timedelta(hours=float(options.get(key, default)))


def verify_every(options: dict[str, Any]) -> timedelta | None:
    """How often each pair is verified, from the node's options (None: never)."""
    days = float(options.get(CONF_VERIFY_DAYS, DEFAULT_VERIFY_DAYS) or 0)
    return timedelta(days=days) if days > 0 else None


class SyncManager:
    """The syncs of one node: its pairs' runs, their schedule, state and peers."""

    def __init__(
        self,
        hass: HomeAssistant,
        entry_id: str,
        node_name: str,
        node: ThreadedNode,
        folders: dict[str, FolderSetup],
        peers: dict[str, PeerConfig],
        options: dict[str, Any],
        *,
        node_id: str,
    ) -> None:
        """Manage ``folders`` × ``peers`` of the node ``entry_id`` (whose id is ``node_id``).

        Nothing runs before ``async_start``.
        """
        data = SyncData()
        self.context = SyncContext(
            hass,
            entry_id,
            node,
            folders,
            peers,
            data,
            store=SyncStore(hass, entry_id, data),
            updates=EntityUpdates(hass),
        )
        self.prober = PeerProber(
            self.context, _hours(options, CONF_UNREACHABLE_HOURS, DEFAULT_UNREACHABLE_HOURS)
        )
        self.overdue = Overdue(
            self.context, _hours(options, CONF_OVERDUE_HOURS, DEFAULT_OVERDUE_HOURS)
        )
        self.runs = Runs(
            self.context,
            node_name=node_name,
            node_id=node_id,
            overdue=self.overdue,
            prober=self.prober,
        )
        self.scheduler = Scheduler(
            self.context, self.overdue, self.runs, verify_every=verify_every(options)
        )
        self.watcher = FolderWatcher(
            hass,
            {
                folder_id: Watched(setup.config.path, setup.watch_interval)
                for folder_id, setup in folders.items()
                if setup.watch_interval is not None
            },
            self._sync_changed,
        )
        self.runs.on_folder_checked = self._folder_checked
        self.runs.on_converted = self._converted
        self.runs.on_finished = self.scheduler.refresh_next_verify
        self._watch_start: asyncio.Task[None] | None = None

    @property
    def folders(self) -> dict[str, FolderSetup]:
        """The node's protected folders, by id."""
        return self.context.folders

    @property
    def peers(self) -> dict[str, PeerConfig]:
        """The node's peers, by id."""
        return self.context.peers

    @property
    def data(self) -> SyncData:
        """The live state of every pair and peer."""
        return self.context.data

    @property
    def pairs(self) -> list[Pair]:
        """Every (folder id, peer id) that should be synced."""
        return self.context.pairs

    @property
    def overdue_after(self) -> timedelta:
        """How old a pair's last success may get before its backup is overdue."""
        return self.overdue.after

    @property
    def unreachable_after(self) -> timedelta:
        """How long a peer may stay silent before it is reported unreachable."""
        return self.prober.unreachable_after

    @property
    def storage_ok(self) -> bool:
        """False while the storage disk is missing or another one is mounted."""
        return self.runs.storage_ok

    # --- lifecycle -------------------------------------------------------------------------

    async def async_load(self) -> None:
        """Restore what the last run of Home Assistant knew."""
        await self.context.store.async_load(self.pairs, list(self.peers))
        for pair in self.pairs:  # until the index is read (``async_load_kinds``)
            self.data.pairs[pair].sealed = self.folders[pair[0]].config.encrypted

    async def async_load_kinds(self) -> None:
        """Read from the node's index (once it started) whether each copy is sealed."""
        await self.runs.load_kinds()

    @callback
    def async_start(self) -> None:
        """Start ticking: peer tests now and every few minutes, due syncs now and every minute."""
        self.scheduler.async_start()
        self._watch_start = self.context.hass.async_create_background_task(
            self.watcher.async_start(), name="mynas folder watch"
        )
        self.prober.async_start()
        self.prober.probe_all()
        self._folder_issues()
        self.scheduler.tick(dt_util.utcnow())

    @callback
    def _folder_issues(self) -> None:
        """Raise each plain folder's "readable by your friends" issue; forget stale ones."""
        keep = {f"verify_damage_{folder_id}_{peer_id}" for folder_id, peer_id in self.pairs}
        for folder_id, setup in self.folders.items():
            peers = [self.peers[p].name for p in setup.peers if p in self.peers]
            if setup.config.encrypted or not peers:
                continue
            keep.add(f"convert_plain_{folder_id}")
            # Converted everywhere, but stopped before it was stored so: store it now (soon,
            # once the node listens for the change that reloads it).
            self.context.hass.loop.call_soon(self._converted, folder_id)
            issues.plain_copies(
                self.context.hass,
                self.context.entry_id,
                folder_id,
                {"folder": setup.config.name, "peers": texts.names(peers)},
            )
        issues.clear_stale_folder_issues(self.context.hass, self.context.entry_id, keep)

    @callback
    def _converted(self, folder_id: str) -> None:
        """A pair's conversion is done: once all the folder's are, store it encrypted.

        That changes the folder's subentry, which reloads the node.
        """
        setup = self.folders.get(folder_id)
        if setup is None or setup.config.encrypted:
            return
        pairs = [pair for pair in self.pairs if pair[0] == folder_id]
        if not pairs or not all(
            self.data.pairs[pair].sealed and not self.data.pairs[pair].converting for pair in pairs
        ):
            return
        hass = self.context.hass
        entry = hass.config_entries.async_get_entry(self.context.entry_id)
        subentry = entry.subentries.get(folder_id) if entry is not None else None
        if entry is None or subentry is None:
            return
        issues.plain_copies(hass, self.context.entry_id, folder_id, None)
        hass.config_entries.async_update_subentry(
            entry, subentry, data={**subentry.data, CONF_ENCRYPTED: True}
        )

    async def async_stop(self) -> None:
        """Stop ticking, cancel what runs, and save state.

        The engine's side of a cancelled run unwinds on its own; the node's ``stop`` waits
        for it before it closes the index under it.
        """
        if self._watch_start is not None:
            await asyncio.gather(self._watch_start, return_exceptions=True)
        await self.watcher.async_stop()
        checking = self.scheduler.stop()
        self.context.updates.stop()
        self.context.store.stop()
        running: list[asyncio.Task[Any]] = [*self.runs.stop(), *self.prober.stop(), *checking]
        await asyncio.gather(*running, return_exceptions=True)
        await self.context.store.async_save()

    # --- what the rest of the integration asks -----------------------------------------------

    @callback
    def async_add_listener(self, update: Callable[[], None]) -> CALLBACK_TYPE:
        """Call ``update`` whenever pair or peer state changed."""
        return self.context.updates.add_listener(update)

    @callback
    def set_storage_ok(self, ok: bool, error: str | None = None) -> None:
        """The storage disk checked out (or did not, and why): resume (or pause) runs."""
        self.runs.set_storage_ok(ok, error)

    def start(self, pair: Pair, kind: SyncKind, **options: Any) -> asyncio.Task[dict[str, Any]]:
        """Start a run of the pair (or return the same kind of run already under way)."""
        return self.runs.start(pair, kind, **options)

    def running(self, pair: Pair, kind: SyncKind | None = None) -> bool:
        """True while a run of the pair (of ``kind``, if given) is queued or running."""
        return self.runs.running(pair, kind)

    def next_run(self, pair: Pair) -> datetime | None:
        """When the pair runs next (None: as soon as possible)."""
        return self.scheduler.next_run(pair)

    def is_overdue(self, pair: Pair, now: datetime | None = None) -> bool:
        """True when the pair's last success is older than the threshold."""
        return self.overdue.is_overdue(pair, now)

    def probe(self, peer_id: str) -> asyncio.Task[None]:
        """Test the connection to a peer in the background (one test at a time per peer)."""
        return self.prober.probe(peer_id)

    @callback
    def contact(self, peer_id: str, when: datetime) -> None:
        """The peer connected to us: it exists and has our key (it is not a reachability test)."""
        self.prober.contact(peer_id, when)

    @callback
    def _sync_changed(self, folder_id: str) -> None:
        """The folder changed (and settled): sync it to each of its peers now."""
        setup = self.folders.get(folder_id)
        if setup is None or not self.runs.storage_ok:
            return
        busy = False
        for peer_id in setup.peers:
            if peer_id not in self.peers:
                continue
            if self.runs.running((folder_id, peer_id)):
                busy = True  # its scan may have passed the change already
            else:
                self.runs.start((folder_id, peer_id), SyncKind.SYNC)
        if busy:
            self.watcher.again(folder_id)

    async def _folder_checked(self, folder_id: str, present: bool) -> None:
        """Watch a folder while it is there; stop while it is not (its disk unplugged)."""
        if present:
            await self.watcher.async_resume(folder_id)
        else:
            await self.watcher.async_suspend(folder_id)

    def _progress_sink(self, pair: Pair, verifying: bool) -> Callable[[Progress], None]:
        """What the engine reports a run's progress to (a test feeds it reports directly)."""
        return self.runs.progress_sink(pair, verifying)
