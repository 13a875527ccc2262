"""A peer's trash: the old versions it overwrote or deleted, kept outside its jail.

Overwrite and delete move the old version to ``<storage>/.mynas/trash/<peer>/<stamp>/<rel>``
(docs/architecture.md, invariant 4). It still counts against the quota, and only ``purge``,
run by the host, removes it, after the effective retention of its folder (the first
component of its path): the host's, or longer if the peer asked for more. Requests only ever
lengthen it, so a compromised peer cannot shorten what protects its replicas.

Everything here blocks: call it from worker threads, never from an event loop.
"""

from __future__ import annotations

import calendar
import os
import re
import stat
import time

from ..errors import PathRefused, ProtocolError
from . import disk
from .jailfs import JailFS
from .paths import check_path, refuse
from .quota import DIR_CHARGE

MAX_RETENTION_DAYS = 3650
MAX_RETENTION_FOLDERS = 1000

_DAY = 86400
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_STAMP_RE = re.compile(rb"(\d{8}T\d{6}Z)(?:~\d+)?")
_MAX_COLLISIONS = 1000  # jailfs keeps room in every path for the "~999" this allows


def stamp_time(name: bytes) -> float | None:
    """Return the UTC time a trash stamp directory's name records, or None if not a stamp."""
    match = _STAMP_RE.fullmatch(name)
    if match is None:
        return None
    return calendar.timegm(time.strptime(match[1].decode(), _STAMP_FORMAT))


class Trash:
    """One peer's trash and the retentions it asked for (thread-safe, under ``fs.lock``)."""

    def __init__(self, fs: JailFS, retention: dict[str, int], *, trash_days: int) -> None:
        self._fs = fs
        self._retention = retention
        self._trash_days = trash_days

    def slot(self, rel: bytes) -> bytes:
        """Return a free trash path for ``rel`` with its parents made (call under the lock).

        ``<stamp>/<rel>``, or ``<stamp>~1/<rel>``... when that path is taken (same second)
        or a parent in the way is a file: the suffix goes on the stamp, so names never grow.
        """
        stamp = time.strftime(_STAMP_FORMAT, time.gmtime()).encode()
        names = rel.split(b"/")
        for attempt in range(_MAX_COLLISIONS):
            top = self._fs.trash_b + b"/" + (stamp + b"~%d" % attempt if attempt else stamp)
            dest = top + b"/" + rel
            if os.path.lexists(dest):
                continue
            try:
                self._fs.ensure_dir(top, rel)
                path = top
                for name in names[:-1]:
                    path += b"/" + name
                    self._fs.ensure_dir(path, rel)
            except PathRefused:
                continue
            return dest
        refuse(rel, "too many versions of it were moved to the trash this second")

    # --- retention

    def set_retention(self, folder: str, days: int) -> None:
        """Ask that the trash of ``folder`` be kept ``days`` days (capped at 3650)."""
        name = check_path(os.fsencode(folder))
        if b"/" in name:
            refuse(name, "a folder is one name, not a path")
        if days < 0:
            raise ProtocolError(f"negative retention for {folder!r}: {days}")
        with self._fs.lock:
            if folder not in self._retention and len(self._retention) >= MAX_RETENTION_FOLDERS:
                raise ProtocolError(
                    f"too many folders with a retention (max. {MAX_RETENTION_FOLDERS})"
                )
            requested = min(days, MAX_RETENTION_DAYS)
            self._retention[folder] = max(self._retention.get(folder, 0), requested)

    def retention_days(self, folder: bytes) -> int:
        """Return the effective trash retention of ``folder`` (first path component), in days."""
        with self._fs.lock:
            requested = self._retention.get(os.fsdecode(folder), 0)
        return max(self._trash_days, requested)

    def requested(self) -> dict[str, int]:
        """Return a copy of the retentions the peer asked for, by folder."""
        with self._fs.lock:
            return dict(self._retention)

    # --- purge (host only)

    def purge(self, now: float) -> int:
        """Remove what is past its retention; return the bytes freed (the quota is not told)."""
        trash_b = self._fs.trash_b
        freed = 0
        try:
            stamps = sorted(os.listdir(trash_b))
        except FileNotFoundError:
            return 0
        for name in stamps:
            when = stamp_time(name)
            top = trash_b + b"/" + name
            if when is None or not stat.S_ISDIR(os.lstat(top).st_mode):
                continue  # not made by us: left alone (and still counted)
            for folder in os.listdir(top):
                if now - when > self.retention_days(folder) * _DAY:
                    freed += disk.remove_quietly(top + b"/" + folder)
            with self._fs.lock:  # no move into the trash can be filling it meanwhile
                try:
                    os.rmdir(top)
                except OSError:
                    continue  # some folder is kept longer
            freed += DIR_CHARGE
        return freed
