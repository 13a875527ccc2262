"""One peer's hosted space: its jail, quota, trash and partial uploads (blocking I/O).

``Jail`` is what the server, the replication session and SFTP use; it answers reads itself
and hands the rest to its parts, each in a module of its own:

* ``jailfs.JailFS``: where the peer's things live, paths resolved link-free, directories
  made (the rules of ``paths`` first, then the disk: docs/architecture.md, invariant 2);
* ``quota.Quota``: space reserved before any byte or directory reaches the disk (3);
* ``trash.Trash``: old versions kept outside the jail until the host purges them (4);
* ``writes.JailWriter``: batches of small files, atomic and durable (5);
* ``upload.Uploads``: large files received into resumable partials.

Usage and requested retentions persist in ``state.json``; ``rescan`` recounts usage from
disk and should run before a jail is served (the server does it at start): writes racing
with it may be missed until the next rescan.

Everything here blocks: call it from worker threads, never from an event loop. Several threads
may work on the same jail at once; the quota has its own lock, and moves into the trash are
serialised per jail.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import json
import os
from pathlib import Path
import stat
import threading
from typing import TYPE_CHECKING, Any

from .. import tree
from ..storage_root import write_file_atomic
from . import disk
from .jailfs import JailFS
from .paths import check_mtime, check_path, is_internal, refuse, validate_peer_name
from .quota import DIR_CHARGE, JailUsage, Quota, charge
from .trash import MAX_RETENTION_DAYS, Trash, stamp_time
from .upload import Uploads
from .writes import JailWriter

if TYPE_CHECKING:
    from .upload import Upload
    from .writes import BatchResults, IncomingFile

_READ_BLOCK = 1 << 20
_STATE_FORMAT = 1
# The top-level folders one answer of ``folders`` names at most (the rest: ``more``).
MAX_FOLDERS = 1000


@dataclass(frozen=True, slots=True)
class FolderTotals:
    """One top-level folder of a jail: what it holds as stored here, and when it changed.

    ``changed`` is the latest ctime in it (seconds): when this host last wrote or moved
    anything there. A peer cannot set a ctime, and an encrypted replica's mtimes are all 0.
    """

    name: bytes
    files: int
    bytes: int
    changed: float


@dataclass(frozen=True, slots=True)
class TrashUsage:
    """What a peer's trash holds (its charge) and the stamps of its oldest and newest part."""

    bytes: int
    oldest: float | None
    newest: float | None


def _load_state(path: Path) -> tuple[int, dict[str, int]]:
    """Return the usage and the requested retentions persisted in ``state.json``."""
    try:
        data = json.loads(path.read_bytes())
    except OSError, ValueError:
        return 0, {}  # missing or damaged: rescan() sets the truth
    if not isinstance(data, dict):
        return 0, {}
    used = data.get("used")
    retention = data.get("retention")
    return (
        used if isinstance(used, int) and used >= 0 else 0,
        {
            folder: days
            for folder, days in (retention.items() if isinstance(retention, dict) else ())
            if isinstance(days, int) and 0 <= days <= MAX_RETENTION_DAYS
        },
    )


