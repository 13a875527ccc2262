"""When each pair syncs and is verified; overdue backups raised as issues.

The rules of "when" are pure functions in ``schedule``; this keeps the clock. Every
``SCHEDULER_TICK`` it starts the syncs that are due (none while the storage disk is away),
raises or clears each folder's "backup overdue" repair issue, and has every folder checked
for being there (its "folder missing" issue).

The scrub: every pair is verified with repair once per ``verify_every`` (a node option),
counted from its last verify, or from its first sync plus a time of day of its own
(``verify_offset``: pairs set up together are not verified together). One verify at a time
per node, never while the pair syncs, none in the first minutes after a start, and one
that failed (the friend away) is tried again an hour later, not every minute.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
import hashlib
from typing import Any, Protocol

from homeassistant.core import CALLBACK_TYPE, callback
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util import dt as dt_util

from . import issues, texts
from .const import SCHEDULER_TICK, VERIFY_SPREAD, VERIFY_STARTUP_DELAY
from .models import Pair, SyncContext, SyncKind, pair_key
from .schedule import next_run


class Overdue:
    """Which pairs' backups are overdue, and each folder's repair issue saying so."""

    def __init__(self, context: SyncContext, after: timedelta) -> None:
        """Watch the context's pairs: overdue once ``after`` is past."""
        self._context = context
        self.after = after

    def is_overdue(self, pair: Pair, now: datetime | None = None) -> bool:
        """True when the pair's last success is older than the threshold.

        A pair that never succeeded counts from its first attempt, so a new folder is not
        overdue at once, and one that keeps failing becomes overdue all the same.
        """
        status = self._context.data.pairs[pair]
        now = now or dt_util.utcnow()
        reference = status.last_success or status.first_attempt or status.last_attempt
        return reference is not None and now - reference > self.after

    def check(self, now: datetime) -> None:
        """Raise each folder's "overdue" issue naming its late peers (or clear it).

        It says since when the folder has not been copied (the oldest of its late peers'
        last success, or first attempt when it never succeeded) and the last error, which
        is what there is to fix.
        """
        pairs = self._context.data.pairs
        for folder_id, setup in self._context.folders.items():
            late = [
                peer_id
                for peer_id in setup.peers
                if peer_id in self._context.peers and self.is_overdue((folder_id, peer_id), now)
            ]
            statuses = [pairs[(folder_id, peer_id)] for peer_id in late]
            references = [
                status.last_success or status.first_attempt or status.last_attempt
                for status in statuses
            ]
            errors = [status.last_error for status in statuses if status.last_error]
            issues.overdue(
                self._context.hass,
                self._context.entry_id,
                folder_id,
                {
                    "folder": setup.config.name,
                    "peers": texts.names([self._context.peers[peer_id].name for peer_id in late]),
                    "hours": f"{self.after.total_seconds() / 3600:g}",
                    "since": texts.since(min(ref for ref in references if ref is not None)),
                    "error": errors[0] if errors else texts.NONE,
                }
                if late
                else None,
            )


class Runner(Protocol):
    """What the scheduler needs of the one who runs the pairs (the sync manager)."""

    storage_ok: bool

    def running(self, pair: Pair, kind: SyncKind | None = None) -> bool:
        """True while a run of the pair (of ``kind``, if given) is queued or running."""

    def start(self, pair: Pair, kind: SyncKind, **options: Any) -> object:
        """Start a run of the pair."""

    async def check_folders(self) -> None:
        """Check that every protected folder is there (raise or clear its issue)."""


# A scheduled verify that failed is tried again this much later.
VERIFY_RETRY = timedelta(hours=1)


def verify_offset(pair: Pair, every: timedelta) -> timedelta:
    """A pair's own delay before its first verify: the same at every start, spread over a day."""
    window = int(min(VERIFY_SPREAD, every).total_seconds())
    digest = hashlib.sha256(pair_key(*pair).encode()).digest()
    return timedelta(seconds=int.from_bytes(digest[:8]) % max(window, 1))


