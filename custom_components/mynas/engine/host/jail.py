"""Hosted space: what this node stores for its peers, one jail per peer (blocking I/O).

Layout under the storage root::

    <storage>/<peer>/                              the peer's jail: all it sees and owns
    <storage>/.mynas/peers/<peer>/state.json       persisted usage and requested retentions
    <storage>/.mynas/trash/<peer>/<stamp>/<rel>    old versions moved away by overwrite/delete
    <storage>/.mynas/partial/<peer>/<..>.part      resumable large uploads
    <storage>/.mynas/tmp/<peer>/                   temp files of in-flight batch writes

The rules this module enforces (DESIGN.md, invariants 2 to 5):

* **Jail.** Every path a peer sends is relative ``bytes``; ``check_path`` refuses traversal,
  absolute paths, NUL, over-long names and paths, deep trees and any component starting with
  ``.mynas``; ``resolve`` then runs ``lstat`` on every existing component and refuses symlinks and
  special files, and final opens use ``O_NOFOLLOW``. Peers cannot create links, so the only
  links a jail can hold are ones the host made, and those are refused wherever they are.
* **Quota.** Usage counts what the disk really holds for a peer: its jail, its trash and its
  partial uploads, each file by ``charge(size)`` (4 KiB blocks, at least one) and each
  directory by ``DIR_CHARGE``. Space is reserved before any byte or directory reaches the
  disk, so ``used + reserved`` always covers what is on disk, and ``rescan`` recomputes
  ``used`` from disk with the same rule.
* **Trash.** Overwrite and delete move the old version to the peer's trash (outside its jail);
  it still counts against the quota and only ``purge``, run by the host, removes it, after
  the effective retention of its folder: the host's, or longer if the peer asked for more.
* **Atomic, durable writes.** Small files come in batches: each is written to a temp file,
  one ``syncfs`` makes the whole batch durable, then each takes its final name (an existing
  version is hard-linked into the trash first, so the target always holds a complete
  version), and a second ``syncfs`` makes the renames durable before the caller acknowledges.

Unfinished writes come in two kinds. Batch temp files never outlive the call that made them,
even when it fails (and ``clean_tmp`` removes those of a crashed process at start). A large
file's partial, on the contrary, is kept in the internal resume area when its upload breaks
off, so the next run resumes where it stopped; it stays counted in the quota and ``purge``
removes it after ``PARTIAL_MAX_AGE`` without activity. Its name carries the length known to
be on disk (fsynced every ``CHECKPOINT`` bytes and when the upload is abandoned), so a resume
after a power cut never trusts bytes the disk may not have kept.

Quota of a partial: it is charged ``charge(length)`` for its current length, like any file.
``begin_upload`` reserves the rest of the final charge (``charge(size) - charge(length)``);
each write moves the growth from reserved to used; ``abandon`` keeps the partial's charge as
used and releases the rest; ``discard`` credits it back.

Everything here blocks: call it from worker threads, never from an event loop. Several threads
may work on the same jail at once; the quota has its own lock, and moves into the trash are
serialised per jail. ``rescan`` should run before a jail is served (the server does it at
start): writes racing with it may be missed until the next rescan.
"""

from __future__ import annotations

import calendar
from collections.abc import Buffer, Callable, Iterator, Sequence
import contextlib
import ctypes
from dataclasses import dataclass
import errno
import functools
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
import re
import stat
import threading
import time
from types import TracebackType
from typing import Any, NoReturn, Self
import unicodedata

from .. import tree
from ..errors import MyNasError, PathRefused, PeerDiskFull, ProtocolError, QuotaExceeded
from ..storage_root import INTERNAL_DIR, write_file_atomic

_LOGGER = logging.getLogger(__name__)

BLOCK = 4096
DIR_CHARGE = BLOCK
MAX_NAME = 255
MAX_PATH = 4096
MAX_DEPTH = 256  # every walk here recurses; real backups are far shallower
MAX_PEER_NAME = 64
MAX_RETENTION_DAYS = 3650
MAX_RETENTION_FOLDERS = 1000
_DAY = 86400
PARTIAL_MAX_AGE = 7 * _DAY
CHECKPOINT = 64 << 20

_READ_BLOCK = 1 << 20
_INTERNAL = INTERNAL_DIR.encode()
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_STAMP_RE = re.compile(rb"(\d{8}T\d{6}Z)(?:~\d+)?")
_MAX_COLLISIONS = 1000
_STAMP_ROOM = len("YYYYmmddTHHMMSSZ~999")
_KERNEL_PATH_MAX = 4095  # PATH_MAX counts the terminating NUL
_MTIME_RANGE = range(-(1 << 63), 1 << 63)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_BAD_PATH = frozenset({errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})
_STATE_FORMAT = 1
_AREAS = ("peers", "trash", "partial", "tmp")  # internal folders, one subfolder per peer
# Directories of a jail are opened with these: a symlink or a special file fails the open.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)
# Directory handles a batch keeps along its current path; deeper levels are opened on demand.
_HELD_LEVELS = 16

type BatchResults = list[MyNasError | None]


# --- names, paths and charges ---------------------------------------------------------------


