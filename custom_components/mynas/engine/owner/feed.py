"""Push's worker-thread half: scan the folder against the index and read the small files.

The scan (``scanner.scan_rows``) and the reads of files up to ``SMALL_FILE`` block, so they
run in a worker thread that hands ``Work`` to the event loop in batches (``Handoff``); the
loop (``push``) only sends. Large files are left to the loop's reader, which streams them.
For a sealed replica this thread also seals the small files and the names (``replica``):
the loop gets the bytes and the host path to send as they are.

With a ``MassChangeGuard``, the scan plans first: it counts the files it would replace or
delete of those the peer holds (the index says), and hands nothing over — so nothing is
sent — until it knows the whole run stays under the guard's threshold; above it the run
ends with ``MassChangeHeld``. The changes planned are kept (up to ``PLAN_KEPT``) and sent
from memory; a run with more changes scans again to send them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
import os
import threading

from .. import tree
from ..errors import MassChangeHeld
from . import scanner
from .handoff import Handoff
from .index import Index
from .replica import PlainLayout
from .run import BATCH_BYTES, BATCH_FILES, SMALL_FILE
from .scanner import Action, Change


@dataclass(slots=True)
class Work:
    """One change, with what the scan thread already read for it."""

    change: Change
    data: bytes | None = None  # what the host stores (sealed, for a sealed replica)
    digest: bytes | None = None  # the file's content hash
    stored: bytes | None = None  # the hash of ``data`` when it is not the file's own bytes
    remote: bytes = b""  # the jail path to send to (for a deletion: what to delete)
    error: str | None = None
    changed: bool = False


# A batch of work, and whether it is the scan's last.
type Batch = tuple[list[Work], bool]

# A folder with fewer files at the peer is never held: a few files replaced is no sign.
GUARD_MIN_FILES = 20
# Changes a guarded run keeps from its plan, to send them without scanning again.
PLAN_KEPT = 20_000
# Paths a held run names as examples.
HELD_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class MassChangeGuard:
    """Hold a run that would replace or delete more than ``percent`` % of the peer's files."""

    percent: int
    min_files: int = GUARD_MIN_FILES

    def check(
        self, folder: str, replaced: int, deleted: int, total: int, examples: list[bytes]
    ) -> None:
        """Raise MassChangeHeld when the counts are over the threshold."""
        if self.percent <= 0 or total < self.min_files:
            return
        if (replaced + deleted) * 100 > self.percent * total:
            raise MassChangeHeld(
                folder,
                replaced=replaced,
                deleted=deleted,
                total=total,
                percent=self.percent,
                examples=tuple(os.fsdecode(path) for path in examples),
            )


def _adopted_blind(change: Change) -> bool:
    """A change only because the index adopted the file without its mtime (an old host).

    Its copy is sent again, but it replaces nothing the user changed: not a mass change.
    """
    return change.old is not None and change.old.mtime_ns < 0


