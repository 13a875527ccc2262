"""When each pair syncs: due syncs started every minute, overdue backups raised as issues.

The rules of "when" are pure functions in ``schedule``; this keeps the clock. Every
``SCHEDULER_TICK`` it starts the syncs that are due (none while the storage disk is away),
raises or clears each folder's "backup overdue" repair issue, and has every folder checked
for being there (its "folder missing" issue).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Protocol

from homeassistant.core import CALLBACK_TYPE, callback
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util import dt as dt_util

from . import issues
from .const import SCHEDULER_TICK
from .models import Pair, SyncContext, SyncKind
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
        """Raise each folder's "overdue" issue naming its late peers (or clear it)."""
        for folder_id, setup in self._context.folders.items():
            late = [
                self._context.peers[peer_id].name
                for peer_id in setup.peers
                if peer_id in self._context.peers and self.is_overdue((folder_id, peer_id), now)
            ]
            issues.overdue(
                self._context.hass,
                folder_id,
                {
                    "folder": setup.config.name,
                    "peers": ", ".join(late),
                    "hours": f"{self.after.total_seconds() / 3600:g}",
                }
                if late
                else None,
            )


class Runner(Protocol):
    """What the scheduler needs of the one who runs the pairs (the sync manager)."""

    storage_ok: bool

    def running(self, pair: Pair) -> bool:
        """True while a run of the pair is queued or running."""

    def start(self, pair: Pair, kind: SyncKind) -> object:
        """Start a run of the pair."""

    async def check_folders(self) -> None:
        """Check that every protected folder is there (raise or clear its issue)."""


class Scheduler:
    """Starts each pair's sync when it is due."""

    def __init__(self, context: SyncContext, overdue: Overdue, runner: Runner) -> None:
        """Schedule the context's pairs; start their runs through ``runner``."""
        self._context = context
        self._overdue = overdue
        self._runner = runner
        self._unsub: CALLBACK_TYPE | None = None
        self._checking: asyncio.Task[None] | None = None

    @callback
    def async_start(self) -> None:
        """Tick every minute from now on (``tick`` once to begin at once)."""
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
