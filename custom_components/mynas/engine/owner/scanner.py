"""What changed in a folder since the peer last acknowledged it.

``scan`` merges two streams in canonical key order — the local walk and the index's
entries for (folder, peer) — holding one entry of each, so memory does not grow with the
tree. It blocks: run it in a worker thread and hand its changes over to the transfer.
``read_file_checked`` then reads a small file for sending, and tells when it changed under
the reader so that a half-changed file is never recorded as sent.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
import enum
import fnmatch
import os
import re
import stat
from typing import TypedDict, Unpack

from .. import tree
from ..errors import SourceMissing
from .index import IndexEntry, IndexRow
from .run import MAX_REPORTED

# Never follow a symlink; never wait on a FIFO that replaced a file since the walk.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Action(enum.StrEnum):
    """What must happen on the peer for one entry."""

    NEW = "new"
    CHANGED = "changed"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between the local tree and what the peer holds.

    ``entry`` is the local entry for NEW and CHANGED, the index entry for DELETED;
    ``old`` is the index entry a CHANGED entry replaces.
    """

    action: Action
    entry: tree.Entry | IndexEntry
    old: IndexEntry | None = None


@dataclass
class ScanReport:
    """What a scan saw of the local tree (after excludes), filled in as it goes."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    errors: list[tuple[builtins.bytes, str]] = field(default_factory=list)
    error_count: int = 0  # errors beyond the first MAX_REPORTED kept in ``errors``
    skipped: int = 0  # symlinks and special files, which are never backed up

    def add_error(self, path: builtins.bytes, message: str) -> None:
        """Keep the error if there is room, count it otherwise."""
        if len(self.errors) < MAX_REPORTED:
            self.errors.append((path, message))
        else:
            self.error_count += 1


class Excludes:
    """Exclude patterns, gitignore-like, matched with ``fnmatch`` rules on raw bytes.

    A pattern without ``/`` matches an entry's name at any depth (``*.tmp``,
    ``node_modules``); one with a leading or inner ``/`` matches the path from the folder's
    root (``Photos/cache/*``; there ``*`` also crosses ``/``). A trailing ``/`` restricts a
    pattern to directories. Call the object with ``(path, is_dir)``.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        groups: dict[tuple[bool, bool], list[str]] = {}
        for pattern in patterns:
            body = pattern.strip("/")
            if body:
                anchored = "/" in pattern.rstrip("/")
                groups.setdefault((anchored, pattern.endswith("/")), []).append(body)
        self._names = _regex(groups.get((False, False)))
        self._dir_names = _regex(groups.get((False, True)))
        self._paths = _regex(groups.get((True, False)))
        self._dir_paths = _regex(groups.get((True, True)))

    def __call__(self, path: bytes, is_dir: bool) -> bool:
        """Return whether the entry at ``path`` (relative to the root) is excluded."""
        name = path.rpartition(b"/")[2]
        return bool(
            (self._names and self._names.match(name))
            or (self._paths and self._paths.match(path))
            or (is_dir and self._dir_names and self._dir_names.match(name))
            or (is_dir and self._dir_paths and self._dir_paths.match(path))
        )


def _regex(patterns: list[str] | None) -> re.Pattern[bytes] | None:
    """Return one regex matching any of ``patterns``, or None when there are none."""
    if not patterns:
        return None
    # What fnmatch does with bytes: read the pattern as Latin-1 (one character per byte), so
    # names that are not UTF-8 match too.
    alternatives = (fnmatch.translate(os.fsencode(p).decode("latin-1")) for p in patterns)
    return re.compile("|".join(alternatives).encode("latin-1"))


class ScanOptions(TypedDict, total=False):
    """What ``scan`` and ``scan_rows`` take besides the source and the index."""

    exclude: Sequence[str]
    report: ScanReport | None


def scan(
    source: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    index_entries: Iterable[IndexEntry],
    **options: Unpack[ScanOptions],
) -> Iterator[Change]:
    """Yield the changes that make the peer's copy (``index_entries``) equal ``source``.

    Blocking generator. ``index_entries`` must come in ascending key order (as
    ``Index.entries`` yields them). Changes come in canonical order, except that a NEW file
    waits until the index is past the subtree of a directory of the same name, so a kind
    change always comes as DELETED (the old entry, and all below a directory) then NEW.
    Raises ``SourceMissing`` on the first ``next()``, before any change, if ``source`` is
    not a listable directory.
    The contents of a directory that cannot be listed are neither NEW nor DELETED: the
    error goes to ``report``, which also counts what was walked.
    """
    rows = ((e.key, e.size, e.mtime_ns, e.mode, e.hash) for e in index_entries)
    return scan_rows(source, rows, **options)


def scan_rows(
    source: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    index_rows: Iterable[IndexRow],
    *,
    exclude: Sequence[str] = (),
    report: ScanReport | None = None,
) -> Iterator[Change]:
    """``scan`` over the index's raw rows (``Index.rows``): what a push runs.

    Entries that did not change (nearly all of them, most days) cost a comparison of two
    tuples: objects are built only for the changes.
    """
    root = os.fsencode(source)
    seen = ScanReport() if report is None else report
    blind = (b"", b"")  # index keys [from, to) below a directory that could not be listed

    def on_error(path: bytes, err: OSError) -> None:
        nonlocal blind
        if not path:
            raise SourceMissing(os.fsdecode(root)) from err
        seen.add_error(path, f"cannot list this directory: {err.strerror or err}")
        # tree.walk reports a directory just after yielding it, before anything below it,
        # so the index is not past that directory's subtree yet.
        blind = (path + b"/", path + b"0")

    def on_skip(_path: bytes) -> None:
        seen.skipped += 1

    walk = tree.walk_rows(
        root, on_error=on_error, skip=Excludes(exclude) if exclude else None, on_skip=on_skip
    )
    index = _ascending(index_rows)
    # NEW files whose path may still name a directory further down the index. Each is
    # below the previous one in key order, so the last one is always released first.
    held: list[tree.Entry] = []
    # Counted here and added to the report at the end: cheaper than one update per entry.
    files = dirs = size = 0
    try:
        local = next(walk, None)  # raises SourceMissing, if it must, before the first yield
        peer = next(index, None)
        while True:
            if local is not None and peer is not None and local[0] == peer[0]:
                if local[0][-1] == _SLASH:
                    dirs += 1
                else:
                    files += 1
                    size += local[1]
                # Same key, same kind: unchanged unless mtime, mode or a file's size differ.
                if local[2] != peer[2] or local[3] != peer[3] or local[1] != peer[1]:
                    entry = _entry(local)
                    if _differs(entry, peer):
                        yield Change(Action.CHANGED, entry, IndexEntry.from_row(*peer))
                local = next(walk, None)
                peer = next(index, None)
            elif local is not None and (peer is None or local[0] < peer[0]):
                entry = _entry(local)
                if entry.kind is tree.Kind.FILE:
                    files += 1
                    size += entry.size
                    if peer is not None and peer[0] < entry.path + b"0":
                        held.append(entry)
                        local = next(walk, None)
                        continue
                else:
                    dirs += 1
                yield Change(Action.NEW, entry)
                local = next(walk, None)
                continue
            elif peer is None:
                return  # both streams are done, and nothing is held once the index is
            else:
                if not blind[0] <= peer[0] < blind[1]:
                    yield Change(Action.DELETED, IndexEntry.from_row(*peer))
                peer = next(index, None)
            # b"0" follows b"/": once the index reaches path + b"0", no directory named path
            # (key path + b"/") nor anything below it can follow.
            while held and (peer is None or held[-1].path + b"0" <= peer[0]):
                yield Change(Action.NEW, held.pop())
    finally:
        seen.files += files
        seen.dirs += dirs
        seen.bytes += size


_SLASH = 0x2F  # b"/"[0]: only a directory's key ends with it


def _entry(row: tree.Row) -> tree.Entry:
    key, size, mtime_ns, mode = row
    if key[-1] == _SLASH:
        return tree.Entry(key[:-1], tree.Kind.DIR, 0, mtime_ns, mode)
    return tree.Entry(key, tree.Kind.FILE, size, mtime_ns, mode)


def _ascending(rows: Iterable[IndexRow]) -> Iterator[IndexRow]:
    """Pass the index rows on, checking the order the merge relies on."""
    previous = b""
    for row in rows:
        # Out of order, the merge would report whole trees deleted and sent again.
        if row[0] <= previous:
            raise ValueError(f"index entries out of order: {row[0]!r} after {previous!r}")
        previous = row[0]
        yield row


def _differs(local: tree.Entry, peer: IndexRow) -> bool:
    """Return whether an entry changed; the same key means the same kind."""
    if local.mtime_ns != peer[2] or local.mode != peer[3]:
        return True
    # A directory's size means nothing; its mtime does (a push sets it again).
    return local.kind is tree.Kind.FILE and local.size != peer[1]


def read_file_checked(path: bytes, expected: tree.Entry) -> bytes | None:
    """Return the content of a small file, or None if it is not what the walk saw.

    None means the file vanished, or its size or mtime differ from ``expected`` after the
    read (it changed since the walk or while being read): the caller must not record it as
    sent, and the next run will find it changed. Raises ``OSError`` if the file cannot be
    read, including when ``path`` is now a symlink (never followed).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError, NotADirectoryError:
        return None
    try:
        # One byte more than expected, so a file that grew is seen even if its mtime
        # has not moved yet.
        data = os.read(fd, expected.size + 1)
        while 0 < len(data) < expected.size:  # short reads are rare, but allowed
            more = os.read(fd, expected.size + 1 - len(data))
            if not more:
                break
            data += more
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (
        len(data) != expected.size
        or after.st_size != expected.size
        or after.st_mtime_ns != expected.mtime_ns
        or not stat.S_ISREG(after.st_mode)
    ):
        return None
    return data
