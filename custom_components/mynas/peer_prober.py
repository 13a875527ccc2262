"""What we know of each peer: is it there, since when not, how much of its space we use.

Each peer is tested every ``PEER_PROBE_INTERVAL`` (a connection, one question, hang up),
runs report what they learnt of it, and a peer connecting to us counts as seen. The
repair issues a user can act on follow: "unreachable" once it has been silent for the
configured time, "key changed" at once (nothing is sent to a key we did not pin), "its disk
is full" at once (a run told "no space left on device", or a test found next to no free
space there), cleared by the next sync that goes through.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
import logging

from homeassistant.core import CALLBACK_TYPE, callback
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util import dt as dt_util

from . import issues, texts
from .const import (
    LAST_SEEN_RESOLUTION,
    PEER_DISK_FULL_BELOW,
    PEER_PROBE_INTERVAL,
    TRASH_LARGE_SHARE,
)
from .engine import (
    AuthRefused,
    HostKeyMismatch,
    PeerUnreachable,
    ProbeResult,
    Reachability,
    fingerprint,
    format_bytes,
)
from .models import PeerStatus, SyncContext

_LOGGER = logging.getLogger(__name__)


def _newer(last_seen: datetime | None, when: datetime) -> bool:
    """Whether ``when`` says more than ``last_seen``: by a minute at least.

    A peer that syncs connects many times a second; "last seen" is read in minutes, and
    each new value is a state change (and a line in the activity log).
    """
    return last_seen is None or when - last_seen >= LAST_SEEN_RESOLUTION


def _date(timestamp: float | None) -> str:
    """A trash stamp's day as people read it (``-`` when unknown)."""
    return texts.NONE if timestamp is None else texts.since(dt_util.utc_from_timestamp(timestamp))


