"""Telling the entities that pair or peer state changed: at once, or throttled for progress.

A running sync reports progress many times a second; the entities follow it at most once
a second (``PROGRESS_UPDATES``), and the last report always reaches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback

# Entities follow a running sync this often at most (seconds).
PROGRESS_UPDATES = 1.0


class EntityUpdates:
    """The listeners of one node's sync state (its coordinator), and the progress throttle."""

    def __init__(self, hass: HomeAssistant) -> None:
        """Tell nobody yet."""
        self._hass = hass
        self._listeners: list[Callable[[], None]] = []
        # When the listeners were last told (loop time), and the throttled update to come.
        self._last_update = 0.0
        self._pending: asyncio.TimerHandle | None = None
        self._stopped = False

    @callback
    def add_listener(self, update: Callable[[], None]) -> CALLBACK_TYPE:
        """Call ``update`` whenever pair or peer state changed."""
        self._listeners.append(update)
        return lambda: self._listeners.remove(update)

    @callback
    def changed(self, *, throttle: bool = False) -> None:
        """State changed: tell the listeners now or, when ``throttle``d, within a second."""
        if throttle:
            now = self._hass.loop.time()
            if now - self._last_update < PROGRESS_UPDATES:
                if self._pending is None and not self._stopped:
                    self._pending = self._hass.loop.call_later(PROGRESS_UPDATES, self._tell)
                return
        self._tell()

    @callback
    def stop(self) -> None:
        """Drop a throttled update still to come; later changes are told at once only."""
        self._stopped = True
        self._cancel_pending()

    @callback
    def _tell(self) -> None:
        self._cancel_pending()
        self._last_update = self._hass.loop.time()
        for update in list(self._listeners):
            update()

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