def validate_peer_name(name: str) -> str:
    """Return ``name`` if it can name a peer's folders on disk; raise ValueError otherwise."""
    if not 1 <= len(name) <= MAX_PEER_NAME:
        raise ValueError(f"a peer name has 1 to {MAX_PEER_NAME} characters, not {len(name)}")
    if name.startswith("."):
        raise ValueError(f"a peer name cannot start with '.': {name!r}")
    if "/" in name:
        raise ValueError(f"a peer name cannot contain '/': {name!r}")
    # isprintable() is False for NUL, control, format (bidi, zero-width) and surrogate
    # characters: names must look like what they are.
    if not name.isprintable():
        raise ValueError(f"a peer name cannot contain control or invisible characters: {name!r}")
    if len(name.encode()) > MAX_NAME:
        raise ValueError(f"a peer name takes at most {MAX_NAME} bytes in UTF-8: {name!r}")
    return name


def charge(size: int) -> int:
    """Return the bytes a file of ``size`` bytes costs: whole 4 KiB blocks, at least one."""
    if size < 0:
        raise ValueError(f"negative size: {size}")
    return max(1, -(-size // BLOCK)) * BLOCK


def check_path(rel: bytes) -> bytes:
    """Return ``rel`` if it is an acceptable jail-relative path; raise PathRefused otherwise.

    Purely syntactic: the disk is not looked at (``Jail.resolve`` does that).
    """
    if (
        # The common case in one pass of C: short enough that no component (nor the depth)
        # can be over a limit, and no empty component nor one that starts with '.'.
        0 < len(rel) <= MAX_NAME
        and b"\0" not in rel
        and b"//" not in rel
        and b"/." not in rel
        and rel[0] not in b"/."
        and rel[-1] != 0x2F  # '/'
    ):
        return rel
    if not rel:
        _refuse(rel, "the path is empty")
    if len(rel) > MAX_PATH:
        _refuse(rel, f"the path is longer than {MAX_PATH} bytes")
    if b"\0" in rel:
        _refuse(rel, "the path contains a NUL byte")
    if rel.startswith(b"/"):
        _refuse(rel, "absolute paths are not allowed")
    if rel.endswith(b"/"):
        _refuse(rel, "the path ends with '/'")
    names = rel.split(b"/")
    if len(names) > MAX_DEPTH:
        _refuse(rel, f"the path is more than {MAX_DEPTH} levels deep")
    for name in names:
        if not name:
            _refuse(rel, "the path has an empty component ('//')")
        if name in (b".", b".."):
            _refuse(rel, "'.' and '..' components are not allowed")
        if len(name) > MAX_NAME:
            _refuse(rel, f"a component is longer than {MAX_NAME} bytes")
        if name.startswith(_INTERNAL):
            _refuse(rel, f"names starting with {INTERNAL_DIR!r} are reserved")
    return rel


def _show(rel: bytes) -> str:
    """Return a short printable form of a peer path for messages and logs."""
    text = repr(rel[:120].decode("utf-8", "backslashreplace"))
    return text + "..." if len(rel) > 120 else text


def _refuse(rel: bytes, why: str) -> NoReturn:
    raise PathRefused(f"refused path {_show(rel)}: {why}")


def _check_mtime(rel: bytes, mtime_ns: int) -> None:
    if mtime_ns not in _MTIME_RANGE:
        raise ProtocolError(f"modification time out of range for {_show(rel)}: {mtime_ns}")


def _file_mode(mode: int) -> int:
    # Only the owner-exec bit is kept, as information: no s-bits, sticky or odd permissions.
    return 0o755 if mode & 0o100 else 0o644


@functools.cache
def _umask() -> int | None:
    """Return the process umask (read once, from /proc), or None where it cannot be read.

    A temp file created with its final mode needs no fchmod unless the umask takes bits away.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError, ValueError, IndexError:
        pass
    return None  # pragma: no cover - every Linux since 4.7 has the line


def _fold(name: str) -> str:
    # Names that differ only in case or Unicode form would share a folder on some disks.
    return unicodedata.normalize("NFKC", name).casefold()


def _as_error(err: OSError, rel: bytes) -> MyNasError | None:
    """Return the MyNasError an OSError stands for, or None if it should pass as is."""
    if err.errno in _DISK_FULL:
        return PeerDiskFull(f"{err.strerror} while storing {_show(rel)}")
    if err.errno in _BAD_PATH:
        return PathRefused(f"refused path {_show(rel)}: {err.strerror}")
    return None


@contextlib.contextmanager
def _disk_errors(rel: bytes) -> Iterator[None]:
    """Turn a full disk or a refused path into MyNasError; other OSErrors pass unchanged."""
    try:
        yield
    except OSError as err:
        mapped = _as_error(err, rel)
        if mapped is None:
            raise
        raise mapped from err


def _batch_error(err: MyNasError | OSError, rel: bytes) -> MyNasError:
    """Return the per-file error of a batch (every failure becomes a MyNasError)."""
    if isinstance(err, MyNasError):
        return err
    return _as_error(err, rel) or MyNasError(f"cannot store {_show(rel)}: {err.strerror or err}")


# --- low-level disk helpers -----------------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a write may be short)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _pwrite_all(fd: int, views: list[memoryview], position: int) -> None:
    """Write ``views`` one after the other at ``position``: one pwritev for many buffers."""
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + _IOV_MAX], position)
        position += written
        while first < len(views) and written >= views[first].nbytes:
            written -= views[first].nbytes
            first += 1
        if written:  # a short write stopped inside this buffer
            views[first] = views[first][written:]


def _unlink_quietly(path: bytes) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        _LOGGER.warning("cannot remove %s: %s", os.fsdecode(path), err)


def _ignore_vanished(_path: bytes, err: OSError) -> None:
    # A directory deleted while it is walked is simply not there any more.
    if not isinstance(err, FileNotFoundError):
        raise err


def _is_internal(path: bytes, _is_dir: bool) -> bool:
    return path.rpartition(b"/")[2].startswith(_INTERNAL)


def _tree_charge(root: bytes) -> int:
    """Return the charge of everything under ``root`` (not ``root`` itself)."""
    total = 0
    for entry in tree.walk(root, on_error=_ignore_vanished):
        total += DIR_CHARGE if entry.kind is tree.Kind.DIR else charge(entry.size)
    return total


def _remove_tree(path: bytes) -> int:
    """Delete a file or a directory tree, never following links; return the charge freed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        return charge(info.st_size) if stat.S_ISREG(info.st_mode) else 0
    freed = 0
    for name in os.listdir(path):
        freed += _remove_tree(path + b"/" + name)
    os.rmdir(path)
    return freed + DIR_CHARGE


def _remove_quietly(path: bytes) -> int:
    """Purge ``path`` like ``_remove_tree``; on failure log it and go on with the rest.

    What could not be removed stays counted (the safe side) until the next rescan.
    """
    try:
        return _remove_tree(path)
    except OSError as err:
        _LOGGER.warning("cannot purge %s: %s", os.fsdecode(path), err)
        return 0


def _fsync_dir(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """Return libc's ``syncfs``, or None where there is none (loaded on first use)."""
    try:
        function: Any = ctypes.CDLL(None, use_errno=True).syncfs
    except OSError, AttributeError:  # pragma: no cover - every Linux libc has syncfs
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def _syncfs(path: bytes) -> None:
    """Make everything written on the filesystem holding ``path`` durable."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _stamp_time(name: bytes) -> float | None:
    """Return the UTC time a trash stamp directory's name records, or None if not a stamp."""
    match = _STAMP_RE.fullmatch(name)
    if match is None:
        return None
    return calendar.timegm(time.strptime(match[1].decode(), _STAMP_FORMAT))


def _partial_names(rel: bytes, size: int, mtime_ns: int) -> tuple[bytes, bytes]:
    """Return (slot, key): the partial of ``rel`` is named ``<slot>.<key>.<durable>.part``.

    The slot depends on the path alone (one partial per path); the key also on the size and
    modification time, so a changed file never resumes from the bytes of an older one.
    """
    slot = hashlib.sha256(rel).hexdigest()[:32].encode()
    key = hashlib.sha256(b"%d:%d:%b" % (size, mtime_ns, rel)).hexdigest()[:32].encode()
    return slot, key


# --- quota ----------------------------------------------------------------------------------


class Quota:
    """Bytes a peer may use on this host: ``used`` on disk plus ``reserved`` for writes in flight.

    Thread-safe. Space is reserved before anything reaches the disk, then committed (it is on
    disk) or released (it never got there).
    """

    def __init__(self, limit: int, used: int = 0) -> None:
        if limit < 0 or used < 0:
            raise ValueError(f"negative quota figures: limit {limit}, used {used}")
        self._lock = threading.Lock()
        self._limit = limit
        self._used = used
        self._reserved = 0

    @property
    def limit(self) -> int:
        """Return the most bytes the peer may use."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"negative quota: {value}")
        with self._lock:
            self._limit = value

    @property
    def used(self) -> int:
        """Return the bytes on disk."""
        return self._used

    @property
    def reserved(self) -> int:
        """Return the bytes reserved for writes in flight."""
        return self._reserved

    @property
    def available(self) -> int:
        """Return the bytes that can still be reserved (never negative)."""
        with self._lock:
            return self._available()

    def _available(self) -> int:
        return max(0, self._limit - self._used - self._reserved)

    def reserve(self, amount: int) -> None:
        """Reserve ``amount`` bytes, or raise QuotaExceeded if they do not fit."""
        _check_amount(amount)
        with self._lock:
            available = self._available()
            if amount > available:
                raise QuotaExceeded(needed=amount, available=available)
            self._reserved += amount

    def commit(self, amount: int) -> None:
        """Turn ``amount`` reserved bytes into used bytes: they are on disk now."""
        with self._lock:
            self._unreserve(amount)
            self._used += amount

    def release(self, amount: int) -> None:
        """Drop a reservation of ``amount`` bytes that never reached the disk."""
        with self._lock:
            self._unreserve(amount)

    def credit(self, amount: int) -> None:
        """Lower ``used`` by ``amount`` bytes that left the disk (e.g. a purge)."""
        _check_amount(amount)
        with self._lock:
            # Clamped: a stale persisted figure may be lower than what is freed.
            self._used = max(0, self._used - amount)

    def set_used(self, amount: int) -> None:
        """Set ``used`` to a figure measured on disk."""
        _check_amount(amount)
        with self._lock:
            self._used = amount

    def _unreserve(self, amount: int) -> None:
        _check_amount(amount)
        if amount > self._reserved:
            raise ValueError(f"{amount} bytes are not reserved (only {self._reserved})")
        self._reserved -= amount


def _check_amount(amount: int) -> None:
    if amount < 0:
        raise ValueError(f"negative amount of bytes: {amount}")


# --- one peer's space -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """One file of a batch: jail-relative path, content, modification time and mode."""

    path: bytes
    data: bytes | memoryview
    mtime_ns: int
    mode: int


@dataclass(frozen=True, slots=True)
class JailUsage:
    """A peer's usage in bytes: on disk (jail, trash, partials), reserved, and its quota."""

    used: int
    reserved: int
    quota: int


@dataclass(frozen=True, slots=True)
class _Located:
    """A resolved path: absolute form, components, how many exist, and the last one's stat."""

    path: bytes
    names: list[bytes]
    existing: int
    info: os.stat_result | None


class Jail:
    """One peer's hosted space: its jail, quota, trash and partial uploads.

    Made by ``HostedSpace.jail``, which creates its directories. Paths are jail-relative
    ``bytes``; every operation goes through ``resolve``. Blocking and thread-safe.
    """

    def __init__(self, storage: Path, name: str, quota: int, *, trash_days: int) -> None:
        self.name = validate_peer_name(name)
        self.root = storage / name
        internal = storage / INTERNAL_DIR
        self.trash_dir = internal / "trash" / name
        self.partial_dir = internal / "partial" / name
        self.tmp_dir = internal / "tmp" / name
        self.state_path = internal / "peers" / name / "state.json"
        self._storage_b = os.fsencode(storage)
        self._root_b = os.fsencode(self.root)
        self._trash_b = os.fsencode(self.trash_dir)
        self._partial_b = os.fsencode(self.partial_dir)
        self._tmp_b = os.fsencode(self.tmp_dir)
        # The longest path built from a peer path is its trash path: keep it under PATH_MAX.
        self._max_rel = min(MAX_PATH, _KERNEL_PATH_MAX - len(self._trash_b) - 2 - _STAMP_ROOM)
        self._trash_days = trash_days
        # Renames into the jail and into the trash; the set of active uploads.
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        # Temp names: a random prefix per process and jail (a leftover of a crash that
        # clean_tmp missed cannot collide) and a counter (cheaper than a uuid4 per file).
        self._temp_prefix = self._tmp_b + b"/" + os.urandom(8).hex().encode() + b"-"
        self._temp_count = itertools.count()
        self._uploads: set[bytes] = set()
        used, self._retention = self._load_state()
        self.quota = Quota(quota, used)

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
        return self._locate(rel).path

    def _missing_root(self) -> PathRefused:
        return PathRefused(f"the space of {self.name} is missing on this host")

    def _odd_root(self) -> PathRefused:
        return PathRefused(
            f"the space of {self.name} ({self.root}) is not a plain directory "
            "(a symbolic link?): refusing to use it"
        )

    def _check_root(self) -> None:
        try:
            info = os.lstat(self._root_b)
        except FileNotFoundError:
            raise self._missing_root() from None
        if not stat.S_ISDIR(info.st_mode):
            raise self._odd_root()

    def _open_root(self) -> int:
        """Open the jail root itself (never through a link) and return the handle."""
        try:
            return os.open(self._root_b, _DIR_FLAGS)
        except FileNotFoundError:
            raise self._missing_root() from None
        except NotADirectoryError:
            raise self._odd_root() from None

    def _names(self, rel: bytes) -> list[bytes]:
        """Return the components of ``rel`` once it passed ``check_path`` and the host's length."""
        names = check_path(rel).split(b"/")
        if len(rel) > self._max_rel:
            _refuse(rel, f"the path is longer than this host can store ({self._max_rel} bytes)")
        return names

    def _locate(self, rel: bytes) -> _Located:
        names = self._names(rel)
        self._check_root()
        path = self._root_b
        info: os.stat_result | None = None
        for depth, name in enumerate(names):
            path += b"/" + name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                return _Located(self._root_b + b"/" + rel, names, depth, None)
            if stat.S_ISLNK(info.st_mode):
                _refuse(rel, f"{_show(b'/'.join(names[: depth + 1]))} is a symbolic link")
            if depth < len(names) - 1 and not stat.S_ISDIR(info.st_mode):
                _refuse(rel, f"{_show(b'/'.join(names[: depth + 1]))} is not a directory")
        assert info is not None  # names is never empty
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            _refuse(rel, "it is neither a regular file nor a directory")
        return _Located(path, names, len(names), info)

    def _existing(self, rel: bytes) -> _Located:
        where = self._locate(rel)
        if where.info is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(rel))
        return where

    # --- directories

    def _ensure_dir(self, path: bytes, rel: bytes) -> None:
        """Make ``path`` a directory, charging DIR_CHARGE if it has to be created."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self.quota.reserve(DIR_CHARGE)
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                self.quota.release(DIR_CHARGE)
                info = os.lstat(path)  # another thread made it meanwhile
            except BaseException:
                self.quota.release(DIR_CHARGE)
                raise
            else:
                self.quota.commit(DIR_CHARGE)
                return
        if not stat.S_ISDIR(info.st_mode):
            _refuse(rel, f"{os.fsdecode(path)!r} is in the way of a directory")

    def _make_dirs(self, where: _Located, *, include_last: bool) -> None:
        """Create the missing directories of ``where`` (its parents, or all of it)."""
        end = len(where.names) if include_last else len(where.names) - 1
        path = b"/".join([self._root_b, *where.names[: where.existing]])
        for name in where.names[where.existing : end]:
            path += b"/" + name
            self._ensure_dir(path, b"/".join(where.names))

    def make_dir(self, rel: bytes, mtime_ns: int | None = None) -> None:
        """Create directory ``rel`` and its missing parents; set its mtime when given."""
        if mtime_ns is not None:
            _check_mtime(rel, mtime_ns)
        with _disk_errors(rel):
            where = self._locate(rel)
            if where.info is None:
                self._make_dirs(where, include_last=True)
            elif not stat.S_ISDIR(where.info.st_mode):
                _refuse(rel, "a file is in the way")
            if mtime_ns is not None:
                os.utime(where.path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    # --- writes

    def write_batch(self, files: Sequence[IncomingFile]) -> BatchResults:
        """Store a batch of files atomically and durably; return one result per file.

        The caller has reserved ``charge(len(data))`` for each file in ``quota``: it is
        committed when the file is in place and released otherwise. A result is None once
        the file is on disk under its final name, durably; or the MyNasError that stopped it.
        One file's failure never fails the others, and no temp file outlives the call.

        Each file is written to a temp file (internal, so nothing of the jail is looked at
        yet); one ``syncfs`` makes the contents durable; then, under the jail lock, each temp
        is renamed into a directory handle opened link-free from the jail root (``_Dirs``),
        and a second ``syncfs`` makes the renames durable.
        """
        results: BatchResults = [None] * len(files)
        owed = {i: charge(memoryview(f.data).nbytes) for i, f in enumerate(files)}
        temps: dict[int, bytes] = {}

        def fail(index: int, err: MyNasError | OSError) -> None:
            results[index] = _batch_error(err, files[index].path)
            self.quota.release(owed.pop(index))

        try:
            for index, item in enumerate(files):
                try:
                    temps[index] = self._stage(item)
                except (MyNasError, OSError) as err:
                    fail(index, err)
            try:
                if temps:
                    self._sync()  # contents durable before any file takes its final name
            except OSError as err:
                for index in temps:
                    fail(index, err)
                return results
            installed = []
            if temps:
                with self._lock, _Dirs(self) as dirs:
                    for index, temp in list(temps.items()):
                        try:
                            self._install_at(dirs, temp, files[index].path)
                        except (MyNasError, OSError) as err:
                            fail(index, err)
                            continue
                        del temps[index]
                        self.quota.commit(owed.pop(index))
                        installed.append(index)
            try:
                if installed:
                    self._sync()  # the renames durable before the caller acknowledges
            except OSError as err:
                # In place and counted, but not known durable: the caller must not acknowledge.
                for index in installed:
                    results[index] = _batch_error(err, files[index].path)
        finally:
            for temp in temps.values():
                _unlink_quietly(temp)
            for amount in owed.values():
                self.quota.release(amount)
        return results

    def _new_temp(self, mode: int) -> tuple[bytes, int]:
        """Create a new temp file with ``mode``; return its path and an fd open for writing."""
        temp = self._temp_prefix + b"%d.tmp" % next(self._temp_count)
        return temp, os.open(temp, _TEMP_FLAGS, mode)

    def _stage(self, item: IncomingFile) -> bytes:
        """Write one file of a batch to a new temp file; return the temp's path."""
        _check_mtime(item.path, item.mtime_ns)
        self._names(item.path)
        mode = _file_mode(item.mode)
        temp, fd = self._new_temp(mode)
        try:
            try:
                _write_all(fd, item.data)
                umask = _umask()
                if umask is None or mode & umask:  # created with its final mode otherwise
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(temp)
            raise
        return temp

    def _install(self, source: bytes, rel: bytes) -> None:
        """Rename a complete file into place at ``rel``, moving an old version to the trash."""
        with self._lock, _Dirs(self) as dirs:
            self._install_at(dirs, source, rel)

    def _install_at(self, dirs: _Dirs, source: bytes, rel: bytes) -> None:
        """``_install`` with the jail lock held and the batch's directory handles."""
        names = self._names(rel)
        parent = dirs.open(names, len(names) - 1, rel)  # missing parents are made again
        name = names[-1]
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(source, name, dst_dir_fd=parent)
            return
        if stat.S_ISREG(info.st_mode):
            self._replace_file(source, parent, name, rel)
        elif stat.S_ISDIR(info.st_mode):
            _refuse(rel, "a directory is in the way")
        elif stat.S_ISLNK(info.st_mode):
            _refuse(rel, f"{_show(rel)} is a symbolic link")
        else:
            _refuse(rel, "it is neither a regular file nor a directory")

    def _replace_file(self, source: bytes, parent: int, name: bytes, rel: bytes) -> None:
        """Replace file ``name`` of directory ``parent`` by ``source``, old version to trash."""
        dest = self._trash_slot(rel)
        try:
            # A hard link first: the target keeps a complete version at every instant.
            os.link(name, dest, src_dir_fd=parent, follow_symlinks=False)
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            # Filesystems without hard links (exFAT, FAT): move it, put it back on failure.
            os.rename(name, dest, src_dir_fd=parent)
            try:
                os.rename(source, name, dst_dir_fd=parent)
            except BaseException:
                os.rename(dest, name, dst_dir_fd=parent)
                raise
            return
        try:
            os.rename(source, name, dst_dir_fd=parent)
        except BaseException:
            _unlink_quietly(dest)
            raise

    def _open_dir(self, parent: int, names: list[bytes], depth: int, rel: bytes) -> int:
        """Open directory ``names[depth]`` inside handle ``parent``, making it if missing.

        Never through a link: O_NOFOLLOW | O_DIRECTORY fails on a symlink, a file or a
        special file (no FIFO is ever opened), and the failure is reported like ``resolve``.
        """
        try:
            return self._open_subdir(parent, names, depth, rel)
        except FileNotFoundError:
            pass
        self.quota.reserve(DIR_CHARGE)
        try:
            os.mkdir(names[depth], 0o755, dir_fd=parent)
        except FileExistsError:
            self.quota.release(DIR_CHARGE)  # another thread made it meanwhile
        except BaseException:
            self.quota.release(DIR_CHARGE)
            raise
        else:
            self.quota.commit(DIR_CHARGE)
        return self._open_subdir(parent, names, depth, rel)

    def _open_subdir(self, parent: int, names: list[bytes], depth: int, rel: bytes) -> int:
        name = names[depth]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except NotADirectoryError:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            where = _show(b"/".join(names[: depth + 1]))
            if stat.S_ISLNK(info.st_mode):
                _refuse(rel, f"{where} is a symbolic link")
            _refuse(rel, f"{where} is not a directory")

    def _trash_slot(self, rel: bytes) -> bytes:
        """Return a free trash path for ``rel`` with its parents made (call under the lock).

        ``<stamp>/<rel>``, or ``<stamp>~1/<rel>``... when that path is taken (same second)
        or a parent in the way is a file: the suffix goes on the stamp, so names never grow.
        """
        stamp = time.strftime(_STAMP_FORMAT, time.gmtime()).encode()
        names = rel.split(b"/")
        for attempt in range(_MAX_COLLISIONS):
            top = self._trash_b + b"/" + (stamp + b"~%d" % attempt if attempt else stamp)
            dest = top + b"/" + rel
            if os.path.lexists(dest):
                continue
            try:
                self._ensure_dir(top, rel)
                path = top
                for name in names[:-1]:
                    path += b"/" + name
                    self._ensure_dir(path, rel)
            except PathRefused:
                continue
            return dest
        _refuse(rel, "too many versions of it were moved to the trash this second")

    def sync(self) -> None:
        """Make everything written on the storage's filesystem so far durable (one syncfs)."""
        self._sync()

    def _sync(self) -> None:
        _syncfs(self._storage_b)

    def begin_upload(self, rel: bytes, size: int, mtime_ns: int, mode: int) -> Upload:
        """Start (or resume) receiving a large file; ``upload.offset`` says where to go on.

        Reserves what the file will cost beyond its partial's current charge, before any
        byte is written. Only one upload per path at a time (PathRefused otherwise).
        """
        if size < 0:
            raise ProtocolError(f"negative size for {_show(rel)}: {size}")
        _check_mtime(rel, mtime_ns)
        with _disk_errors(rel):
            where = self._locate(rel)
            if where.info is not None and stat.S_ISDIR(where.info.st_mode):
                _refuse(rel, "a directory is in the way")
            slot, key = _partial_names(rel, size, mtime_ns)
            with self._lock:
                if slot in self._uploads:
                    _refuse(rel, "it is already being uploaded")
                self._uploads.add(slot)
            try:
                return self._open_partial(rel, size, mtime_ns, mode, (slot, key))
            except BaseException:
                self._end_upload(slot)
                raise

    def _open_partial(
        self, rel: bytes, size: int, mtime_ns: int, mode: int, names: tuple[bytes, bytes]
    ) -> Upload:
        """Resume the partial of this very version of ``rel``, or start a new one."""
        slot, key = names
        found: tuple[bytes, int] | None = None
        for name in os.listdir(self._partial_b):
            if not name.startswith(slot + b"."):
                continue
            path = self._partial_b + b"/" + name
            fields = name.split(b".")
            if found is None and len(fields) == 4 and fields[1] == key and fields[2].isdigit():
                found = (path, int(fields[2]))
            else:  # a partial of an older version of the file
                self.quota.credit(_remove_tree(path))
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if found is None:
            path = self._partial_b + b"/" + b".".join([slot, key, b"0", b"part"])
            self.quota.reserve(charge(size))
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except BaseException:
                self.quota.release(charge(size))
                raise
            self.quota.commit(charge(0))
            reserved = charge(size) - charge(0)
            offset = 0
        else:
            path, durable = found
            fd = os.open(path, flags)
            try:
                length = os.fstat(fd).st_size
                # Bytes past the last checkpoint may not have survived a power cut: drop them.
                offset = min(durable, length, size)
                if length > offset:
                    os.ftruncate(fd, offset)
                    self.quota.credit(charge(length) - charge(offset))
                reserved = charge(size) - charge(offset)
                self.quota.reserve(reserved)
                os.utime(fd)  # touched: it is in use again
            except BaseException:
                os.close(fd)
                raise
        return Upload(
            self,
            rel,
            size=size,
            mtime_ns=mtime_ns,
            mode=mode,
            path=path,
            fd=fd,
            offset=offset,
            reserved=reserved,
        )

    def _end_upload(self, slot: bytes) -> None:
        with self._lock:
            self._uploads.discard(slot)

    # --- deletes and metadata

    def delete(self, rel: bytes) -> None:
        """Move file or directory tree ``rel`` to the trash (usage is unchanged)."""
        with _disk_errors(rel), self._lock:
            where = self._existing(rel)
            os.rename(where.path, self._trash_slot(rel))

    def set_mtime(self, rel: bytes, mtime_ns: int) -> None:
        """Set the modification time of a file or directory (never through a link)."""
        _check_mtime(rel, mtime_ns)
        with _disk_errors(rel):
            where = self._existing(rel)
            os.utime(where.path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    # --- reads

    def stat(self, rel: bytes) -> tree.Entry:
        """Return the entry of one file or directory (FileNotFoundError if missing)."""
        info = self._existing(rel).info
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
            where = self._existing(rel)
            if where.info is None or not stat.S_ISDIR(where.info.st_mode):
                _refuse(rel, "it is not a directory")
        else:
            self._check_root()
        yield from tree.walk(self._root_b, start=rel, on_error=_ignore_vanished, skip=_is_internal)

    def open_read(self, rel: bytes) -> int:
        """Open regular file ``rel`` for reading and return its fd (the caller closes it)."""
        with _disk_errors(rel):
            where = self._existing(rel)
            # O_NONBLOCK: opening a FIFO swapped in meanwhile must not hang this thread.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(where.path, flags)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                _refuse(rel, "it is not a regular file")
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

    # --- retention, usage and state

    def set_retention(self, folder: str, days: int) -> None:
        """Ask that the trash of ``folder`` be kept ``days`` days (capped at 3650).

        Requests only ever grow: the effective retention is the longest of the host's and
        every request, so a compromised peer cannot shorten what protects its replicas.
        """
        name = check_path(os.fsencode(folder))
        if b"/" in name:
            _refuse(name, "a folder is one name, not a path")
        if days < 0:
            raise ProtocolError(f"negative retention for {folder!r}: {days}")
        with self._lock:
            if folder not in self._retention and len(self._retention) >= MAX_RETENTION_FOLDERS:
                raise ProtocolError(
                    f"too many folders with a retention (max. {MAX_RETENTION_FOLDERS})"
                )
            requested = min(days, MAX_RETENTION_DAYS)
            self._retention[folder] = max(self._retention.get(folder, 0), requested)
        self.save_state()

    def retention_days(self, folder: bytes) -> int:
        """Return the effective trash retention of ``folder`` (first path component), in days."""
        with self._lock:
            requested = self._retention.get(os.fsdecode(folder), 0)
        return max(self._trash_days, requested)

    def usage(self) -> JailUsage:
        """Return the peer's usage and quota."""
        return JailUsage(used=self.quota.used, reserved=self.quota.reserved, quota=self.quota.limit)

    def _load_state(self) -> tuple[int, dict[str, int]]:
        try:
            data = json.loads(self.state_path.read_bytes())
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

    def save_state(self) -> None:
        """Write the usage and the requested retentions to state.json, atomically."""
        with self._save_lock:
            with self._lock:
                retention = dict(self._retention)
            payload = {"format": _STATE_FORMAT, "used": self.quota.used, "retention": retention}
            data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
            write_file_atomic(self.state_path, data, mode=0o600)

    def rescan(self) -> int:
        """Recompute ``used`` from disk (jail, trash, partials), persist it and return it."""
        self._check_root()
        total = sum(_tree_charge(path) for path in (self._root_b, self._trash_b, self._partial_b))
        self.quota.set_used(total)
        self.save_state()
        return total

    # --- purge (host only)

    def purge(self, now: float) -> int:
        """Remove trash past its retention and stale partials; return the bytes freed."""
        freed = self._purge_trash(now) + self._purge_partials(now)
        self.quota.credit(freed)
        return freed

    def _purge_trash(self, now: float) -> int:
        freed = 0
        try:
            stamps = sorted(os.listdir(self._trash_b))
        except FileNotFoundError:
            return 0
        for name in stamps:
            when = _stamp_time(name)
            top = self._trash_b + b"/" + name
            if when is None or not stat.S_ISDIR(os.lstat(top).st_mode):
                continue  # not made by us: left alone (and still counted)
            for folder in os.listdir(top):
                if now - when > self.retention_days(folder) * _DAY:
                    freed += _remove_quietly(top + b"/" + folder)
            with self._lock:  # no move into the trash can be filling it meanwhile
                try:
                    os.rmdir(top)
                except OSError:
                    continue  # some folder is kept longer
            freed += DIR_CHARGE
        return freed

    def _purge_partials(self, now: float) -> int:
        freed = 0
        with self._lock:  # an upload starting now cannot take a partial being removed
            for name in os.listdir(self._partial_b):
                if name.partition(b".")[0] in self._uploads:
                    continue
                path = self._partial_b + b"/" + name
                # ctime: every write, resume or rename touches it, and no peer can set it.
                if now - os.lstat(path).st_ctime > PARTIAL_MAX_AGE:
                    freed += _remove_quietly(path)
        return freed


class _Dirs:
    """Handles on a jail's directories, for the renames of one batch (under the jail lock).

    Each directory is opened relative to its parent's handle, starting from the jail root,
    with O_NOFOLLOW | O_DIRECTORY: a symlink anywhere on the way fails the open, and a rename
    into a handle lands in that very directory whatever is swapped in on its path meanwhile.
    The handles along the current path are kept, so the files of one directory (a batch
    comes in tree order) cost no lookup at all; they are closed when the batch ends, so a
    change made on disk between batches (by the host's admin) is seen by the next one.
    """

    def __init__(self, jail: Jail) -> None:
        self._jail = jail
        self._names: list[bytes] = []  # the current directory, jail-relative
        self._fds: list[int] = []  # [root, names[0], names[:2]...], at most _HELD_LEVELS deep
        self._deep: tuple[list[bytes], int] | None = None  # a deeper directory's handle

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._drop_deep()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _drop_deep(self) -> None:
        if self._deep is not None:
            os.close(self._deep[1])
            self._deep = None

    def open(self, names: list[bytes], depth: int, rel: bytes) -> int:
        """Return a handle on directory ``names[:depth]``, making missing ones (for ``rel``)."""
        jail = self._jail
        if not self._fds:
            self._fds.append(jail._open_root())
        held = min(depth, _HELD_LEVELS)
        same = 0
        while same < min(held, len(self._names)) and names[same] == self._names[same]:
            same += 1
        if same < len(self._names):
            self._drop_deep()
            for fd in self._fds[same + 1 :]:
                os.close(fd)
            del self._fds[same + 1 :], self._names[same:]
        for level in range(same, held):
            self._fds.append(jail._open_dir(self._fds[-1], names, level, rel))
            self._names.append(names[level])
        if depth == held:
            return self._fds[-1]
        # Deeper than what is held: walk down from the deepest held handle, keep the end.
        if self._deep is not None and self._deep[0] == names[:depth]:
            return self._deep[1]
        self._drop_deep()
        fd = self._fds[-1]
        try:
            for level in range(held, depth):
                child = jail._open_dir(fd, names, level, rel)
                if level > held:  # only the held handle is not ours to close
                    os.close(fd)
                fd = child
        except BaseException:
            if fd != self._fds[-1]:
                os.close(fd)
            raise
        self._deep = (names[:depth], fd)
        return fd


class Upload:
    """A large file being received into a resumable partial (see the module docstring).

    Used by one thread at a time. End it with ``finish``, ``abandon`` or ``discard``; as a
    context manager it is abandoned on exit unless finished, so a lost connection keeps the
    partial for a later resume.
    """

    def __init__(
        self,
        jail: Jail,
        rel: bytes,
        *,
        size: int,
        mtime_ns: int,
        mode: int,
        path: bytes,
        fd: int,
        offset: int,
        reserved: int,
    ) -> None:
        self.rel = rel
        self.size = size
        self.mtime_ns = mtime_ns
        self.mode = mode
        self.offset = offset
        self._jail = jail
        self._path = path
        self._fd = fd
        self._durable = offset
        self._reserved = reserved
        self._done = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abandon()

    def _check_open(self) -> None:
        if self._done:
            raise ProtocolError(f"the upload of {_show(self.rel)} is already over")

    def write(self, data: Buffer) -> None:
        """Append ``data`` at ``offset``; ProtocolError if it would pass the announced size."""
        self.write_many([data])

    def write_many(self, chunks: Sequence[Buffer]) -> None:
        """Append ``chunks`` in order at ``offset``, in one system call for many of them."""
        self._check_open()
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        end = self.offset + sum(view.nbytes for view in views)
        if end > self.size:
            raise ProtocolError(
                f"{end} bytes sent for {_show(self.rel)}, announced as {self.size} bytes"
            )
        try:
            _pwrite_all(self._fd, views, self.offset)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.offset)  # back to what is counted and known
            raise _batch_error(err, self.rel) from err
        grown = charge(end) - charge(self.offset)
        self._jail.quota.commit(grown)
        self._reserved -= grown
        self.offset = end
        if self.offset - self._durable >= CHECKPOINT:
            with _disk_errors(self.rel):
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Make the bytes so far durable and record their length in the partial's name."""
        if self.offset == self._durable:
            return
        os.fsync(self._fd)
        head, _, _ = self._path.rsplit(b".", 2)
        path = head + b".%d.part" % self.offset
        os.rename(self._path, path)
        self._path = path
        _fsync_dir(os.path.dirname(path))
        self._durable = self.offset

    def finish(self) -> None:
        """Put the complete file in place, durably (the old version goes to the trash).

        On failure the upload stays open: end it with ``abandon`` or ``discard``.
        """
        self._check_open()
        if self.offset != self.size:
            raise ProtocolError(
                f"only {self.offset} of {self.size} bytes received for {_show(self.rel)}"
            )
        with _disk_errors(self.rel):
            os.fchmod(self._fd, _file_mode(self.mode))
            os.utime(self._fd, ns=(self.mtime_ns, self.mtime_ns))
            os.fsync(self._fd)
            self._jail._install(self._path, self.rel)
            self._end()
            self._jail._sync()

    def abandon(self) -> None:
        """Stop for now: keep the partial (and its charge) for a resume, release the rest."""
        if self._done:
            return
        try:
            self._checkpoint()
        except OSError as err:
            _LOGGER.warning("cannot checkpoint the upload of %s: %s", _show(self.rel), err)
        finally:
            self._end()

    def discard(self) -> None:
        """Give up: delete the partial and give back all it cost."""
        if self._done:
            return
        self._end()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            return
        self._jail.quota.credit(charge(self.offset))

    def _end(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._jail.quota.release(self._reserved)
        self._reserved = 0
        self._jail._end_upload(os.path.basename(self._path).partition(b".")[0])


# --- all jails of a storage root ------------------------------------------------------------


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
            jail = self._jails.get(_fold(peer))
            if jail is not None and jail.name != peer:
                raise ValueError(f"peer name {peer!r} is too close to {jail.name!r}")
            if jail is not None:
                jail.quota.limit = quota
                return jail
            for path in self._folders(peer):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
            jail = Jail(self.root, peer, quota, trash_days=self.trash_days)
            self._jails[_fold(peer)] = jail
            return jail

    def _get(self, peer: str) -> Jail:
        with self._lock:
            jail = self._jails.get(_fold(peer))
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
                    _remove_tree(path + b"/" + name)

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
            jail = self._jails.get(_fold(peer))
            if jail is not None and jail.name == peer:
                del self._jails[_fold(peer)]
        for path in self._folders(peer):
            _remove_tree(os.fsencode(path))
