"""Runs every folder × peer pair at its times, tests peers, and keeps their state.

Decides *when* (schedule, retries with backoff, never two runs of one pair at once — the
engine's Node adds "one transfer per peer at a time"); the engine does the work on its own
event loop. Results become pair/peer state (entities), a ``mynas_sync_finished`` event, and
repair issues where the user can act.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
import dataclasses
from datetime import datetime, timedelta
import enum
import logging
from typing import Any

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.helpers.storage import Store
from homeassistant.util import dt as dt_util

from . import issues
from .const import (
    CONF_OVERDUE_HOURS,
    DEFAULT_OVERDUE_HOURS,
    DOMAIN,
    EVENT_SYNC_FINISHED,
    PEER_PROBE_INTERVAL,
    PEER_UNREACHABLE_ISSUE_AFTER,
    SCHEDULER_TICK,
)
from .engine.errors import (
    AuthRefused,
    HostKeyMismatch,
    MyNasError,
    PeerUnreachable,
    QuotaExceeded,
)
from .engine.identity import fingerprint
from .engine.loop_thread import EngineLoop
from .engine.node import Node, PeerConfig, ProbeResult, Reachability
from .engine.replicator import Phase, Progress, PushResult, VerifyResult
from .engine.units import format_bytes
from .models import FolderSetup, PairStatus, PeerStatus, SyncData, SyncState, pair_key
from .schedule import next_run

_LOGGER = logging.getLogger(__name__)

STORAGE_VERSION = 1
_SAVE_DELAY = 10
# Entities follow a running sync this often at most.
_PROGRESS_UPDATES = 1.0

type Pair = tuple[str, str]


class SyncKind(enum.StrEnum):
    """What a run does."""

    SYNC = "sync"
    VERIFY = "verify"


class SyncManager:
    """The scheduler and the keeper of pair and peer state for one node."""

    def __init__(
        self,
        hass: HomeAssistant,
        entry_id: str,
        node_name: str,
        engine: EngineLoop,
        node: Node,
        folders: dict[str, FolderSetup],
        peers: dict[str, PeerConfig],
        options: dict[str, Any],
    ) -> None:
        """Manage ``folders`` × ``peers`` of the node ``entry_id``."""
        self.hass = hass
        self.entry_id = entry_id
        self.node_name = node_name
        self.engine = engine
        self.node = node
        self.folders = folders
        self.peers = peers
        self.overdue_after = timedelta(
            hours=float(options.get(CONF_OVERDUE_HOURS, DEFAULT_OVERDUE_HOURS))
        )
        self.data = SyncData()
        self._store: Store[dict[str, Any]] = Store(hass, STORAGE_VERSION, f"{DOMAIN}.{entry_id}")
        self._tasks: dict[Pair, asyncio.Task[dict[str, Any]]] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._unsub: list[CALLBACK_TYPE] = []
        self._listeners: list[Callable[[], None]] = []
        self._last_push = 0.0
        self._push_timer: asyncio.TimerHandle | None = None
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def pairs(self) -> list[Pair]:
        """Every (folder id, peer id) that should be synced."""
        return [
            (folder_id, peer_id)
            for folder_id, setup in self.folders.items()
            for peer_id in setup.peers
            if peer_id in self.peers
        ]

    async def async_load(self) -> None:
        """Restore what the last run of Home Assistant knew."""
        stored = await self._store.async_load() or {}
        pairs = stored.get("pairs", {})
        for pair in self.pairs:
            saved = pairs.get(pair_key(*pair))
            self.data.pairs[pair] = PairStatus.from_stored(saved) if saved else PairStatus()
        saved_peers = stored.get("peers", {})
        for peer_id in self.peers:
            saved = saved_peers.get(peer_id)
            self.data.peers[peer_id] = PeerStatus.from_stored(saved) if saved else PeerStatus()

    @callback
    def async_start(self) -> None:
        """Start ticking: due syncs and peer tests."""
        self._unsub.append(async_track_time_interval(self.hass, self._tick, SCHEDULER_TICK))
        self._unsub.append(
            async_track_time_interval(self.hass, self._probe_all, PEER_PROBE_INTERVAL)
        )
        self._probe_all(dt_util.utcnow())
        self._tick(dt_util.utcnow())

    async def async_stop(self) -> None:
        """Stop ticking, cancel what runs, and save state."""
        self._stopping = True
        for unsub in self._unsub:
            unsub()
        self._unsub.clear()
        if self._push_timer is not None:
            self._push_timer.cancel()
            self._push_timer = None
        running = [*self._tasks.values(), *self._probes.values()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self._store.async_save(self._stored())

    @callback
    def async_add_listener(self, update: Callable[[], None]) -> CALLBACK_TYPE:
        """Call ``update`` whenever pair or peer state changed."""
        self._listeners.append(update)
        return lambda: self._listeners.remove(update)

    def _stored(self) -> dict[str, Any]:
        return {
            "pairs": {
                pair_key(*pair): status.as_stored() for pair, status in self.data.pairs.items()
            },
            "peers": {peer_id: status.as_stored() for peer_id, status in self.data.peers.items()},
        }

    def _save(self) -> None:
        self._store.async_delay_save(self._stored, _SAVE_DELAY)

    @callback
    def _changed(self, *, throttle: bool = False) -> None:
        if throttle:
            now = self.hass.loop.time()
            if now - self._last_push < _PROGRESS_UPDATES:
                if self._push_timer is None:
                    self._push_timer = self.hass.loop.call_later(
                        _PROGRESS_UPDATES, self._flush_changes
                    )
                return
        self._flush_changes()

    @callback
    def _flush_changes(self) -> None:
        if self._push_timer is not None:
            self._push_timer.cancel()
            self._push_timer = None
        self._last_push = self.hass.loop.time()
        for update in list(self._listeners):
            update()

    # --- the schedule ----------------------------------------------------------------------

    def next_run(self, pair: Pair) -> datetime | None:
        """When the pair runs next (None: as soon as possible)."""
        status = self.data.pairs[pair]
        return next_run(
            self.folders[pair[0]].schedule,
            last_attempt=dt_util.as_local(status.last_attempt) if status.last_attempt else None,
            failures=status.failures,
        )

    @callback
    def _tick(self, now: datetime) -> None:
        if self._stopping:
            return
        for pair in self.pairs:
            if pair in self._tasks:
                continue
            due = self.next_run(pair)
            if due is None or due <= now:
                self.start(pair, SyncKind.SYNC)
        self._check_overdue(now)
        self._changed()

    def is_overdue(self, pair: Pair, now: datetime | None = None) -> bool:
        """True when the pair's last success is older than the threshold (or never was)."""
        status = self.data.pairs.get(pair)
        if status is None:
            return False
        now = now or dt_util.utcnow()
        reference = status.last_success or self._first_seen(pair)
        return reference is not None and now - reference > self.overdue_after

    def _first_seen(self, pair: Pair) -> datetime | None:
        # Never synced: count from the first attempt, so a new folder isn't overdue at once.
        return self.data.pairs[pair].last_attempt

    def _check_overdue(self, now: datetime) -> None:
        for folder_id, setup in self.folders.items():
            late = [
                self.peers[peer_id].name
                for peer_id in setup.peers
                if peer_id in self.peers and self.is_overdue((folder_id, peer_id), now)
            ]
            issues.overdue(
                self.hass,
                folder_id,
                {
                    "folder": setup.config.name,
                    "peers": ", ".join(late),
                    "hours": f"{self.overdue_after.total_seconds() / 3600:g}",
                }
                if late
                else None,
            )

    # --- runs ------------------------------------------------------------------------------

    def start(self, pair: Pair, kind: SyncKind, **options: Any) -> asyncio.Task[dict[str, Any]]:
        """Start a run of the pair (or return the one already running)."""
        running = self._tasks.get(pair)
        if running is not None:
            return running
        task = self.hass.async_create_background_task(
            self._run(pair, kind, **options), name=f"mynas {kind} {pair[0]} {pair[1]}"
        )
        self._tasks[pair] = task
        task.add_done_callback(lambda _: self._tasks.pop(pair, None))
        return task

    def running(self, pair: Pair) -> bool:
        """True while a run of the pair is queued or running."""
        return pair in self._tasks

    async def _in_engine[T](self, coro: Coroutine[Any, Any, T]) -> T:
        return await self.engine.run(coro)

    def _progress_sink(self, pair: Pair, verifying: bool) -> Callable[[Progress], None]:
        loop = self.hass.loop

        def on_progress(progress: Progress) -> None:  # called on the engine's loop
            snapshot = dataclasses.replace(progress)
            loop.call_soon_threadsafe(self._on_progress, pair, snapshot, verifying)

        return on_progress

    @callback
    def _on_progress(self, pair: Pair, progress: Progress, verifying: bool) -> None:
        status = self.data.pairs.get(pair)
        if status is None or progress.phase is Phase.DONE:
            return
        status.progress = progress
        if verifying:
            status.state = SyncState.VERIFYING
        elif progress.phase in (Phase.SCANNING, Phase.CONNECTING):
            status.state = SyncState.SCANNING
        else:
            status.state = SyncState.TRANSFERRING
        self._changed(throttle=True)

    async def _run(self, pair: Pair, kind: SyncKind, **options: Any) -> dict[str, Any]:
        folder_id, peer_id = pair
        setup = self.folders[folder_id]
        peer = self.peers[peer_id]
        status = self.data.pairs.setdefault(pair, PairStatus())
        verifying = kind == SyncKind.VERIFY
        loop = self.hass.loop

        def on_start() -> None:  # called on the engine's loop once the peer is free
            loop.call_soon_threadsafe(self._on_started, pair, verifying)

        started = dt_util.utcnow()
        status.last_attempt = started
        summary: dict[str, Any] = {
            "folder": setup.config.name,
            "peer": peer.name,
            "kind": kind,
        }
        sink = self._progress_sink(pair, verifying)
        try:
            if verifying:
                on_start()
                verified: VerifyResult = await self._in_engine(
                    self.node.verify(
                        setup.config,
                        peer_id,
                        repair=bool(options.get("repair")),
                        progress=sink,
                    )
                )
                summary.update(verified.as_dict())
                summary["status"] = "success" if verified.clean or verified.repaired else "mismatch"
            else:
                pushed: PushResult = await self._in_engine(
                    self.node.push(setup.config, peer_id, sink, on_start=on_start)
                )
                summary.update(pushed.as_dict())
                summary["status"] = "success"
                self._succeeded(pair, pushed)
        except asyncio.CancelledError:
            status.state = SyncState.IDLE
            status.progress = None
            self._changed()
            raise
        except MyNasError as err:
            summary["status"] = "failed"
            summary["error"] = str(err)
            self._failed(pair, err)
        finally:
            status.progress = None
        summary["duration"] = round((dt_util.utcnow() - started).total_seconds(), 3)
        if status.state is not SyncState.ERROR:
            status.state = SyncState.IDLE
        self._save()
        self._changed()
        self.hass.bus.async_fire(
            EVENT_SYNC_FINISHED,
            {
                "entry_id": self.entry_id,
                "folder": setup.config.name,
                "peer": peer.name,
                "kind": kind,
                "status": summary["status"],
                "files": summary.get("files_sent", 0),
                "bytes": summary.get("bytes_sent", 0),
                "duration": summary["duration"],
                "error": summary.get("error"),
            },
        )
        return summary

    @callback
    def _on_started(self, pair: Pair, verifying: bool) -> None:
        status = self.data.pairs.get(pair)
        if status is not None:
            status.state = SyncState.VERIFYING if verifying else SyncState.SCANNING
            self._changed()

    def _succeeded(self, pair: Pair, result: PushResult) -> None:
        status = self.data.pairs[pair]
        now = dt_util.utcnow()
        status.last_success = now
        status.failures = 0
        status.state = SyncState.IDLE
        status.last_files_sent = result.files_sent
        status.last_bytes_sent = result.bytes_sent
        status.last_duration = round(result.seconds, 3)
        status.last_error = None
        status.quota_refused = False
        issues.quota_refused(self.hass, pair[0], pair[1], None)
        self._seen(pair[1], now)

    def _failed(self, pair: Pair, err: MyNasError) -> None:
        status = self.data.pairs[pair]
        status.failures += 1
        status.state = SyncState.ERROR
        status.last_error = str(err)
        folder = self.folders[pair[0]].config.name
        peer = self.peers[pair[1]]
        _LOGGER.warning("Sync of %s to %s failed: %s", folder, peer.name, err)
        if isinstance(err, QuotaExceeded):
            status.quota_refused = True
            issues.quota_refused(
                self.hass,
                pair[0],
                pair[1],
                {
                    "folder": folder,
                    "peer": peer.name,
                    "needed": format_bytes(err.needed),
                    "available": format_bytes(err.available),
                },
            )
        elif isinstance(err, (HostKeyMismatch, AuthRefused, PeerUnreachable)):
            self._peer_problem(pair[1], err)

    # --- peers -----------------------------------------------------------------------------

    def _seen(self, peer_id: str, when: datetime) -> None:
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        if status.last_seen is None or when > status.last_seen:
            status.last_seen = when
        status.reachability = Reachability.ONLINE
        status.error = None
        status.presented_key = None
        issues.unreachable(self.hass, peer_id, self.peers[peer_id].name, None)
        issues.clear_key_changed(self.hass, peer_id)

    @callback
    def contact(self, peer_id: str, when: datetime) -> None:
        """The peer connected to us: it exists and has our key (it is not a reachability test)."""
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        if status.last_seen is None or when > status.last_seen:
            status.last_seen = when
            self._save()
            self._changed()

    def _peer_problem(self, peer_id: str, err: MyNasError) -> None:
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        peer = self.peers[peer_id]
        status.error = str(err)
        if isinstance(err, HostKeyMismatch):
            status.reachability = Reachability.KEY_MISMATCH
            status.presented_key = err.presented_key
            issues.key_changed(
                self.hass,
                self.entry_id,
                peer_id,
                peer.name,
                fingerprint(peer.public_key),
                err.presented,
                err.presented_key,
            )
        elif isinstance(err, AuthRefused):
            status.reachability = Reachability.WAITING
        else:
            status.reachability = Reachability.UNREACHABLE
        self._check_unreachable(peer_id)

    def _check_unreachable(self, peer_id: str) -> None:
        status = self.data.peers[peer_id]
        peer = self.peers[peer_id]
        if status.reachability is Reachability.ONLINE:
            issues.unreachable(self.hass, peer_id, peer.name, None)
            return
        if status.last_seen is None:
            return
        silent = dt_util.utcnow() - status.last_seen
        if silent > PEER_UNREACHABLE_ISSUE_AFTER:
            issues.unreachable(self.hass, peer_id, peer.name, silent.days)

    @callback
    def _probe_all(self, _now: datetime) -> None:
        if self._stopping:
            return
        for peer_id in self.peers:
            if peer_id not in self._probes:
                self.probe(peer_id)

    def probe(self, peer_id: str) -> asyncio.Task[None]:
        """Test the connection to a peer in the background."""
        task = self._probes.get(peer_id)
        if task is None:
            task = self.hass.async_create_background_task(
                self._probe(peer_id), name=f"mynas probe {peer_id}"
            )
            self._probes[peer_id] = task
            task.add_done_callback(lambda _: self._probes.pop(peer_id, None))
        return task

    async def _probe(self, peer_id: str) -> None:
        result: ProbeResult = await self._in_engine(self.node.probe(peer_id))
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        now = dt_util.utcnow()
        status.last_probe = now
        if result.status is Reachability.ONLINE:
            self._seen(peer_id, now)
            status.used_there = result.used_there
            status.quota_there = result.quota_there
        else:
            status.reachability = result.status
            status.error = result.error
            if result.status is Reachability.KEY_MISMATCH:
                peer = self.peers[peer_id]
                issues.key_changed(
                    self.hass,
                    self.entry_id,
                    peer_id,
                    peer.name,
                    fingerprint(peer.public_key),
                    fingerprint(result.presented_key) if result.presented_key else None,
                    result.presented_key,
                )
            self._check_unreachable(peer_id)
        self._save()
        self._changed()