class Scheduler:
    """Starts each pair's sync when it is due, and its verify once per period."""

    def __init__(
        self,
        context: SyncContext,
        overdue: Overdue,
        runner: Runner,
        verify_every: timedelta | None = None,
    ) -> None:
        """Schedule the context's pairs; start their runs through ``runner``.

        ``verify_every`` None: no scheduled verify.
        """
        self._context = context
        self._overdue = overdue
        self._runner = runner
        self.verify_every = verify_every
        self._unsub: CALLBACK_TYPE | None = None
        self._checking: asyncio.Task[None] | None = None
        self._started: datetime | None = None
        # When each pair's scheduled verify was last started (live only).
        self._verify_started: dict[Pair, datetime] = {}

    @callback
    def async_start(self) -> None:
        """Tick every minute from now on (``tick`` once to begin at once)."""
        self._started = dt_util.utcnow()
        self._unsub = async_track_time_interval(self._context.hass, self.tick, SCHEDULER_TICK)

    @callback
    def stop(self) -> list[asyncio.Task[None]]:
        """Stop ticking; cancel a folder check under way and return it (to wait for)."""
        if self._unsub is not None:
            self._unsub()
            self._unsub = None
        checking, self._checking = self._checking, None
        if checking is None or checking.done():
            return []
        checking.cancel()
        return [checking]

    @callback
    def tick(self, now: datetime) -> None:
        """Start what is due (unless the disk is away), then check what is overdue."""
        if self._runner.storage_ok:
            for pair in self._context.pairs:
                if self._runner.running(pair):
                    continue
                due = self.next_run(pair)
                if due is None or due <= now:
                    self._runner.start(pair, SyncKind.SYNC)
            self._start_verify(now)
        self.refresh_next_verify()
        self._overdue.check(now)
        self._context.updates.changed()
        if self._checking is None or self._checking.done():
            # A vanished folder (its disk unplugged) gets its issue within a tick.
            self._checking = self._context.hass.async_create_background_task(
                self._runner.check_folders(), name="mynas folder check"
            )

    def next_run(self, pair: Pair) -> datetime | None:
        """When the pair runs next (None: as soon as possible)."""
        status = self._context.data.pairs[pair]
        return next_run(
            self._context.folders[pair[0]].schedule,
            last_attempt=dt_util.as_local(status.last_attempt) if status.last_attempt else None,
            failures=status.failures,
        )

    @callback
    def refresh_next_verify(self) -> None:
        """Tell each pair when its verify comes next (after every tick and every run)."""
        for pair in self._context.pairs:
            status = self._context.data.pairs.get(pair)
            if status is not None:
                status.next_verify = self.next_verify(pair)

    def next_verify(self, pair: Pair) -> datetime | None:
        """When the pair's scheduled verify is due (None: never, or nothing to verify yet)."""
        every = self.verify_every
        status = self._context.data.pairs[pair]
        if every is None or status.last_success is None or status.converting:
            return None
        if status.last_verify is not None:
            due = status.last_verify + every
        else:
            reference = status.first_attempt or status.last_success
            due = reference + every + verify_offset(pair, every)
        tried = self._verify_started.get(pair)
        if tried is not None and tried + VERIFY_RETRY > due:
            due = tried + VERIFY_RETRY  # it failed: again in an hour
        return due

    def _start_verify(self, now: datetime) -> None:
        """Start the one verify that is due most (if none runs and the start is past)."""
        if self.verify_every is None or self._started is None:
            return
        if now < self._started + VERIFY_STARTUP_DELAY:
            return
        pairs = self._context.pairs
        if any(self._runner.running(pair, SyncKind.VERIFY) for pair in pairs):
            return
        due = [
            (when, pair)
            for pair in pairs
            if not self._runner.running(pair)
            and (when := self.next_verify(pair)) is not None
            and when <= now
        ]
        if due:
            _, pair = min(due)
            self._verify_started[pair] = now
            self._runner.start(pair, SyncKind.VERIFY, repair=True)
