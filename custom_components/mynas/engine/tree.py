"""Trees of files as streams of entries in one canonical order.

Paths are ``bytes`` relative to a tree's root, components joined by ``b"/"``: a file name
may be any byte string the filesystem allows (newlines, invalid UTF-8...). Every stream of
entries in MyNAS — the local walk, the SQLite index, the host's listing — comes in
ascending ``sort_key`` order, so two streams are compared by a merge that holds one entry of
each in memory, never a whole tree.

``sort_key`` is the path for a file and the path plus ``b"/"`` for a directory. Then a
depth-first walk that visits each directory's children sorted by that same key produces
keys in plain bytewise order: ``b"a.txt" < b"a/" < b"a/b"`` (``.`` is 0x2E, ``/`` 0x2F).
That is also SQLite's ``ORDER BY`` on a BLOB column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
import enum
import hashlib
import os
import stat


class Kind(enum.StrEnum):
    """What an entry is. Symlinks, devices, sockets and FIFOs are never entries."""

    FILE = "f"
    DIR = "d"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or directory of a tree."""

    path: bytes
    kind: Kind
    size: int
    mtime_ns: int
    mode: int = 0o644  # portable_mode() for files, DIR_MODE for directories

    @property
    def key(self) -> bytes:
        """Return the entry's canonical sort key."""
        return sort_key(self.path, self.kind)


DIR_MODE = 0o755


def portable_mode(st_mode: int) -> int:
    """Return the mode MyNAS keeps for a file: 0o755 if its owner may run it, else 0o644.

    Only the exec bit is worth carrying to a friend's disk (owners, groups and odd
    permissions mean nothing there, s-bits would be a hazard), so only it makes a change.
    """
    return 0o755 if st_mode & stat.S_IXUSR else 0o644


def sort_key(path: bytes, kind: Kind) -> bytes:
    """Return the canonical order key of a path (see the module docstring)."""
    return path + b"/" if kind is Kind.DIR else path


def join(parent: bytes, name: bytes) -> bytes:
    """Join a relative parent path (``b""`` for the root) and a name."""
    return parent + b"/" + name if parent else name


type ErrorHandler = Callable[[bytes, OSError], None]
type SkipHandler = Callable[[bytes], None]


def walk(
    root: bytes | str,
    *,
    start: bytes = b"",
    on_error: ErrorHandler | None = None,
    skip: Callable[[bytes, bool], bool] | None = None,
    on_skip: SkipHandler | None = None,
) -> Iterator[Entry]:
    """Yield the files and directories under ``root/start`` in canonical order (blocking).

    The root (or ``start``) itself is not yielded. Symlinks are never followed nor yielded,
    nor are special files. A directory that cannot be listed is yielded (so callers know it
    exists) and then reported to ``on_error`` with its path; its contents are not yielded.
    ``skip(path, is_dir)`` may prune entries (and whole subtrees) from the walk.
    ``on_skip(path)`` is told of each symlink or special file left out, so callers can
    count what is not backed up.
    Memory holds one directory listing per level of depth, never the whole tree.
    """
    base = os.fsencode(root)
    yield from _walk_dir(base, start, on_error, skip, on_skip)


def _walk_dir(
    base: bytes,
    rel: bytes,
    on_error: ErrorHandler | None,
    skip: Callable[[bytes, bool], bool] | None,
    on_skip: SkipHandler | None,
) -> Iterator[Entry]:
    directory = base + b"/" + rel if rel else base
    try:
        with os.scandir(directory) as iterator:
            listing = [_entry_of(rel, item, on_skip) for item in iterator]
    except OSError as err:
        if on_error is None:
            raise
        on_error(rel, err)
        return
    entries = sorted((e for e in listing if e is not None), key=lambda e: e.key)
    for entry in entries:
        if skip is not None and skip(entry.path, entry.kind is Kind.DIR):
            continue
        yield entry
        if entry.kind is Kind.DIR:
            yield from _walk_dir(base, entry.path, on_error, skip, on_skip)


def _entry_of(rel: bytes, item: os.DirEntry[bytes], on_skip: SkipHandler | None) -> Entry | None:
    try:
        info = item.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # vanished between listing and stat
    path = join(rel, item.name)
    if stat.S_ISREG(info.st_mode):
        return Entry(path, Kind.FILE, info.st_size, info.st_mtime_ns, portable_mode(info.st_mode))
    if stat.S_ISDIR(info.st_mode):
        return Entry(path, Kind.DIR, 0, info.st_mtime_ns, DIR_MODE)
    if on_skip is not None:
        on_skip(path)
    return None


def new_hash() -> hashlib.blake2b:
    """Return the content hash MyNAS uses everywhere: BLAKE2b with a 32-byte digest."""
    return hashlib.blake2b(digest_size=32)


def hash_file(path: bytes | str, *, block: int = 1 << 20) -> bytes:
    """Return the content hash of a regular file, read in blocks (blocking)."""
    digest = new_hash()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.digest()
