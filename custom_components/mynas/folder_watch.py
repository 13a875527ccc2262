"""Back up after changes: protected folders watched with ``watchdog`` (inotify on Linux).

A folder with "back up after changes" on is watched, subfolders included. A change (a file
created, written, deleted or moved; not a file merely read, so our own syncs never wake it)
starts a sync of the folder to each of its friends once the folder has been quiet for
``QUIET`` — Time Machine and File History write in bursts — but never later than the
folder's interval after the first change (a folder written to without pause still gets
synced), and never sooner than that interval after the last sync the watch started. The
schedule runs as before; the watch only adds syncs.

Watching costs one inotify watch per directory. When the system's limit
(``fs.inotify.max_user_watches``) is reached, or the folder is not there, the folder is
simply not watched (its schedule still runs) and the next check tries again: the folder
checks of the scheduler (``Runs.check_folders``) suspend the watch of a folder that is not
there and resume it when it is back (after its disk was unplugged and plugged in again).

The observer's threads only post to Home Assistant's loop (one call per burst the loop has
not taken yet); every decision and timer is on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
import logging
import threading

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.helpers.event import async_call_later
from homeassistant.util import dt as dt_util
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

_LOGGER = logging.getLogger(__name__)

# How long a folder must stay unchanged before its sync starts (the debounce).
QUIET = timedelta(seconds=30)
# What counts as a change: the kernel is asked for these only (no opens, no reads).
CHANGES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class Watched:
    """A folder to watch: where it is, and the least time between two syncs it starts."""

    path: str
    interval: timedelta


@dataclass(slots=True)
class _State:
    first_change: datetime | None = None
    last_change: datetime | None = None
    last_sync: datetime | None = None
    timer: CALLBACK_TYPE | None = None
    watch: ObservedWatch | None = None
    warned: bool = False  # that it cannot be watched (said once, retried quietly)


def due(state: _State, interval: timedelta) -> datetime | None:
    """When the folder's next sync should start (None: no change waits for one).

    Quiet for QUIET, but at most ``interval`` after the first change; never sooner than
    ``interval`` after the last sync the watch started.
    """
    if state.first_change is None or state.last_change is None:
        return None
    when = min(state.last_change + QUIET, state.first_change + max(interval, QUIET))
    if state.last_sync is not None:
        when = max(when, state.last_sync + interval)
    return when


class _Handler(FileSystemEventHandler):
    """Runs in the observer's thread: tells the loop, once per burst the loop has not seen.

    While a call is on its way to the loop, further events add nothing: a burst of
    thousands of writes costs the loop one call per turn, not one per event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, changed: Callable[[], None]) -> None:
        self._loop = loop
        self._changed = changed
        self._pending = False
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
        self._loop.call_soon_threadsafe(self._on_loop)

    def _on_loop(self) -> None:
        with self._lock:
            self._pending = False
        self._changed()


class FolderWatcher:
    """Watches the folders that ask for it and starts their syncs after changes."""

    def __init__(
        self,
        hass: HomeAssistant,
        folders: dict[str, Watched],
        start_sync: Callable[[str], None],
    ) -> None:
        """Watch ``folders`` (by folder id); ``start_sync(folder_id)`` syncs one to its peers."""
        self._hass = hass
        self._folders = folders
        self._start_sync = start_sync
        self._states = {folder_id: _State() for folder_id in folders}
        self._observer: BaseObserver | None = None
        self._stopped = False

    @property
    def watching(self) -> frozenset[str]:
        """The folders watched right now."""
        return frozenset(fid for fid, state in self._states.items() if state.watch is not None)

    async def async_start(self) -> None:
        """Start the observer and watch every folder that is there (blocking work off the loop)."""
        if not self._folders:
            return
        observer = Observer()
        observer.name = "mynas-folder-watch"
        observer.daemon = True
        await self._hass.async_add_executor_job(observer.start)
        self._observer = observer
        for folder_id in self._folders:
            await self.async_resume(folder_id)

    async def async_stop(self) -> None:
        """Stop watching and cancel the syncs still waiting for quiet."""
        self._stopped = True
        for state in self._states.values():
            if state.timer is not None:
                state.timer()
                state.timer = None
            state.watch = None
        observer, self._observer = self._observer, None
        if observer is not None:

            def stop() -> None:
                observer.stop()
                observer.join(10)

            await self._hass.async_add_executor_job(stop)

    async def async_resume(self, folder_id: str) -> None:
        """Watch the folder if it is not watched yet (it is there again, or was never)."""
        state = self._states.get(folder_id)
        observer = self._observer
        if state is None or state.watch is not None or observer is None or self._stopped:
            return
        handler = _Handler(self._hass.loop, partial(self._changed, folder_id))
        try:
            watch = await self._hass.async_add_executor_job(
                partial(
                    observer.schedule,
                    handler,
                    self._folders[folder_id].path,
                    recursive=True,
                    event_filter=CHANGES,
                )
            )
        except OSError as err:  # not there, or the inotify watch limit reached
            _LOGGER.log(
                logging.DEBUG if state.warned else logging.WARNING,
                "Cannot watch %s for changes (%s); it is backed up on its schedule only",
                self._folders[folder_id].path,
                err.strerror or err,
            )
            state.warned = True
            return
        if self._stopped or self._observer is None:
            return
        state.watch = watch
        state.warned = False

    async def async_suspend(self, folder_id: str) -> None:
        """Stop watching a folder that is not there (its disk unplugged): resumed later."""
        state = self._states.get(folder_id)
        observer = self._observer
        if state is None or state.watch is None or observer is None:
            return
        watch, state.watch = state.watch, None

        def unschedule() -> None:
            try:
                observer.unschedule(watch)
            except (OSError, KeyError) as err:  # its directory is gone with the watch
                _LOGGER.debug("Unwatching %s: %s", watch.path, err)

        await self._hass.async_add_executor_job(unschedule)

    @callback
    def again(self, folder_id: str) -> None:
        """Sync the folder once more later (a run was already under way when it settled)."""
        self._changed(folder_id)

    @callback
    def _changed(self, folder_id: str) -> None:
        if self._stopped:
            return
        state = self._states[folder_id]
        now = dt_util.utcnow()
        state.first_change = state.first_change or now
        state.last_change = now
        self._arm(folder_id, now)

    @callback
    def _arm(self, folder_id: str, now: datetime) -> None:
        state = self._states[folder_id]
        when = due(state, self._folders[folder_id].interval)
        if state.timer is not None:
            state.timer()
            state.timer = None
        if when is not None:
            delay = max(0.0, (when - now).total_seconds())
            state.timer = async_call_later(self._hass, delay, partial(self._fire, folder_id))

    @callback
    def _fire(self, folder_id: str, now: datetime) -> None:
        state = self._states[folder_id]
        state.timer = None
        if self._stopped:
            return
        when = due(state, self._folders[folder_id].interval)
        if when is not None and when > now:  # a change came in meanwhile: later
            self._arm(folder_id, now)
            return
        state.first_change = state.last_change = None
        state.last_sync = now
        _LOGGER.debug("%s changed: syncing it", self._folders[folder_id].path)
        self._start_sync(folder_id)