class Jail:
    """One peer's hosted space: its jail, quota, trash and partial uploads.

    Made by ``HostedSpace.jail``, which creates its directories. Paths are jail-relative
    ``bytes``; every operation goes through ``resolve``. Blocking and thread-safe.
    """

    def __init__(self, storage: Path, name: str, quota: int, *, trash_days: int) -> None:
        self.name = validate_peer_name(name)
        self._fs = fs = JailFS(storage, name, Quota(quota))
        self.quota = fs.quota
        self.root = fs.root
        self.trash_dir = fs.trash_dir
        self.partial_dir = fs.partial_dir
        self.tmp_dir = fs.tmp_dir
        self.state_path = fs.state_path
        self._save_lock = threading.Lock()
        used, retention = _load_state(self.state_path)
        self.quota.set_used(used)
        self._trash = Trash(fs, retention, trash_days=trash_days)
        self._writer = JailWriter(fs, self._trash)
        self._uploads = Uploads(fs, self._writer)

    # --- paths

    def check_path(self, rel: bytes) -> bytes:
        """Return ``rel`` if syntactically acceptable; raise PathRefused (see ``check_path``)."""
        return check_path(rel)

    def resolve(self, rel: bytes) -> bytes:
        """Return the absolute path of ``rel`` after checking what exists of it on disk.

        Raises PathRefused if the path is not acceptable, if any existing component is a
        symlink, if a non-directory comes before the last component, or if the last one is
        neither a regular file nor a directory.
        """
        return self._fs.locate(rel).path

    # --- writes

    def make_dir(self, rel: bytes, mtime_ns: int | None = None) -> None:
        """Create directory ``rel`` and its missing parents; set its mtime when given."""
        if mtime_ns is not None:
            check_mtime(rel, mtime_ns)
        with disk.translate_errors(rel):
            where = self._fs.locate(rel)
            if where.info is None:
                self._fs.make_dirs(where, include_last=True)
            elif not stat.S_ISDIR(where.info.st_mode):
                refuse(rel, "a file is in the way")
            if mtime_ns is not None:
                os.utime(where.path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def write_batch(self, files: Sequence[IncomingFile]) -> BatchResults:
        """Store a batch of files atomically and durably; one result per file.

        See ``JailWriter.write_batch``: the caller has reserved each file's charge.
        """
        return self._writer.write_batch(files)

    def begin_upload(self, rel: bytes, size: int, mtime_ns: int, mode: int) -> Upload:
        """Start (or resume) receiving a large file; ``upload.offset`` says where to go on.

        See ``Uploads.begin``: what the file will cost is reserved before any byte is written.
        """
        return self._uploads.begin(rel, size, mtime_ns, mode)

    def sync(self) -> None:
        """Make everything written on the storage's filesystem so far durable (one syncfs)."""
        self._fs.sync()

    # --- deletes and metadata

    def delete(self, rel: bytes) -> None:
        """Move file or directory tree ``rel`` to the trash (usage is unchanged)."""
        with disk.translate_errors(rel), self._fs.lock:
            where = self._fs.existing(rel)
            os.rename(where.path, self._trash.slot(rel))

    def set_mtime(self, rel: bytes, mtime_ns: int) -> None:
        """Set the modification time of a file or directory (never through a link)."""
        check_mtime(rel, mtime_ns)
        with disk.translate_errors(rel):
            where = self._fs.existing(rel)
            os.utime(where.path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    # --- reads

    def stat(self, rel: bytes) -> tree.Entry:
        """Return the entry of one file or directory (FileNotFoundError if missing)."""
        info = self._fs.existing(rel).info
        assert info is not None
        if stat.S_ISDIR(info.st_mode):
            return tree.Entry(rel, tree.Kind.DIR, 0, info.st_mtime_ns, tree.DIR_MODE)
        mode = tree.portable_mode(info.st_mode)
        return tree.Entry(rel, tree.Kind.FILE, info.st_size, info.st_mtime_ns, mode)

    def list(self, rel: bytes = b"") -> Iterator[tree.Entry]:
        """Yield the entries below directory ``rel`` (default: the whole jail).

        In canonical order, with paths relative to the jail root; links are never listed.
        Lazy, checks included: nothing touches the disk before the first ``next()``, so the
        caller can create it anywhere and iterate it in a worker thread.
        """
        if rel:
            where = self._fs.existing(rel)
            if where.info is None or not stat.S_ISDIR(where.info.st_mode):
                refuse(rel, "it is not a directory")
        else:
            self._fs.check_root()
        yield from tree.walk(
            self._fs.root_b, start=rel, on_error=disk.ignore_vanished, skip=is_internal
        )

    def open_read(self, rel: bytes) -> int:
        """Open regular file ``rel`` for reading and return its fd (the caller closes it)."""
        with disk.translate_errors(rel):
            where = self._fs.existing(rel)
            # O_NONBLOCK: opening a FIFO swapped in meanwhile must not hang this thread.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(where.path, flags)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                refuse(rel, "it is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def hash_file(self, rel: bytes) -> bytes:
        """Return the content hash of file ``rel`` (``tree.new_hash``), computed here."""
        fd = self.open_read(rel)
        try:
            digest = tree.new_hash()
            while chunk := os.read(fd, _READ_BLOCK):
                digest.update(chunk)
        finally:
            os.close(fd)
        return digest.digest()

    def folders(self, limit: int = MAX_FOLDERS) -> tuple[builtins.list[FolderTotals], bool]:
        """Return the jail's top-level folders with their totals, and whether more exist.

        Only what is inside this jail, never through a link (nor counting one); files at
        the top level and internal names are left out. Walks everything: a one-off.
        """
        fs = self._fs
        fs.check_root()
        found: builtins.list[FolderTotals] = []
        more = False
        with os.scandir(fs.root_b) as entries:
            names = sorted(
                entry.name
                for entry in entries
                if entry.is_dir(follow_symlinks=False) and not is_internal(entry.name, True)
            )
        for name in names:
            if len(found) >= limit:
                more = True
                break
            totals = _totals(fs.root_b + b"/" + name)
            if totals is not None:
                found.append(FolderTotals(name, *totals))
        return found, more

    def trash_report(self) -> dict[str, Any]:
        """What the trash holds, as the usage answer and the host application say it.

        ``trash`` bytes; ``trash_oldest``/``trash_newest`` its parts' stamps (seconds);
        ``trash_days`` the host's retention, ``trash_days_longest`` the longest a peer asked.
        """
        trash = self.trash_usage()
        return {
            "trash": trash.bytes,
            "trash_oldest": trash.oldest,
            "trash_newest": trash.newest,
            "trash_days": self.retention_days(b""),
            "trash_days_longest": self.longest_retention(),
        }

    def trash_usage(self) -> TrashUsage:
        """Return what the trash holds (walked: call it when it matters, not at every probe)."""
        trash_b = self._fs.trash_b
        total = 0
        stamps: builtins.list[float] = []
        try:
            names = os.listdir(trash_b)
        except FileNotFoundError:
            return TrashUsage(0, None, None)
        for name in names:
            path = trash_b + b"/" + name
            when = stamp_time(name)
            if when is not None:
                stamps.append(when)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                total += DIR_CHARGE + disk.tree_charge(path)
            elif stat.S_ISREG(info.st_mode):
                total += charge(info.st_size)
        return TrashUsage(total, min(stamps, default=None), max(stamps, default=None))

    # --- retention, usage and state

    def set_retention(self, folder: str, days: int) -> None:
        """Ask that the trash of ``folder`` be kept ``days`` days (capped at 3650).

        Requests only ever grow: the effective retention is the longest of the host's and
        every request, so a compromised peer cannot shorten what protects its replicas.
        """
        self._trash.set_retention(folder, days)
        self.save_state()

    def retention_days(self, folder: bytes) -> int:
        """Return the effective trash retention of ``folder`` (first path component), in days."""
        return self._trash.retention_days(folder)

    def longest_retention(self) -> int:
        """Return the longest trash retention of any folder (the host's, or a peer's ask)."""
        return max([self._trash.retention_days(b""), *self._trash.requested().values()])

    def usage(self) -> JailUsage:
        """Return the peer's usage and quota."""
        return JailUsage(used=self.quota.used, reserved=self.quota.reserved, quota=self.quota.limit)

    def save_state(self) -> None:
        """Write the usage and the requested retentions to state.json, atomically."""
        with self._save_lock:
            retention = self._trash.requested()
            payload = {"format": _STATE_FORMAT, "used": self.quota.used, "retention": retention}
            data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
            write_file_atomic(self.state_path, data, mode=0o600)

    def rescan(self) -> int:
        """Recompute ``used`` from disk (jail, trash, partials), persist it and return it."""
        fs = self._fs
        fs.check_root()
        total = sum(disk.tree_charge(path) for path in (fs.root_b, fs.trash_b, fs.partial_b))
        self.quota.set_used(total)
        self.save_state()
        return total

    # --- purge (host only)

    def purge(self, now: float) -> int:
        """Remove trash past its retention and stale partials; return the bytes freed."""
        freed = self._trash.purge(now) + self._uploads.purge(now)
        self.quota.credit(freed)
        return freed


def _totals(top: bytes) -> tuple[int, int, float] | None:
    """Files, bytes and the latest ctime under directory ``top`` (None: it vanished)."""
    files = size = 0
    try:
        latest = os.lstat(top).st_ctime
    except FileNotFoundError:
        return None
    pending = [top]
    while pending:
        path = pending.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    latest = max(latest, info.st_ctime)
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(path + b"/" + entry.name)
                    elif stat.S_ISREG(info.st_mode):
                        files += 1
                        size += info.st_size
        except FileNotFoundError, NotADirectoryError:
            continue
    return files, size, latest