class PeerProber:
    """Tests a node's peers and keeps their status (in the context's data, by peer id)."""

    def __init__(self, context: SyncContext, unreachable_after: timedelta) -> None:
        """Watch the context's peers; unreachable once silent for ``unreachable_after``."""
        self._context = context
        self._hass = context.hass
        self._peers = context.peers
        self._statuses = context.data.peers
        self.unreachable_after = unreachable_after
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._unsub: CALLBACK_TYPE | None = None
        self._stopped = False

    @callback
    def async_start(self) -> None:
        """Test every peer every ``PEER_PROBE_INTERVAL`` from now on (``probe_all`` at once)."""
        self._unsub = async_track_time_interval(self._hass, self.probe_all, PEER_PROBE_INTERVAL)

    @callback
    def stop(self) -> list[asyncio.Task[None]]:
        """Stop testing and take no more news; cancel the tests under way and return them."""
        self._stopped = True
        if self._unsub is not None:
            self._unsub()
            self._unsub = None
        running = [task for task in self._probes.values() if not task.done()]
        for task in running:
            task.cancel()
        return running

    @callback
    def probe_all(self, _now: datetime | None = None) -> None:
        """Test every peer in the background."""
        for peer_id in self._peers:
            self.probe(peer_id)

    def probe(self, peer_id: str) -> asyncio.Task[None]:
        """Test the connection to a peer in the background (one test at a time per peer)."""
        task = self._probes.get(peer_id)
        if task is None or task.done():
            task = self._hass.async_create_background_task(
                self._probe(peer_id), name=f"mynas probe {peer_id}"
            )
            self._probes[peer_id] = task

            def forget(done: asyncio.Task[None]) -> None:
                if self._probes.get(peer_id) is done:
                    del self._probes[peer_id]

            task.add_done_callback(forget)
        return task

    @callback
    def contact(self, peer_id: str, when: datetime) -> None:
        """The peer connected to us: it exists and has our key (it is not a reachability test)."""
        if self._stopped:
            return
        status = self._statuses.setdefault(peer_id, PeerStatus())
        if _newer(status.last_seen, when):
            status.last_seen = when
            self._context.store.save()
            self._context.updates.changed()

    def seen(self, peer_id: str, when: datetime) -> None:
        """The peer answered (a run or a test went through): it is online."""
        status = self._statuses.setdefault(peer_id, PeerStatus())
        if _newer(status.last_seen, when):
            status.last_seen = when
        status.reachability = Reachability.ONLINE
        status.down_since = None
        status.error = None
        status.presented_key = None
        issues.unreachable(
            self._hass, self._context.entry_id, peer_id, self._peers[peer_id].name, None
        )
        issues.clear_key_changed(self._hass, peer_id)

    def run_failed(self, peer_id: str, err: Exception) -> None:
        """A run ended with ``err``: note what it says of the peer, if anything."""
        if isinstance(err, HostKeyMismatch):
            self._problem(peer_id, Reachability.KEY_MISMATCH, str(err), err.presented_key)
        elif isinstance(err, AuthRefused):
            self._problem(peer_id, Reachability.WAITING, str(err))
        elif isinstance(err, PeerUnreachable):
            self._problem(peer_id, Reachability.UNREACHABLE, str(err))

    def disk_full(self, peer_id: str, detail: str, *, test: bool = True) -> None:
        """The peer's disk itself has no room (not our quota there): tell the user at once.

        ``test``: also test the connection now, which learns how much room is left there
        (and says so in the issue when next to none is).
        """
        issues.peer_disk_full(
            self._hass, peer_id, {"peer": self._peers[peer_id].name, "detail": detail}
        )
        if test:
            self.probe(peer_id)

    def _check_trash(self, peer_id: str, result: ProbeResult) -> None:
        """Say so when the friend refused us for quota and trash fills much of our space."""
        refused = [
            self._context.folders[folder_id].config.name
            for (folder_id, pid), status in self._context.data.pairs.items()
            if pid == peer_id and status.quota_refused and folder_id in self._context.folders
        ]
        trash, used = result.trash_there, result.used_there
        if not refused or trash is None or not used or trash < used * TRASH_LARGE_SHARE:
            issues.trash_fills_quota(self._hass, peer_id, None)
            return
        issues.trash_fills_quota(
            self._hass,
            peer_id,
            {
                "peer": self._peers[peer_id].name,
                "folders": texts.names(refused),
                "trash": texts.size(trash),
                "used": texts.size(used),
                "quota": texts.size(result.quota_there or 0),
                "frees_at": _date(result.trash_frees_at),
                "until": _date(result.trash_kept_until),
            },
        )

    def _problem(
        self,
        peer_id: str,
        reachability: Reachability,
        error: str | None,
        presented_key: str | None = None,
    ) -> None:
        status = self._statuses.setdefault(peer_id, PeerStatus())
        peer = self._peers[peer_id]
        status.reachability = reachability
        status.error = error
        status.down_since = status.down_since or dt_util.utcnow()
        if reachability is Reachability.KEY_MISMATCH:
            # Security: nothing was sent; only the user can accept the new key.
            status.presented_key = presented_key
            issues.key_changed(
                self._hass,
                self._context.entry_id,
                peer_id,
                peer.name,
                fingerprint(peer.public_key),
                fingerprint(presented_key) if presented_key else None,
                presented_key,
                down_since=status.down_since,
                folders=self._folders_on(peer_id),
            )
        self._check_unreachable(peer_id)

    def _folders_on(self, peer_id: str) -> list[str]:
        """The folders copied to the peer (what is not copied while it is away)."""
        return [
            setup.config.name for setup in self._context.folders.values() if peer_id in setup.peers
        ]

    def _check_unreachable(self, peer_id: str) -> None:
        """Raise "unreachable" once no answer came for long enough (else clear it).

        A wrong key has its own, critical issue; "waiting for them to add us" and "no
        answer" both mean the friend has something to do.
        """
        status = self._statuses[peer_id]
        peer = self._peers[peer_id]
        since = status.down_since
        silent = since is not None and dt_util.utcnow() - since >= self.unreachable_after
        entry_id = self._context.entry_id
        if silent and status.reachability in (Reachability.UNREACHABLE, Reachability.WAITING):
            issues.unreachable(
                self._hass, entry_id, peer_id, peer.name, since, self._folders_on(peer_id)
            )
        else:
            issues.unreachable(self._hass, entry_id, peer_id, peer.name, None)

    async def _probe(self, peer_id: str) -> None:
        try:
            result: ProbeResult = await self._context.node.probe(peer_id)
        except Exception as err:  # a failed test is a result, not a crash
            _LOGGER.exception("Testing the connection to %s failed", self._peers[peer_id].name)
            result = ProbeResult(Reachability.UNREACHABLE, error=str(err))
        status = self._statuses.setdefault(peer_id, PeerStatus())
        now = dt_util.utcnow()
        status.last_probe = now
        if result.status is Reachability.ONLINE:
            self.seen(peer_id, now)
            status.used_there = result.used_there
            status.quota_there = result.quota_there
            free = result.disk_free_there
            if free is not None and free < PEER_DISK_FULL_BELOW:
                self.disk_full(peer_id, f"it has {format_bytes(free)} free", test=False)
            self._check_trash(peer_id, result)
        else:
            self._problem(peer_id, result.status, result.error, result.presented_key)
        self._context.store.save()
        self._context.updates.changed()
