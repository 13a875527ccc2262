"""Runs every folder × peer pair at its times, tests peers, and keeps their state.

Decides *when* (schedule, retries with backoff, never two runs of one pair at once — the
engine's Node adds "one transfer per peer at a time"); the engine does the work on its own
event loop. Results become pair/peer state (entities), a ``mynas_sync_finished`` event, and
repair issues where the user can act.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
import enum
from functools import partial
import logging
from typing import Any

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.helpers.storage import Store
from homeassistant.util import dt as dt_util

from . import issues
from .const import (
    CONF_OVERDUE_HOURS,
    CONF_UNREACHABLE_HOURS,
    DEFAULT_OVERDUE_HOURS,
    DEFAULT_UNREACHABLE_HOURS,
    DOMAIN,
    EVENT_SYNC_FINISHED,
    PEER_PROBE_INTERVAL,
    SCHEDULER_TICK,
)
from .engine import (
    AuthRefused,
    HostKeyMismatch,
    MyNasError,
    PeerConfig,
    PeerUnreachable,
    Phase,
    ProbeResult,
    Progress,
    PushResult,
    QuotaExceeded,
    Reachability,
    StorageRootError,
    ThreadedNode,
    VerifyResult,
    check_root,
    fingerprint,
    format_bytes,
)
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
        node: ThreadedNode,
        folders: dict[str, FolderSetup],
        peers: dict[str, PeerConfig],
        options: dict[str, Any],
        *,
        node_id: str,
    ) -> None:
        """Manage ``folders`` × ``peers`` of the node ``entry_id`` (whose id is ``node_id``).

        Each run first checks that the storage root is still this node's disk: the
        coordinator notices a change within a minute, and no run may start before that.
        """
        self.hass = hass
        self.entry_id = entry_id
        self.node_id: str = node_id
        self.node_name = node_name
        self.node = node
        self.folders = folders
        self.peers = peers
        self.overdue_after = timedelta(
            hours=float(options.get(CONF_OVERDUE_HOURS, DEFAULT_OVERDUE_HOURS))
        )
        self.unreachable_after = timedelta(
            hours=float(options.get(CONF_UNREACHABLE_HOURS, DEFAULT_UNREACHABLE_HOURS))
        )
        self.data = SyncData()
        # False while the storage disk is missing or another one is mounted: no scheduled run.
        self.storage_ok = True
        self.storage_error: str | None = None
        self._store: Store[dict[str, Any]] = Store(hass, STORAGE_VERSION, f"{DOMAIN}.{entry_id}")
        self._tasks: dict[tuple[Pair, SyncKind], asyncio.Task[dict[str, Any]]] = {}
        # Never two runs of one pair at once (a verify waits for a running sync, and back).
        self._pair_locks: dict[Pair, asyncio.Lock] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        # Pairs inside a run: news from the engine (started, progress) may arrive late,
        # after the run's end, and must not bring a finished run back to life.
        self._active: set[Pair] = set()
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
        """Stop ticking, cancel what runs, and save state.

        The engine's side of a cancelled run unwinds on its own; the node's ``stop`` waits
        for it before it closes the index under it.
        """
        self._stopping = True
        for unsub in self._unsub:
            unsub()
        self._unsub.clear()
        if self._push_timer is not None:
            self._push_timer.cancel()
            self._push_timer = None
        running = [
            task for task in (*self._tasks.values(), *self._probes.values()) if not task.done()
        ]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self._store.async_save(self._stored())

    @callback
    def async_add_listener(self, update: Callable[[], None]) -> CALLBACK_TYPE:
        """Call ``update`` whenever pair or peer state changed."""
        self._listeners.append(update)
        return lambda: self._listeners.remove(update)

    @callback
    def set_storage_ok(self, ok: bool, error: str | None = None) -> None:
        """The storage disk checked out (or did not, and why): resume (or pause) runs."""
        self.storage_ok = ok
        self.storage_error = None if ok else error

    def _stored(self) -> dict[str, Any]:
        return {
            "pairs": {
                pair_key(*pair): status.as_stored() for pair, status in self.data.pairs.items()
            },
            "peers": {peer_id: status.as_stored() for peer_id, status in self.data.peers.items()},
        }

    def _save(self) -> None:
        if not self._stopping:
            self._store.async_delay_save(self._stored, _SAVE_DELAY)

    @callback
    def _changed(self, *, throttle: bool = False) -> None:
        if throttle:
            now = self.hass.loop.time()
            if now - self._last_push < _PROGRESS_UPDATES:
                if self._push_timer is None and not self._stopping:
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
        if self.storage_ok:
            for pair in self.pairs:
                if self.running(pair):
                    continue
                due = self.next_run(pair)
                if due is None or due <= now:
                    self.start(pair, SyncKind.SYNC)
        self._check_overdue(now)
        self._changed()

    def is_overdue(self, pair: Pair, now: datetime | None = None) -> bool:
        """True when the pair's last success is older than the threshold.

        A pair that never succeeded counts from its first attempt, so a new folder is not
        overdue at once, and one that keeps failing becomes overdue all the same.
        """
        status = self.data.pairs[pair]
        now = now or dt_util.utcnow()
        reference = status.last_success or status.first_attempt or status.last_attempt
        return reference is not None and now - reference > self.overdue_after

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
        """Start a run of the pair (or return the same kind of run already under way).

        A run of the other kind waits for the running one: never two runs of a pair at once.
        Raises HomeAssistantError while the node is stopping or its disk is missing.
        """
        key = (pair, kind)
        running = self._tasks.get(key)
        if running is not None and not running.done():
            return running
        if self._stopping:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="node_not_loaded",
                translation_placeholders={"node": self.node_name},
            )
        if not self.storage_ok:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="storage_unavailable",
                translation_placeholders={"node": self.node_name},
            )
        task = self.hass.async_create_background_task(
            self._run(pair, kind, **options), name=f"mynas {kind} {pair[0]} {pair[1]}"
        )
        self._tasks[key] = task

        def forget(done: asyncio.Task[dict[str, Any]]) -> None:
            if self._tasks.get(key) is done:
                del self._tasks[key]

        task.add_done_callback(forget)
        return task

    def running(self, pair: Pair) -> bool:
        """True while a run of the pair is queued or running."""
        return any(p == pair and not task.done() for (p, _), task in self._tasks.items())

    def _progress_sink(self, pair: Pair, verifying: bool) -> Callable[[Progress], None]:
        """What the engine reports a run's progress to (on its thread): relayed to here."""
        return self.node.relay(partial(self._on_progress, pair, verifying))

    @callback
    def _on_progress(self, pair: Pair, verifying: bool, progress: Progress) -> None:
        status = self.data.pairs.get(pair)
        if pair not in self._active or status is None or progress.phase is Phase.DONE:
            return
        status.progress = progress
        if verifying:
            status.state = SyncState.VERIFYING
        elif progress.phase is Phase.TRANSFERRING or progress.files_done or progress.bytes_done:
            # The engine may still be scanning, but data is moving: that is a transfer.
            status.state = SyncState.TRANSFERRING
        else:
            status.state = SyncState.SCANNING
        self._changed(throttle=True)

    @staticmethod
    def _resting(status: PairStatus) -> SyncState:
        return SyncState.ERROR if status.failures else SyncState.IDLE

    async def _run(self, pair: Pair, kind: SyncKind, **options: Any) -> dict[str, Any]:
        folder_id, peer_id = pair
        setup = self.folders[folder_id]
        peer = self.peers[peer_id]
        status = self.data.pairs.setdefault(pair, PairStatus())
        verifying = kind is SyncKind.VERIFY
        summary: dict[str, Any] = {
            "folder": setup.config.name,
            "peer": peer.name,
            "kind": kind.value,
        }
        async with self._pair_locks.setdefault(pair, asyncio.Lock()):
            started = dt_util.utcnow()
            if not await self._storage_checks_out():
                # Not the pair's fault: nothing counts against its schedule.
                summary["status"] = "failed"
                summary["error"] = self.storage_error or ""
                summary["duration"] = 0.0
                status.last_error = self.storage_error
                return self._finished(setup.config.name, peer, kind, summary)
            if not verifying:
                # Only syncs move the schedule; a verify in between changes nothing there.
                status.last_attempt = started
                status.first_attempt = status.first_attempt or started
            sink = self._progress_sink(pair, verifying)
            self._active.add(pair)
            try:
                if verifying:
                    self._on_started(pair, verifying)
                    verified: VerifyResult = await self.node.verify(
                        setup.config, peer_id, repair=bool(options.get("repair")), progress=sink
                    )
                    summary.update(verified.as_dict())
                    summary["status"] = (
                        "success" if verified.clean or verified.repair_complete else "mismatch"
                    )
                    self._seen(peer_id, dt_util.utcnow())
                else:
                    # Once the peer is free (the engine's one transfer per peer at a time).
                    on_start = self.node.relay(partial(self._on_started, pair, verifying))
                    synced: PushResult = await self.node.push(
                        setup.config, peer_id, sink, on_start=on_start
                    )
                    summary.update(synced.as_dict())
                    summary["status"] = "partial" if synced.error_count else "success"
                    self._succeeded(pair, synced)
            except asyncio.CancelledError:
                self._active.discard(pair)
                status.progress = None
                status.state = self._resting(status)
                self._changed()
                raise
            except Exception as err:  # a run always ends with a result
                if isinstance(err, MyNasError):
                    # Once per outage: the retries that follow say nothing new.
                    _LOGGER.log(
                        logging.DEBUG if status.failures and not verifying else logging.WARNING,
                        "%s of %s to %s failed: %s",
                        kind.capitalize(),
                        setup.config.name,
                        peer.name,
                        err,
                    )
                else:
                    _LOGGER.exception(
                        "Unexpected error in %s of %s to %s", kind, setup.config.name, peer.name
                    )
                summary["status"] = "failed"
                summary["error"] = str(err) or type(err).__name__
                self._failed(pair, err, count=not verifying)
            self._active.discard(pair)
            status.progress = None
            status.state = self._resting(status)
            summary["duration"] = round((dt_util.utcnow() - started).total_seconds(), 3)
        if summary["status"] in ("success", "partial") and not verifying:
            # Refresh "space we use there" now rather than at the next probe.
            self.probe(peer_id)
        return self._finished(setup.config.name, peer, kind, summary)

    def _finished(
        self, folder: str, peer: PeerConfig, kind: SyncKind, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Publish the end of a run: state saved, entities updated, the event fired."""
        self._check_overdue(dt_util.utcnow())
        self._save()
        self._changed()
        self.hass.bus.async_fire(
            EVENT_SYNC_FINISHED,
            {
                "entry_id": self.entry_id,
                "folder": folder,
                "peer": peer.name,
                "kind": kind.value,
                "status": summary["status"],
                "files": summary.get("files_sent", 0),
                "bytes": summary.get("bytes_sent", 0),
                "duration": summary["duration"],
                "error": summary.get("error"),
            },
        )
        return summary

    async def _storage_checks_out(self) -> bool:
        """Check (off the loop) that the storage root is still this node's disk."""
        try:
            await self.hass.async_add_executor_job(check_root, self.node.storage_root, self.node_id)
        except StorageRootError as err:
            self.set_storage_ok(False, str(err))
            return False
        return True

    @callback
    def _on_started(self, pair: Pair, verifying: bool) -> None:
        status = self.data.pairs.get(pair)
        if status is not None and pair in self._active:
            status.state = SyncState.VERIFYING if verifying else SyncState.SCANNING
            self._changed()

    def _succeeded(self, pair: Pair, result: PushResult) -> None:
        status = self.data.pairs[pair]
        if status.failures:
            _LOGGER.info(
                "Sync of %s to %s works again",
                self.folders[pair[0]].config.name,
                self.peers[pair[1]].name,
            )
        now = dt_util.utcnow()
        status.last_success = now
        status.failures = 0
        status.last_files_sent = result.files_sent
        status.last_bytes_sent = result.bytes_sent
        status.last_duration = round(result.seconds, 3)
        status.last_error = (
            f"{result.error_count} file(s) could not be sent, for example {result.errors[0]}"
            if result.error_count and result.errors
            else None
        )
        status.quota_refused = False
        issues.quota_refused(self.hass, pair[0], pair[1], None)
        self._seen(pair[1], now)

    def _failed(self, pair: Pair, err: Exception, *, count: bool = True) -> None:
        """Record a failed run; ``count`` it against the schedule (syncs, not verifies)."""
        status = self.data.pairs[pair]
        if count:
            status.failures += 1
        status.last_error = str(err) or type(err).__name__
        folder = self.folders[pair[0]].config.name
        peer = self.peers[pair[1]]
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
        elif isinstance(err, HostKeyMismatch):
            self._peer_problem(pair[1], Reachability.KEY_MISMATCH, str(err), err.presented_key)
        elif isinstance(err, AuthRefused):
            self._peer_problem(pair[1], Reachability.WAITING, str(err))
        elif isinstance(err, PeerUnreachable):
            self._peer_problem(pair[1], Reachability.UNREACHABLE, str(err))

    # --- peers -----------------------------------------------------------------------------

    def _seen(self, peer_id: str, when: datetime) -> None:
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        if status.last_seen is None or when > status.last_seen:
            status.last_seen = when
        status.reachability = Reachability.ONLINE
        status.down_since = None
        status.error = None
        status.presented_key = None
        issues.unreachable(self.hass, peer_id, self.peers[peer_id].name, None)
        issues.clear_key_changed(self.hass, peer_id)

    @callback
    def contact(self, peer_id: str, when: datetime) -> None:
        """The peer connected to us: it exists and has our key (it is not a reachability test)."""
        if self._stopping:
            return
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        if status.last_seen is None or when > status.last_seen:
            status.last_seen = when
            self._save()
            self._changed()

    def _peer_problem(
        self,
        peer_id: str,
        reachability: Reachability,
        error: str | None,
        presented_key: str | None = None,
    ) -> None:
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        peer = self.peers[peer_id]
        status.reachability = reachability
        status.error = error
        status.down_since = status.down_since or dt_util.utcnow()
        if reachability is Reachability.KEY_MISMATCH:
            # Security: nothing was sent; only the user can accept the new key.
            status.presented_key = presented_key
            issues.key_changed(
                self.hass,
                self.entry_id,
                peer_id,
                peer.name,
                fingerprint(peer.public_key),
                fingerprint(presented_key) if presented_key else None,
                presented_key,
            )
        self._check_unreachable(peer_id)

    def _check_unreachable(self, peer_id: str) -> None:
        """Raise "unreachable" once no answer came for long enough (else clear it).

        A wrong key has its own, critical issue; "waiting for them to add us" and "no
        answer" both mean the friend has something to do.
        """
        status = self.data.peers[peer_id]
        peer = self.peers[peer_id]
        since = status.down_since
        silent = dt_util.utcnow() - since if since is not None else None
        if (
            status.reachability in (Reachability.UNREACHABLE, Reachability.WAITING)
            and silent is not None
            and silent >= self.unreachable_after
        ):
            issues.unreachable(self.hass, peer_id, peer.name, silent)
        else:
            issues.unreachable(self.hass, peer_id, peer.name, None)

    @callback
    def _probe_all(self, _now: datetime) -> None:
        for peer_id in self.peers:
            self.probe(peer_id)

    def probe(self, peer_id: str) -> asyncio.Task[None]:
        """Test the connection to a peer in the background (one test at a time per peer)."""
        task = self._probes.get(peer_id)
        if task is None or task.done():
            task = self.hass.async_create_background_task(
                self._probe(peer_id), name=f"mynas probe {peer_id}"
            )
            self._probes[peer_id] = task

            def forget(done: asyncio.Task[None]) -> None:
                if self._probes.get(peer_id) is done:
                    del self._probes[peer_id]

            task.add_done_callback(forget)
        return task

    async def _probe(self, peer_id: str) -> None:
        try:
            result: ProbeResult = await self.node.probe(peer_id)
        except Exception as err:  # a failed test is a result, not a crash
            _LOGGER.exception("Testing the connection to %s failed", self.peers[peer_id].name)
            result = ProbeResult(Reachability.UNREACHABLE, error=str(err))
        status = self.data.peers.setdefault(peer_id, PeerStatus())
        now = dt_util.utcnow()
        status.last_probe = now
        if result.status is Reachability.ONLINE:
            self._seen(peer_id, now)
            status.used_there = result.used_there
            status.quota_there = result.quota_there
        else:
            self._peer_problem(peer_id, result.status, result.error, result.presented_key)
        self._save()
        self._changed()
