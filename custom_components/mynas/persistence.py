"""What a node's pairs and peers remember across restarts, in Home Assistant's storage.

One Store per node entry (``mynas.<entry_id>``): each pair's last success, attempts,
failures and last figures; each peer's last contact and our space there. Live state
(progress, what runs now) is not kept.
"""

from __future__ import annotations

from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers.storage import Store

from .const import DOMAIN
from .models import Pair, PairStatus, PeerStatus, SyncData, pair_key

STORAGE_VERSION = 1
# Changes are written at most this often (seconds); stopping writes at once.
_SAVE_DELAY = 10


def _store(hass: HomeAssistant, entry_id: str) -> Store[dict[str, Any]]:
    return Store(hass, STORAGE_VERSION, f"{DOMAIN}.{entry_id}")


class SyncStore:
    """Loads ``data`` for a node's pairs and peers, and saves it as it changes."""

    def __init__(self, hass: HomeAssistant, entry_id: str, data: SyncData) -> None:
        """Keep ``data`` for the node entry ``entry_id``."""
        self._store = _store(hass, entry_id)
        self._data = data
        self._stopped = False

    async def async_load(self, pairs: list[Pair], peer_ids: list[str]) -> None:
        """Restore what the last run of Home Assistant knew of ``pairs`` and ``peer_ids``."""
        stored = await self._store.async_load() or {}
        saved_pairs = stored.get("pairs", {})
        for pair in pairs:
            saved = saved_pairs.get(pair_key(*pair))
            self._data.pairs[pair] = PairStatus.from_stored(saved) if saved else PairStatus()
        saved_peers = stored.get("peers", {})
        for peer_id in peer_ids:
            saved = saved_peers.get(peer_id)
            self._data.peers[peer_id] = PeerStatus.from_stored(saved) if saved else PeerStatus()

    def save(self) -> None:
        """Save soon (a few changes in a row are written once); nothing once stopped."""
        if not self._stopped:
            self._store.async_delay_save(self._stored, _SAVE_DELAY)

    def stop(self) -> None:
        """Take no more changes: what stopping leaves behind is saved by ``async_save``."""
        self._stopped = True

    async def async_save(self) -> None:
        """Save now."""
        await self._store.async_save(self._stored())

    def _stored(self) -> dict[str, Any]:
        data = self._data
        return {
            "pairs": {pair_key(*pair): status.as_stored() for pair, status in data.pairs.items()},
            "peers": {peer_id: status.as_stored() for peer_id, status in data.peers.items()},
        }


async def async_remove(hass: HomeAssistant, entry_id: str) -> None:
    """Forget what a (deleted) node entry remembered."""
    await _store(hass, entry_id).async_remove()
