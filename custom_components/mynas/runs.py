"""Runs of a folder × peer pair: a sync, a verify or a conversion, one at a time.

A conversion sends a plain replica again encrypted (``ThreadedNode.convert``); once that
copy is whole the plain one goes to the friend's trash. A sync of a pair whose conversion
was cut short takes it up again, and a pair already converted syncs encrypted even while
its folder is still plain (its other peers not converted yet): pushing plain onto it would
be refused (``ReplicaKindMismatch``). A verify records when it ran and what it found; host
damage raises a repair issue saying how much was repaired.

A run first checks that the storage root is still this node's disk, then awaits the
engine (its ``ThreadedNode``, which adds "one transfer per peer at a time") and turns what
it reports into the pair's state, a ``mynas_sync_finished`` event and the repair issues a
user can act on. Never two runs of one pair at once: a verify waits for a running sync.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
import dataclasses
from functools import partial
import logging
from typing import Any

from homeassistant.core import callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.util import dt as dt_util

from . import issues, texts
from .const import DOMAIN, EVENT_SYNC_FINISHED
from .engine import (
    AuthRefused,
    HostKeyMismatch,
    MassChangeHeld,
    MyNasError,
    PeerConfig,
    PeerDiskFull,
    PeerUnreachable,
    Phase,
    Progress,
    PushResult,
    QuotaExceeded,
    SourceMissing,
    StorageRootError,
    VerifyResult,
    check_root,
)
from .models import ErrorKind, Pair, PairStatus, SyncContext, SyncKind, SyncState
from .peer_prober import PeerProber
from .scheduler import Overdue

_LOGGER = logging.getLogger(__name__)


def error_kind(err: BaseException) -> ErrorKind:
    """What a failed run's error means for the household."""
    if isinstance(err, PeerUnreachable):
        return ErrorKind.UNREACHABLE
    if isinstance(err, AuthRefused):
        return ErrorKind.NOT_ADDED
    if isinstance(err, HostKeyMismatch):
        return ErrorKind.KEY_CHANGED
    if isinstance(err, (QuotaExceeded, PeerDiskFull)):
        return ErrorKind.NO_ROOM
    if isinstance(err, StorageRootError):
        return ErrorKind.DISK_MISSING
    if isinstance(err, SourceMissing):
        return ErrorKind.FOLDER_MISSING
    if isinstance(err, MassChangeHeld):
        return ErrorKind.HELD
    return ErrorKind.FAILED


