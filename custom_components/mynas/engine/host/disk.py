"""Low-level disk helpers of the hosted space (blocking): writes, removal, durability, errors.

The jail's parts call these as ``disk.name(...)``, looked up when called, so a test can put
a failing disk in place of any one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
from typing import Any

from .. import tree
from ..errors import MyNasError, PathRefused, PeerDiskFull
from .paths import show
from .quota import DIR_CHARGE, charge

_LOGGER = logging.getLogger(__name__)

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_BAD_PATH = frozenset({errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})
_IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)


# --- errors ---------------------------------------------------------------------------------


def as_error(err: OSError, rel: bytes) -> MyNasError | None:
    """Return the MyNasError an OSError stands for, or None if it should pass as is."""
    if err.errno in _DISK_FULL:
        return PeerDiskFull(f"{err.strerror} while storing {show(rel)}")
    if err.errno in _BAD_PATH:
        return PathRefused(f"refused path {show(rel)}: {err.strerror}")
    return None


@contextlib.contextmanager
def translate_errors(rel: bytes) -> Iterator[None]:
    """Turn a full disk or a refused path into MyNasError; other OSErrors pass unchanged."""
    try:
        yield
    except OSError as err:
        mapped = as_error(err, rel)
        if mapped is None:
            raise
        raise mapped from err


def batch_error(err: MyNasError | OSError, rel: bytes) -> MyNasError:
    """Return the per-file error of a batch (every failure becomes a MyNasError)."""
    if isinstance(err, MyNasError):
        return err
    return as_error(err, rel) or MyNasError(f"cannot store {show(rel)}: {err.strerror or err}")


# --- writes ---------------------------------------------------------------------------------


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a write may be short)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, views: list[memoryview], position: int) -> None:
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


@functools.cache
def umask() -> int | None:
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


# --- removal and charges --------------------------------------------------------------------


def unlink_quietly(path: bytes) -> None:
    """Remove file ``path`` if it is there; log (never raise) any other failure."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        _LOGGER.warning("cannot remove %s: %s", os.fsdecode(path), err)


def ignore_vanished(_path: bytes, err: OSError) -> None:
    """``tree.walk``'s error handler: a directory deleted while it is walked is not there."""
    if not isinstance(err, FileNotFoundError):
        raise err


def tree_charge(root: bytes) -> int:
    """Return the charge of everything under ``root`` (not ``root`` itself)."""
    total = 0
    for entry in tree.walk(root, on_error=ignore_vanished):
        total += DIR_CHARGE if entry.kind is tree.Kind.DIR else charge(entry.size)
    return total


def remove_tree(path: bytes) -> int:
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
        freed += remove_tree(path + b"/" + name)
    os.rmdir(path)
    return freed + DIR_CHARGE


def remove_quietly(path: bytes) -> int:
    """Purge ``path`` like ``remove_tree``; on failure log it and go on with the rest.

    What could not be removed stays counted (the safe side) until the next rescan.
    """
    try:
        return remove_tree(path)
    except OSError as err:
        _LOGGER.warning("cannot purge %s: %s", os.fsdecode(path), err)
        return 0


# --- durability -----------------------------------------------------------------------------


fsync_dir = tree.fsync_dir  # the node's key files (``identity``) use it too


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


def syncfs(path: bytes) -> None:
    """Make everything written on the filesystem holding ``path`` durable."""
    function = _libc_syncfs()
    if function is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)
