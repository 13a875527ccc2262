"""One peer's jail on disk: where its things live, paths resolved link-free, directories made.

What every part of a jail stands on (``writes``, ``upload``, ``trash`` and ``jail`` itself).
A path that passed ``paths.check_path`` is resolved by ``locate``, which runs ``lstat`` on
every existing component and refuses symlinks and special files; directories are opened
with ``O_NOFOLLOW``. Peers cannot create links, so the only links a jail can hold are ones
the host made, and those are refused wherever they are (docs/architecture.md, invariant 2). A
directory is created only once its ``DIR_CHARGE`` is reserved (invariant 3).

Everything here blocks: call it from worker threads, never from an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
import errno
import os
from pathlib import Path
import stat
import threading

from ..errors import PathRefused
from ..storage_root import INTERNAL_DIR
from . import disk
from .paths import MAX_PATH, check_path, refuse, show
from .quota import DIR_CHARGE, Quota

# Directories of a jail are opened with these: a symlink or a special file fails the open.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_KERNEL_PATH_MAX = 4095  # PATH_MAX counts the terminating NUL
# The trash puts a stamp directory in front of a peer path (trash.py: "<stamp>~<n>").
_STAMP_ROOM = len("YYYYmmddTHHMMSSZ~999")


@dataclass(frozen=True, slots=True)
class Located:
    """A resolved path: absolute form, components, how many exist, and the last one's stat."""

    path: bytes
    names: list[bytes]
    existing: int
    info: os.stat_result | None


class JailFS:
    """The folders of one peer's space and link-free access to its jail (blocking).

    ``lock`` serialises renames into the jail and into the trash; the jail's parts also
    keep under it what they share between threads (active uploads, requested retentions).
    """

    def __init__(self, storage: Path, name: str, quota: Quota) -> None:
        self.name = name
        self.quota = quota
        self.root = storage / name
        internal = storage / INTERNAL_DIR
        self.trash_dir = internal / "trash" / name
        self.partial_dir = internal / "partial" / name
        self.tmp_dir = internal / "tmp" / name
        self.state_path = internal / "peers" / name / "state.json"
        self.storage_b = os.fsencode(storage)
        self.root_b = os.fsencode(self.root)
        self.trash_b = os.fsencode(self.trash_dir)
        self.partial_b = os.fsencode(self.partial_dir)
        self.tmp_b = os.fsencode(self.tmp_dir)
        # The longest path built from a peer path is its trash path: keep it under PATH_MAX.
        self.max_rel = min(MAX_PATH, _KERNEL_PATH_MAX - len(self.trash_b) - 2 - _STAMP_ROOM)
        self.lock = threading.Lock()

    def sync(self) -> None:
        """Make everything written on the storage's filesystem so far durable (one syncfs)."""
        disk.syncfs(self.storage_b)

    # --- paths

    def _missing_root(self) -> PathRefused:
        return PathRefused(f"the space of {self.name} is missing on this host")

    def _odd_root(self) -> PathRefused:
        return PathRefused(
            f"the space of {self.name} ({self.root}) is not a plain directory "
            "(a symbolic link?): refusing to use it"
        )

    def check_root(self) -> None:
        """Raise PathRefused unless the jail root is a plain directory."""
        try:
            info = os.lstat(self.root_b)
        except FileNotFoundError:
            raise self._missing_root() from None
        if not stat.S_ISDIR(info.st_mode):
            raise self._odd_root()

    def open_root(self) -> int:
        """Open the jail root itself (never through a link) and return the handle."""
        try:
            return os.open(self.root_b, _DIR_FLAGS)
        except FileNotFoundError:
            raise self._missing_root() from None
        except NotADirectoryError:
            raise self._odd_root() from None

    def names(self, rel: bytes) -> list[bytes]:
        """Return the components of ``rel`` once it passed ``check_path`` and the host's length."""
        names = check_path(rel).split(b"/")
        if len(rel) > self.max_rel:
            refuse(rel, f"the path is longer than this host can store ({self.max_rel} bytes)")
        return names

    def locate(self, rel: bytes) -> Located:
        """Resolve ``rel`` as far as it exists (see ``Jail.resolve`` for what is refused)."""
        names = self.names(rel)
        self.check_root()
        path = self.root_b
        info: os.stat_result | None = None
        for depth, name in enumerate(names):
            path += b"/" + name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                return Located(self.root_b + b"/" + rel, names, depth, None)
            if stat.S_ISLNK(info.st_mode):
                refuse(rel, f"{show(b'/'.join(names[: depth + 1]))} is a symbolic link")
            if depth < len(names) - 1 and not stat.S_ISDIR(info.st_mode):
                refuse(rel, f"{show(b'/'.join(names[: depth + 1]))} is not a directory")
        assert info is not None  # names is never empty
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            refuse(rel, "it is neither a regular file nor a directory")
        return Located(path, names, len(names), info)

    def existing(self, rel: bytes) -> Located:
        """``locate`` a path that must exist (FileNotFoundError otherwise)."""
        where = self.locate(rel)
        if where.info is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(rel))
        return where

    # --- directories

    def ensure_dir(self, path: bytes, rel: bytes) -> None:
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
            refuse(rel, f"{os.fsdecode(path)!r} is in the way of a directory")

    def make_dirs(self, where: Located, *, include_last: bool) -> None:
        """Create the missing directories of ``where`` (its parents, or all of it)."""
        end = len(where.names) if include_last else len(where.names) - 1
        path = b"/".join([self.root_b, *where.names[: where.existing]])
        for name in where.names[where.existing : end]:
            path += b"/" + name
            self.ensure_dir(path, b"/".join(where.names))

    def open_dir(self, parent: int, names: list[bytes], depth: int, rel: bytes) -> int:
        """Open directory ``names[depth]`` inside handle ``parent``, making it if missing.

        Never through a link: O_NOFOLLOW | O_DIRECTORY fails on a symlink, a file or a
        special file (no FIFO is ever opened), and the failure is reported like ``locate``.
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
            where = show(b"/".join(names[: depth + 1]))
            if stat.S_ISLNK(info.st_mode):
                refuse(rel, f"{where} is a symbolic link")
            refuse(rel, f"{where} is not a directory")
