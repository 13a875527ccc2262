"""Atomic, durable writes into a jail: batches of small files, and complete files put in place.

Small files come in batches (docs/architecture.md, invariant 5): each is written to a temp file, one
``syncfs`` makes the whole batch durable, then each takes its final name (an existing
version is hard-linked into the trash first, so the target always holds a complete
version), and a second ``syncfs`` makes the renames durable before the caller acknowledges.
Batch temp files never outlive the call that made them, even when it fails
(``HostedSpace.clean_tmp`` removes those of a crashed process at start).

Everything here blocks: call it from worker threads, never from an event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import errno
import itertools
import os
import stat
from typing import Self

from ..errors import MyNasError
from . import disk
from .jailfs import JailFS
from .paths import check_mtime, file_mode, refuse, show
from .quota import charge
from .trash import Trash

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})
# Directory handles a batch keeps along its current path; deeper levels are opened on demand.
_HELD_LEVELS = 16

type BatchResults = list[MyNasError | None]


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """One file of a batch: jail-relative path, content, modification time and mode."""

    path: bytes
    data: bytes | memoryview
    mtime_ns: int
    mode: int


class JailWriter:
    """Puts files in place in one jail, the old versions into its trash (thread-safe)."""

    def __init__(self, fs: JailFS, trash: Trash) -> None:
        self._fs = fs
        self._trash = trash
        # Temp names: a random prefix per process and jail (a leftover of a crash that
        # clean_tmp missed cannot collide) and a counter (cheaper than a uuid4 per file).
        self._temp_prefix = fs.tmp_b + b"/" + os.urandom(8).hex().encode() + b"-"
        self._temp_count = itertools.count()

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
            results[index] = disk.batch_error(err, files[index].path)
            self._fs.quota.release(owed.pop(index))

        try:
            for index, item in enumerate(files):
                try:
                    temps[index] = self._stage(item)
                except (MyNasError, OSError) as err:
                    fail(index, err)
            try:
                if temps:
                    self._fs.sync()  # contents durable before any file takes its final name
            except OSError as err:
                for index in temps:
                    fail(index, err)
                return results
            installed = []
            if temps:
                with self._fs.lock, _Dirs(self._fs) as dirs:
                    for index, temp in list(temps.items()):
                        try:
                            self._install_at(dirs, temp, files[index].path)
                        except (MyNasError, OSError) as err:
                            fail(index, err)
                            continue
                        del temps[index]
                        self._fs.quota.commit(owed.pop(index))
                        installed.append(index)
            try:
                if installed:
                    self._fs.sync()  # the renames durable before the caller acknowledges
            except OSError as err:
                # In place and counted, but not known durable: the caller must not acknowledge.
                for index in installed:
                    results[index] = disk.batch_error(err, files[index].path)
        finally:
            for temp in temps.values():
                disk.unlink_quietly(temp)
            for amount in owed.values():
                self._fs.quota.release(amount)
        return results

    def _new_temp(self, mode: int) -> tuple[bytes, int]:
        """Create a new temp file with ``mode``; return its path and an fd open for writing."""
        temp = self._temp_prefix + b"%d.tmp" % next(self._temp_count)
        return temp, os.open(temp, _TEMP_FLAGS, mode)

    def _stage(self, item: IncomingFile) -> bytes:
        """Write one file of a batch to a new temp file; return the temp's path."""
        check_mtime(item.path, item.mtime_ns)
        self._fs.names(item.path)
        mode = file_mode(item.mode)
        temp, fd = self._new_temp(mode)
        try:
            try:
                disk.write_all(fd, item.data)
                umask = disk.umask()
                if umask is None or mode & umask:  # created with its final mode otherwise
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
            finally:
                os.close(fd)
        except BaseException:
            disk.unlink_quietly(temp)
            raise
        return temp

    def install(self, source: bytes, rel: bytes) -> None:
        """Rename a complete file into place at ``rel``, moving an old version to the trash."""
        with self._fs.lock, _Dirs(self._fs) as dirs:
            self._install_at(dirs, source, rel)

    def _install_at(self, dirs: _Dirs, source: bytes, rel: bytes) -> None:
        """``install`` with the jail lock held and the batch's directory handles."""
        names = self._fs.names(rel)
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
            refuse(rel, "a directory is in the way")
        elif stat.S_ISLNK(info.st_mode):
            refuse(rel, f"{show(rel)} is a symbolic link")
        else:
            refuse(rel, "it is neither a regular file nor a directory")

    def _replace_file(self, source: bytes, parent: int, name: bytes, rel: bytes) -> None:
        """Replace file ``name`` of directory ``parent`` by ``source``, old version to trash."""
        dest = self._trash.slot(rel)
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
            disk.unlink_quietly(dest)
            raise


class _Dirs:
    """Handles on a jail's directories, for the renames of one batch (under the jail lock).

    Each directory is opened relative to its parent's handle, starting from the jail root,
    with O_NOFOLLOW | O_DIRECTORY: a symlink anywhere on the way fails the open, and a rename
    into a handle lands in that very directory whatever is swapped in on its path meanwhile.
    The handles along the current path are kept, so the files of one directory (a batch
    comes in tree order) cost no lookup at all; they are closed when the batch ends, so a
    change made on disk between batches (by the host's admin) is seen by the next one.
    """

    def __init__(self, fs: JailFS) -> None:
        self._fs = fs
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
        fs = self._fs
        if not self._fds:
            self._fds.append(fs.open_root())
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
            self._fds.append(fs.open_dir(self._fds[-1], names, level, rel))
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
                child = fs.open_dir(fd, names, level, rel)
                if level > held:  # only the held handle is not ours to close
                    os.close(fd)
                fd = child
        except BaseException:
            if fd != self._fds[-1]:
                os.close(fd)
            raise
        self._deep = (names[:depth], fd)
        return fd