class Feeder:
    """Runs the scan (and reads small files) in a worker thread, handing work to the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: bytes,
        index: Index,
        folder: str,
        peer: str,
        exclude: Sequence[str],
        layout: PlainLayout | None = None,
        select: Callable[[bytes], bool] | None = None,
        guard: MassChangeGuard | None = None,
    ) -> None:
        """Scan ``source`` against the index of (``folder``, ``peer``); call ``run`` in a thread.

        ``select``, when given, keeps only the changes of the paths it accepts (a repair).
        ``guard``, when given, plans the whole run before handing anything over.
        """
        self.handoff: Handoff[Batch] = Handoff(loop)
        self.report = scanner.ScanReport()
        self._source = source
        self._index = index
        self._folder = folder
        self._peer = peer
        self._exclude = exclude
        self._layout = PlainLayout(folder) if layout is None else layout
        self._select = select
        self._guard = guard
        # Once the run cannot store anything more, sizes are all that matter: stop reading.
        self.count_only = threading.Event()

    def stop(self) -> None:
        """Ask the thread to stop at the next hand-over."""
        self.handoff.stop()

    def run(self) -> None:
        """Scan, read, and hand over batches; always ends with the end or an exception."""
        self.handoff.feed(self._scan)

    def _changes(self) -> Generator[Change]:
        """The scan's changes, once (if guarded) the plan stays under the threshold."""
        if self._guard is None:
            yield from self._scanned()
            return
        planned = self._plan(self._guard)
        if planned is not None:
            yield from planned
            return
        self.report = scanner.ScanReport()  # the second scan's figures, not both
        yield from self._scanned()

    def _scanned(self) -> Iterator[Change]:
        entries = self._index.rows(self._folder, self._peer)
        try:
            for change in scanner.scan_rows(
                self._source, entries, exclude=self._exclude, report=self.report
            ):
                if self._select is None or self._select(change.entry.path):
                    yield change
        finally:
            # Now, not when collected: the stream holds an SQLite connection.
            close = getattr(entries, "close", None)
            if close is not None:
                close()

    def _plan(self, guard: MassChangeGuard) -> list[Change] | None:
        """Count what the run would replace and delete; raise MassChangeHeld if too much.

        Returns the changes when they were few enough to keep, None when they must be
        scanned again.
        """
        total = self._index.stats(self._folder, self._peer)[0]
        replaced = deleted = 0
        examples: list[bytes] = []
        kept: list[Change] | None = []
        for change in self._scanned():
            if change.entry.kind is tree.Kind.FILE:
                if change.action is Action.DELETED:
                    deleted += 1
                elif change.action is Action.CHANGED and not _adopted_blind(change):
                    replaced += 1
                if change.action is not Action.NEW and len(examples) < HELD_EXAMPLES:
                    examples.append(change.entry.path)
            if kept is not None:
                kept.append(change)
                if len(kept) > PLAN_KEPT:
                    kept = None
            if self.handoff.stopped:
                return []  # the run is over: nothing will be sent anyway
        guard.check(self._folder, replaced, deleted, total, examples)
        return kept

    def _scan(self) -> bool:
        batch = self._root_change() if self._select is None else []
        size = 0
        changes = self._changes()
        try:
            for change in changes:
                work = self._prepare(change)
                batch.append(work)
                size += len(work.data) if work.data else 0
                if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
                    if not self.handoff.put((batch, False)):
                        return False
                    batch, size = [], 0
        finally:
            changes.close()
        return self.handoff.put((batch, True))

    def _root_change(self) -> list[Work]:
        """The folder itself, if its mtime is not what the peer's copy got last time.

        The root is no entry of the scan; without this a run where only the folder's own
        mtime moved (a file created and removed, an excluded file written) would leave the
        replica's root behind.
        """
        try:
            mtime = os.lstat(self._source).st_mtime_ns
        except OSError:
            return []  # the scan will say what is wrong with the source
        if mtime == self._index.root_mtime(self._folder, self._peer):
            return []
        root = tree.Entry(b"", tree.Kind.DIR, 0, mtime, tree.DIR_MODE)
        return [Work(Change(Action.CHANGED, root))]

    def _prepare(self, change: Change) -> Work:
        entry = change.entry
        layout = self._layout
        if change.action is Action.DELETED:
            return Work(change, remote=layout.top(entry.path))
        if entry.kind is not tree.Kind.FILE:
            return Work(change)  # directories are made at the end, by the loop
        work = Work(change, remote=layout.stored(entry.path))
        if entry.size > SMALL_FILE or self.count_only.is_set():
            return work
        assert isinstance(entry, tree.Entry)
        try:
            data = scanner.read_file_checked(self._source + b"/" + entry.path, entry)
        except OSError as err:
            work.error = f"{os.fsdecode(entry.path)}: {err.strerror or err}"
            return work
        if data is None:
            work.changed = True
            return work
        digest = tree.new_hash()
        digest.update(data)
        work.digest = digest.digest()
        if layout.sealed:
            data = layout.seal(entry.path, entry.mtime_ns, entry.mode, data)
            stored = tree.new_hash()
            stored.update(data)
            work.stored = stored.digest()
        work.data = data
        return work