class Runs:
    """Starts, tracks and concludes the runs of one node's pairs."""

    def __init__(
        self,
        context: SyncContext,
        *,
        node_name: str,
        node_id: str,
        overdue: Overdue,
        prober: PeerProber,
    ) -> None:
        """Run the context's pairs on its node (called ``node_name``, whose id is ``node_id``)."""
        self._context = context
        self._hass = context.hass
        self._node = context.node
        self._pairs = context.data.pairs
        self._node_name = node_name
        self._node_id = node_id
        self._overdue = overdue
        self._prober = prober
        self._updates = context.updates
        # False while the storage disk is missing or another one is mounted: no run starts.
        self.storage_ok = True
        self.storage_error: str | None = None
        self._tasks: dict[tuple[Pair, SyncKind], asyncio.Task[dict[str, Any]]] = {}
        # Never two runs of one pair at once (a verify waits for a running sync, and back).
        self._pair_locks: dict[Pair, asyncio.Lock] = {}
        # Pairs inside a run: news from the engine (started, progress) may arrive late,
        # after the run's end, and must not bring a finished run back to life.
        self._active: set[Pair] = set()
        self._stopping = False
        # Told each folder check's outcome (folder id, whether it is there): the watcher.
        self.on_folder_checked: Callable[[str, bool], Awaitable[None]] | None = None
        # Told when a pair's conversion finished (the folder id): the folder may be done.
        self.on_converted: Callable[[str], None] | None = None
        # Called at the end of every run, before the entities hear of it (the scheduler).
        self.on_finished: Callable[[], None] | None = None

    @callback
    def stop(self) -> list[asyncio.Task[dict[str, Any]]]:
        """Start nothing more; cancel the runs under way and return them (to wait for)."""
        self._stopping = True
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        return running

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
                translation_placeholders={"node": self._node_name},
            )
        if not self.storage_ok:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="storage_unavailable",
                translation_placeholders={"node": self._node_name},
            )
        task = self._hass.async_create_background_task(
            self._run(pair, kind, **options), name=f"mynas {kind} {pair[0]} {pair[1]}"
        )
        self._tasks[key] = task

        def forget(done: asyncio.Task[dict[str, Any]]) -> None:
            if self._tasks.get(key) is done:
                del self._tasks[key]

        task.add_done_callback(forget)
        return task

    def running(self, pair: Pair, kind: SyncKind | None = None) -> bool:
        """True while a run of the pair (of ``kind``, if given) is queued or running."""
        return any(
            p == pair and kind in (None, k) and not task.done()
            for (p, k), task in self._tasks.items()
        )

    async def load_kinds(self) -> None:
        """Read from the index whether each pair's copy is sealed (after the node started)."""
        for pair in self._context.pairs:
            await self._read_kind(pair)

    async def _read_kind(self, pair: Pair) -> None:
        """Whether the pair's copy is sealed: as the index says, else as its folder is set up."""
        status = self._pairs.get(pair)
        setup = self._context.folders.get(pair[0])
        if status is None or setup is None:
            return
        try:
            sealed = await self._hass.async_add_executor_job(
                self._node.index.sealed, setup.config.name, pair[1]
            )
        except Exception:  # the index is on the disk, which may be away
            _LOGGER.debug("Could not read the kind of %s's copy", setup.config.name)
            return
        status.sealed = setup.config.encrypted if sealed is None else sealed

    def progress_sink(self, pair: Pair, verifying: bool) -> Callable[[Progress], None]:
        """What the engine reports a run's progress to (on its thread): relayed to here."""
        return self._node.relay(partial(self._on_progress, pair, verifying))

    @callback
    def _on_progress(self, pair: Pair, verifying: bool, progress: Progress) -> None:
        status = self._pairs.get(pair)
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
        self._updates.changed(throttle=True)

    @staticmethod
    def _resting(status: PairStatus) -> SyncState:
        return SyncState.ERROR if status.failures else SyncState.IDLE

    async def _run(self, pair: Pair, kind: SyncKind, **options: Any) -> dict[str, Any]:
        folder_id, peer_id = pair
        setup = self._context.folders[folder_id]
        peer = self._context.peers[peer_id]
        status = self._pairs.setdefault(pair, PairStatus())
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
                status.last_error_kind = ErrorKind.DISK_MISSING
                return self._finished(setup.config.name, peer, kind, summary)
            if not verifying:
                # Only syncs move the schedule; a verify in between changes nothing there.
                status.last_attempt = started
                status.first_attempt = status.first_attempt or started
            sink = self.progress_sink(pair, verifying)
            self._active.add(pair)
            converting = kind is SyncKind.CONVERT or (not verifying and status.converting)
            if kind is SyncKind.CONVERT and not status.converting:
                # Saved before the engine starts: the index calls the pair sealed from its
                # first step on, and a restart must go on with the conversion, not push plain.
                status.converting = True
                await self._context.store.async_save()
            try:
                if converting:
                    self._on_started(pair, verifying)
                    converted: PushResult = await self._node.convert(setup.config, peer_id, sink)
                    summary.update(converted.as_dict())
                    complete = converted.replaced_plain
                    summary["status"] = "success" if complete else "partial"
                    if complete:
                        status.converting = False
                    self._succeeded(pair, converted)
                elif verifying:
                    self._on_started(pair, verifying)
                    verified: VerifyResult = await self._node.verify(
                        setup.config, peer_id, repair=bool(options.get("repair")), progress=sink
                    )
                    summary.update(verified.as_dict())
                    summary["status"] = (
                        "success" if verified.clean or verified.repair_complete else "mismatch"
                    )
                    self._verified(pair, verified)
                    self._prober.seen(peer_id, dt_util.utcnow())
                else:
                    # Once the peer is free (the engine's one transfer per peer at a time).
                    on_start = self._node.relay(partial(self._on_started, pair, verifying))
                    config = setup.config
                    if status.sealed and not config.encrypted:
                        # Converted already, its folder's other copies not yet.
                        config = dataclasses.replace(config, encrypted=True)
                    # ``guard`` False: the user said to send a change held as too large.
                    synced: PushResult = await self._node.push(
                        config,
                        peer_id,
                        sink,
                        on_start=on_start,
                        guard=bool(options.get("guard", True)),
                    )
                    summary.update(synced.as_dict())
                    summary["status"] = "partial" if synced.error_count else "success"
                    self._succeeded(pair, synced)
            except asyncio.CancelledError:
                self._active.discard(pair)
                status.progress = None
                status.state = self._resting(status)
                self._updates.changed()
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
            await self._read_kind(pair)
            status.progress = None
            status.state = self._resting(status)
            summary["duration"] = round((dt_util.utcnow() - started).total_seconds(), 3)
        if summary["status"] in ("success", "partial") and not verifying:
            # Refresh "space we use there" now rather than at the next probe.
            self._prober.probe(peer_id)
        finished = self._finished(setup.config.name, peer, kind, summary)
        if converting and not status.converting and self.on_converted is not None:
            # Once this run is over: the folder may now be stored encrypted, which reloads
            # the node (and would cancel a run still under way).
            self._hass.loop.call_soon(self.on_converted, folder_id)
        return finished

    def _finished(
        self, folder: str, peer: PeerConfig, kind: SyncKind, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Publish the end of a run: state saved, entities updated, the event fired."""
        self._overdue.check(dt_util.utcnow())
        if self.on_finished is not None:
            self.on_finished()
        self._context.store.save()
        self._updates.changed()
        self._hass.bus.async_fire(
            EVENT_SYNC_FINISHED,
            {
                "entry_id": self._context.entry_id,
                "folder": folder,
                "peer": peer.name,
                "kind": kind.value,
                "status": summary["status"],
                "files": summary.get("files_sent", 0),
                "bytes": summary.get("bytes_sent", 0),
                "duration": summary["duration"],
                "error": summary.get("error"),
                **(
                    {
                        key: summary.get(key, 0)
                        for key in ("checked", "host_damaged", "unsent", "local_rot", "repaired")
                    }
                    if kind is SyncKind.VERIFY
                    else {}
                ),
            },
        )
        return summary

    @callback
    def set_storage_ok(self, ok: bool, error: str | None = None) -> None:
        """The storage disk checked out (or did not, and why): resume (or pause) runs."""
        self.storage_ok = ok
        self.storage_error = None if ok else error

    async def _storage_checks_out(self) -> bool:
        """Check (off the loop) that the storage root is still this node's disk."""
        try:
            await self._hass.async_add_executor_job(
                check_root, self._node.storage_root, self._node_id
            )
        except StorageRootError as err:
            self.set_storage_ok(False, str(err))
            return False
        return True

    @callback
    def _on_started(self, pair: Pair, verifying: bool) -> None:
        status = self._pairs.get(pair)
        if status is not None and pair in self._active:
            status.state = SyncState.VERIFYING if verifying else SyncState.SCANNING
            self._updates.changed()

    def _succeeded(self, pair: Pair, result: PushResult) -> None:
        status = self._pairs[pair]
        if status.failures:
            _LOGGER.info(
                "Sync of %s to %s works again",
                self._context.folders[pair[0]].config.name,
                self._context.peers[pair[1]].name,
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
        status.last_error_kind = ErrorKind.FILES_SKIPPED if status.last_error else None
        status.quota_refused = False
        issues.quota_refused(self._hass, self._context.entry_id, pair[0], pair[1], None)
        if not any(
            other.quota_refused for (_, peer_id), other in self._pairs.items() if peer_id == pair[1]
        ):
            issues.trash_fills_quota(self._hass, pair[1], None)
        # Everything planned went in: the friend's disk had room, the folder was there.
        issues.peer_disk_full(self._hass, pair[1], None)
        issues.folder_missing(self._hass, pair[0], None)
        issues.mass_change(self._hass, self._context.entry_id, pair[0], pair[1], None)
        self._prober.seen(pair[1], now)

    def _verified(self, pair: Pair, result: VerifyResult) -> None:
        """Remember the verify; raise an issue when the friend's copy was found damaged."""
        status = self._pairs[pair]
        now = dt_util.utcnow()
        status.last_verify = now
        status.last_verify_checked = result.checked
        status.last_verify_damaged = result.host_damaged
        status.last_verify_repaired = result.repaired
        if not result.host_damaged:
            return
        examples = [
            text.removeprefix("host damage: ")
            for text in result.examples
            if text.startswith("host damage: ")
        ]
        issues.verify_damage(
            self._hass,
            self._context.entry_id,
            pair[0],
            pair[1],
            {
                "folder": self._context.folders[pair[0]].config.name,
                "peer": self._context.peers[pair[1]].name,
                "when": texts.since(now),
                "checked": str(result.checked),
                "damaged": str(result.host_damaged),
                "repaired": str(result.repaired),
                "examples": texts.names(examples[:3]) if examples else texts.NONE,
            },
        )

    def _failed(self, pair: Pair, err: Exception, *, count: bool = True) -> None:
        """Record a failed run; ``count`` it against the schedule (syncs, not verifies)."""
        status = self._pairs[pair]
        if count:
            status.failures += 1
        status.last_error = str(err) or type(err).__name__
        status.last_error_kind = error_kind(err)
        # The pair's names, as every issue about it says them.
        names = {
            "folder": self._context.folders[pair[0]].config.name,
            "peer": self._context.peers[pair[1]].name,
        }
        entry_id = self._context.entry_id
        if isinstance(err, QuotaExceeded):
            status.quota_refused = True
            # Learn how much of the space there is trash (its own issue, if most is).
            self._prober.probe(pair[1])
            needed = {"needed": texts.size(err.needed), "available": texts.size(err.available)}
            issues.quota_refused(self._hass, entry_id, *pair, names | needed)
        elif isinstance(err, PeerDiskFull):
            self._prober.disk_full(pair[1], str(err).removeprefix("the peer's disk is full: "))
        elif isinstance(err, SourceMissing):
            self.folder_missing(pair[0], str(err))
        elif isinstance(err, MassChangeHeld):
            issues.mass_change(
                self._hass,
                entry_id,
                *pair,
                names
                | {
                    "replaced": str(err.replaced),
                    "deleted": str(err.deleted),
                    "total": str(err.total),
                    "share": str(round(100 * (err.replaced + err.deleted) / err.total)),
                    "percent": str(err.percent),
                    "examples": texts.NONE if not err.examples else ", ".join(err.examples),
                },
            )
        else:
            self._prober.run_failed(pair[1], err)

    @callback
    def folder_missing(self, folder_id: str, reason: str | None) -> None:
        """Raise (or, with ``reason`` None, clear) the folder's "not there" issue."""
        setup = self._context.folders[folder_id]
        issues.folder_missing(
            self._hass,
            folder_id,
            None
            if reason is None
            else {"folder": setup.config.name, "path": setup.config.path, "reason": reason},
        )

    async def check_folders(self) -> None:
        """Check that every protected folder is there (each tick): its issue at once.

        Not while the storage disk is away (the index is on it; that has its own issue).
        """
        if not self.storage_ok:
            return
        for folder_id, setup in list(self._context.folders.items()):
            reason = await self._node.check_folder(setup.config)
            if folder_id in self._context.folders:
                self.folder_missing(folder_id, reason)
                if self.on_folder_checked is not None:
                    await self.on_folder_checked(folder_id, reason is None)
