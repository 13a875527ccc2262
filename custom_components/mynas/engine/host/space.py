"""The hosted space: what this node stores for its peers, one jail per peer (blocking I/O).

Layout under the storage root::

    <storage>/<peer>/                              the peer's jail: all it sees and owns
    <storage>/.mynas/peers/<peer>/state.json       persisted usage and requested retentions
    <storage>/.mynas/trash/<peer>/<stamp>/<rel>    old versions moved away by overwrite/delete
    <storage>/.mynas/partial/<peer>/<..>.part      resumable large uploads
    <storage>/.mynas/tmp/<peer>/                   temp files of in-flight batch writes

What each jail enforces (docs/architecture.md, invariants 2 to 5) is said in ``jail`` and its parts.
Everything here blocks: call it from worker threads, never from an event loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import stat
import threading
import time

from ..storage_root import INTERNAL_DIR
from . import disk
from .jail import Jail
from .paths import fold, validate_peer_name

_AREAS = ("peers", "trash", "partial", "tmp")  # internal folders, one subfolder per peer


class HostedSpace:
    """All jails of one storage root (blocking; creates the internal directories).

    ``trash_days`` is the host's trash retention. At least one day: no retention at all
    would let a peer destroy data at once, and a stamp being purged is then never the one
    a move into the trash is filling.
    """

    def __init__(self, root: Path, *, trash_days: int = 30) -> None:
        if trash_days < 1:
            raise ValueError(f"the trash retention is at least one day, not {trash_days}")
        self.root = Path(root)
        self.trash_days = trash_days
        self._internal = self.root / INTERNAL_DIR
        self._jails: dict[str, Jail] = {}
        self._lock = threading.Lock()
        for path in [self._internal, *(self._internal / area for area in _AREAS)]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)

    def _folders(self, peer: str) -> list[Path]:
        """Return every folder that holds something of ``peer``: its jail, then internal ones."""
        return [self.root / peer, *(self._internal / area / peer for area in _AREAS)]

    def jail(self, peer: str, quota: int) -> Jail:
        """Return the jail of ``peer``, creating its folders; set its quota to ``quota``."""
        validate_peer_name(peer)
        with self._lock:
            jail = self._jails.get(fold(peer))
            if jail is not None and jail.name != peer:
                raise ValueError(f"peer name {peer!r} is too close to {jail.name!r}")
            if jail is not None:
                jail.quota.limit = quota
                return jail
            for path in self._folders(peer):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
            jail = Jail(self.root, peer, quota, trash_days=self.trash_days)
            self._jails[fold(peer)] = jail
            return jail

    def _get(self, peer: str) -> Jail:
        with self._lock:
            jail = self._jails.get(fold(peer))
        if jail is None or jail.name != peer:
            raise KeyError(f"no jail opened for peer {peer!r}")
        return jail

    def rescan(self, peer: str) -> int:
        """Recompute a peer's usage from disk, persist it and return it."""
        return self._get(peer).rescan()

    def purge(self, now: float | None = None) -> int:
        """Purge every opened jail's expired trash and stale partials; return bytes freed."""
        when = time.time() if now is None else now
        with self._lock:
            jails = list(self._jails.values())
        freed = sum(jail.purge(when) for jail in jails)
        self.persist()
        return freed

    def clean_tmp(self) -> None:
        """Remove temp files left by a crashed process (call at start, before serving)."""
        tmp = os.fsencode(self._internal / "tmp")
        for peer in os.listdir(tmp):
            path = tmp + b"/" + peer
            if stat.S_ISDIR(os.lstat(path).st_mode):
                for name in os.listdir(path):
                    disk.remove_tree(path + b"/" + name)

    def persist(self) -> None:
        """Write every opened jail's state.json."""
        with self._lock:
            jails = list(self._jails.values())
        for jail in jails:
            jail.save_state()

    def remove_peer_data(self, peer: str) -> None:
        """Delete everything stored for ``peer``: jail, trash, partials, temp files, state."""
        validate_peer_name(peer)
        with self._lock:
            jail = self._jails.get(fold(peer))
            if jail is not None and jail.name == peer:
                del self._jails[fold(peer)]
        for path in self._folders(peer):
            disk.remove_tree(os.fsencode(path))
