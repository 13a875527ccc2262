"""Push: keep a folder's replica on a peer current; and what push, restore and verify share.

A replica of folder ``F`` is a plain mirror at ``<jail>/F/`` on the host (same relative paths,
same bytes, same mtimes), readable with standard tools. Push follows DESIGN.md's data flow:
the scanner walks the folder in a worker thread and diffs it against the SQLite index, the
same thread reads the small files it must send, and the event loop streams them over one
channel; the index records a file only once the host says it is durable, so a broken run
leaves index and replica consistent, and the next run completes the work.

Getting the replica back is ``restorer``'s job, checking it ``verifier``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import asdict, dataclass, field
import enum
import itertools
import os
import stat
import threading
import time
from typing import Any

from .. import protocol, tree
from ..errors import (
    HostRefused,
    MyNasError,
    PeerDiskFull,
    PeerUnreachable,
    QuotaExceeded,
    SourceMissing,
)
from ..identity import Identity
from ..protocol import CHUNK, Close
from . import scanner
from .client import PeerLink, connect_any
from .index import Index, IndexEntry
from .scanner import Action, Change
from .throttle import Throttle

# Files up to this size travel whole in one PUT (the batched path); larger ones stream.
SMALL_FILE = 1024 * 1024
# How much the scan thread may read ahead of the network, in files and bytes.
_HANDOFF_FILES = 256
_HANDOFF_BYTES = 4 * 1024 * 1024
_QUEUE_BATCHES = 4
# A large file travels in DATA frames of exactly CHUNK bytes, header included: whole SSH
# packets (CHUNK is a multiple of their 32 KiB), never a tiny one for a header's overflow.
_PIECE = CHUNK - len(protocol.data(0, b""))
# Read large files this much per worker-thread hop (sent as several frames).
_READ_BLOCK = 4 * _PIECE
_INDEX_BATCH = 1000
# The longest the push handles files without letting the event loop run other tasks.
_TURN = 0.002
PROGRESS_INTERVAL = 0.25
MAX_REPORTED = 100


class Phase(enum.StrEnum):
    """What a run is doing."""

    CONNECTING = "connecting"
    SCANNING = "scanning"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    RESTORING = "restoring"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """A peer to replicate to: its stable id (the index key), addresses and pinned key."""

    id: str
    addresses: tuple[str, ...]
    public_key: str


@dataclass(slots=True)
class Progress:
    """Where a run stands. Totals grow while the scan is still running."""

    phase: Phase = Phase.CONNECTING
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    scan_complete: bool = False

    @property
    def percent(self) -> float | None:
        """Share of the bytes (or files) done, once the totals are known."""
        if not self.scan_complete:
            return None
        if self.bytes_total:
            return round(100.0 * self.bytes_done / self.bytes_total, 1)
        if self.files_total:
            return round(100.0 * self.files_done / self.files_total, 1)
        return 100.0


type ProgressCallback = Callable[[Progress], None]


@dataclass(slots=True)
class PushResult:
    """What one push did."""

    folder: str
    files_sent: int = 0
    bytes_sent: int = 0
    files_deleted: int = 0
    dirs_updated: int = 0
    files_total: int = 0
    bytes_total: int = 0
    files_changed_during_read: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    seconds: float = 0.0
    # False when nothing had changed and the run did not connect (``connect_if_unchanged``).
    peer_contacted: bool = False

    def add_error(self, message: str) -> None:
        """Keep the first errors word for word, count the rest."""
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(message)
        self.error_count += 1

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as plain data (the command line prints it as JSON)."""
        return summary(self)


def summary(result: Any) -> dict[str, Any]:
    """Return a run's result (a dataclass) as plain data, its seconds to the millisecond."""
    data: dict[str, Any] = asdict(result)
    data["seconds"] = round(data["seconds"], 3)
    return data


def check_folder_name(folder: str) -> bytes:
    """Return a folder name as the first path component of its replica, or raise ValueError."""
    raw = os.fsencode(folder)
    if (
        not raw
        or b"/" in raw
        or b"\0" in raw
        or raw in (b".", b"..")
        or raw.startswith(b".mynas")
        or len(raw) > 255
    ):
        raise ValueError(f"{folder!r} cannot name a folder: use a plain name without '/'")
    return raw


def remote_path(folder: bytes, path: bytes) -> bytes:
    """Return where ``path`` of a folder is on the host (the folder itself for an empty path)."""
    return folder + b"/" + path if path else folder


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


# --- push ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    """One change, with what the scan thread already read for it."""

    change: Change
    data: bytes | None = None
    digest: bytes | None = None
    error: str | None = None
    changed: bool = False


class _Feeder:
    """Runs the scan (and reads small files) in a worker thread, handing work to the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: bytes,
        index: Index,
        folder: str,
        peer: str,
        exclude: Sequence[str],
    ) -> None:
        # (batch, whether it is the scan's last), then None; or the exception that ended it.
        self.queue: asyncio.Queue[tuple[list[_Work], bool] | BaseException | None] = asyncio.Queue(
            _QUEUE_BATCHES
        )
        self.report = scanner.ScanReport()
        self._loop = loop
        self._source = source
        self._index = index
        self._folder = folder
        self._peer = peer
        self._exclude = exclude
        self._stop = threading.Event()
        # Once the run cannot store anything more, sizes are all that matter: stop reading.
        self.count_only = threading.Event()

    def stop(self) -> None:
        """Ask the thread to stop at the next hand-over."""
        self._stop.set()

    def run(self) -> None:
        """Scan, read, and hand over batches; always ends with None or an exception."""
        try:
            batch = self._root_change()
            size = 0
            entries = self._index.rows(self._folder, self._peer)
            try:
                for change in scanner.scan_rows(
                    self._source, entries, exclude=self._exclude, report=self.report
                ):
                    work = self._prepare(change)
                    batch.append(work)
                    size += len(work.data) if work.data else 0
                    if len(batch) >= _HANDOFF_FILES or size >= _HANDOFF_BYTES:
                        if not self._hand((batch, False)):
                            return
                        batch, size = [], 0
            finally:
                # Now, not when collected: the stream holds an SQLite connection.
                close = getattr(entries, "close", None)
                if close is not None:
                    close()
            if self._hand((batch, True)):
                self._hand(None)
        except BaseException as err:  # handed to the loop, which re-raises
            self._hand(err)

    def _root_change(self) -> list[_Work]:
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
        return [_Work(Change(Action.CHANGED, root))]

    def _prepare(self, change: Change) -> _Work:
        entry = change.entry
        work = _Work(change)
        if change.action is Action.DELETED or entry.kind is not tree.Kind.FILE:
            return work
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
        work.data = data
        work.digest = digest.digest()
        return work

    def _hand(self, item: tuple[list[_Work], bool] | BaseException | None) -> bool:
        future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self._loop)
        while not self._stop.is_set():
            try:
                future.result(timeout=0.2)
                return True
            except TimeoutError:
                continue
        future.cancel()
        return False


class IndexWriter:
    """Applies acknowledged changes to the index, in order, from one dedicated thread."""

    def __init__(self, index: Index, folder: str, peer: str) -> None:
        self._index = index
        self._folder = folder
        self._peer = peer
        self._ops: list[tuple[str, Any]] = []
        self._count = 0
        self._last = time.monotonic()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mynas-index")

    def record(self, entry: IndexEntry) -> None:
        """Remember that the host holds ``entry`` (applied at the next flush)."""
        self._ops.append(("record", entry))
        self._count += 1

    def forget(self, path: bytes, kind: tree.Kind) -> None:
        """Remember that the host no longer holds ``path``."""
        self._ops.append(("forget", (path, kind)))
        self._count += 1

    def forget_tree(self, path: bytes) -> None:
        """Remember that the host holds nothing below directory ``path`` any more."""
        self._ops.append(("forget_tree", path))
        self._count += 1

    def record_root(self, mtime_ns: int) -> None:
        """Remember the mtime the host's copy of the folder itself got."""
        self._ops.append(("root", mtime_ns))
        self._count += 1

    async def maybe_flush(self) -> None:
        """Flush once enough changes are pending, or they wait for over a second."""
        if self._count >= _INDEX_BATCH or (self._ops and time.monotonic() - self._last > 1.0):
            await self.flush()

    async def flush(self) -> None:
        """Apply every pending change, in order, before returning."""
        ops, self._ops, self._count = self._ops, [], 0
        self._last = time.monotonic()
        if ops:
            # Shielded: acknowledged files stay recorded even if the run is cancelled now.
            await asyncio.shield(
                asyncio.get_running_loop().run_in_executor(self._executor, self._apply, ops)
            )

    def _apply(self, ops: list[tuple[str, Any]]) -> None:
        # In order, each run of records (or of forgets) in one transaction.
        for op, group in itertools.groupby(ops, key=lambda item: item[0]):
            values = [value for _, value in group]
            if op == "record":
                self._index.record(self._folder, self._peer, values)
            elif op == "forget":
                self._index.forget(self._folder, self._peer, values)
            elif op == "root":
                self._index.record_root(self._folder, self._peer, values[-1])
            else:
                for path in values:
                    self._index.forget_tree(self._folder, self._peer, path)

    async def call[T](self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func`` on the writer's thread, after what is already queued there."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def register_pair(self) -> None:
        """Make (folder, peer) known to the index, even while the peer holds nothing."""
        self._index.record(self._folder, self._peer, [])

    async def discard_pair(self) -> None:
        """Forget everything about (folder, peer), pending changes included."""
        self._ops, self._count = [], 0
        await asyncio.shield(self.call(self._index.clear, self._folder, self._peer))

    def close(self) -> None:
        """Stop the writer's thread once its work is done (blocking)."""
        self._executor.shutdown(wait=True)


@dataclass(slots=True)
class _DirDeletion:
    """A directory sent to the trash: its files below count as deleted once it is."""

    prefix: bytes
    files: int = 0
    done: bool | None = None  # None while the host has not answered


class _Connection:
    """A run's one connection to the peer: opened when first needed, or started early.

    Started early, the SSH handshake runs while the scan walks the folder.
    """

    def __init__(self, identity: Identity, target: PeerTarget) -> None:
        self._identity = identity
        self._target = target
        self._task: asyncio.Task[PeerLink] | None = None
        self.link: PeerLink | None = None  # once open

    def start(self) -> None:
        """Begin connecting, without waiting."""
        if self._task is None:
            target = self._target
            self._task = asyncio.create_task(
                connect_any(self._identity, target.addresses, target.public_key)
            )

    async def open(self) -> PeerLink:
        """Return the open link, connecting first if needed (``client.connect``'s errors)."""
        if self.link is None:
            self.start()
            assert self._task is not None
            self.link = await self._task
        return self.link

    async def close(self) -> None:
        """Close the link, or give up connecting."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()  # a no-op once connected (or failed)
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(outcome, BaseException):
            await outcome.close()


class _Pusher:
    """One push of one folder to one peer, over a link opened at the first change."""

    def __init__(
        self,
        connection: _Connection,
        index: IndexWriter,
        folder: str,
        source: bytes,
        throttle: Throttle,
        progress: ProgressCallback | None,
    ) -> None:
        self.connection = connection
        self.index = index
        self.folder = check_folder_name(folder)
        self.source = source
        self.throttle = throttle
        self.result = PushResult(folder)
        self.state = Progress(Phase.SCANNING)
        self.stop_error: MyNasError | None = None
        # Bytes of the files the run could not store once the host ran out of room.
        self.still_needed = 0
        self.quota_available: int | None = None
        self.on_stop: Callable[[], None] | None = None
        self._progress = progress
        self._last_progress = 0.0
        self._deleted_dir: _DirDeletion | None = None
        # Directories whose mtime must be set at the end (their contents change theirs).
        self._dirs: dict[bytes, int | None] = {}
        self._loop = asyncio.get_running_loop()
        self._reader: ThreadPoolExecutor | None = None  # started by the first large file
        self._turn_ends = 0.0  # when sending must next let the loop's other tasks run

    @property
    def link(self) -> PeerLink:
        """The open link (``_run_push`` opens it before the first change is handled)."""
        link = self.connection.link
        assert link is not None
        return link

    async def take_turns(self) -> None:
        """Let the loop's other tasks run if this push has had it for _TURN seconds.

        Sending small files, or blocks read ahead, seldom has to wait for anything: without
        this the loop would run nothing else for as long as the channel takes data.
        """
        if self._loop.time() >= self._turn_ends:
            await asyncio.sleep(0)
            self._turn_ends = self._loop.time() + _TURN

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._progress is not None and (force or now - self._last_progress >= PROGRESS_INTERVAL):
            self._last_progress = now
            self._progress(self.state)

    def _failed(self, err: MyNasError, what: bytes, size: int = 0) -> None:
        if isinstance(err, QuotaExceeded):
            self.still_needed += size
            self.quota_available = err.available
        if isinstance(err, (QuotaExceeded, PeerDiskFull, PeerUnreachable)):
            if self.stop_error is None:
                self.stop_error = err
                if self.on_stop is not None:
                    self.on_stop()
        else:
            self.result.add_error(f"{os.fsdecode(what)}: {err}")

    def _touch(self, path: bytes) -> None:
        parent = _parent(path)
        self._dirs.setdefault(parent, None)

    def plan(self, batch: list[_Work], last: bool) -> None:
        """Count a batch into the totals before sending it (final with the last one)."""
        for work in batch:
            if (
                work.change.action is not Action.DELETED
                and work.change.entry.kind is tree.Kind.FILE
            ):
                self.state.files_total += 1
                self.state.bytes_total += work.change.entry.size
        self.state.scan_complete = last

    async def handle(self, work: _Work) -> None:
        change = work.change
        entry = change.entry
        if self.stop_error is not None:
            if change.action is not Action.DELETED and entry.kind is tree.Kind.FILE:
                self.still_needed += entry.size
            return
        if change.action is not Action.DELETED and entry.kind is tree.Kind.DIR:
            self._dirs[entry.path] = entry.mtime_ns
            return
        self.state.phase = Phase.TRANSFERRING
        if change.action is Action.DELETED:
            await self._delete(entry)
        elif work.error is not None:
            self.result.add_error(work.error)
        elif work.changed:
            self.result.files_changed_during_read += 1
        elif work.data is not None:
            await self._put(work)
        else:
            assert isinstance(entry, tree.Entry)
            await self._upload(entry)
        await self.index.maybe_flush()
        self.report()

    async def _delete(self, entry: tree.Entry | IndexEntry) -> None:
        gone = self._deleted_dir
        if gone is not None and entry.path.startswith(gone.prefix):
            # It goes to the host's trash with its directory.
            if entry.kind is tree.Kind.FILE:
                gone.files += 1
                self.result.files_deleted += 1 if gone.done else 0
            return
        is_dir = entry.kind is tree.Kind.DIR
        deletion = _DirDeletion(entry.path + b"/") if is_dir else None
        if deletion is not None:
            self._deleted_dir = deletion
        path = entry.path

        def done(err: MyNasError | None) -> None:
            if err is not None and not (isinstance(err, HostRefused) and err.code == "missing"):
                if deletion is not None:
                    deletion.done = False
                self._failed(err, path)
                return
            if deletion is not None:
                deletion.done = True
                self.result.files_deleted += deletion.files
                self.index.forget_tree(path)
            else:
                self.index.forget(path, tree.Kind.FILE)
                self.result.files_deleted += 1

        self._touch(path)
        self._dirs.pop(path, None)
        await self.link.delete(remote_path(self.folder, path), done)

    async def _put(self, work: _Work) -> None:
        entry = work.change.entry
        assert work.data is not None
        size = len(work.data)
        record = IndexEntry(
            entry.path, tree.Kind.FILE, entry.size, entry.mtime_ns, entry.mode, work.digest
        )

        def done(err: MyNasError | None) -> None:
            if err is not None:
                self._failed(err, entry.path, size)
                return
            self.index.record(record)
            self.result.files_sent += 1
            self.result.bytes_sent += size
            self.state.files_done += 1
            self.state.bytes_done += size

        self._touch(entry.path)
        await self.throttle.consume(size)
        await self.link.put(
            remote_path(self.folder, entry.path), entry.mtime_ns, entry.mode, work.data, done
        )

    def _in_reader[T](self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``func`` in the thread that reads large files, after what it already runs.

        One thread, so a file's reads, its hash updates and its close happen in order, and a
        close never races a read still running for a transfer that was cut short.
        """
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="mynas-read")
        return self._loop.run_in_executor(self._reader, func, *args)

    def close(self) -> None:
        """Wait for the reader thread's last jobs (blocking: call it from a worker thread)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)

    async def _upload(self, entry: tree.Entry) -> None:
        local = self.source + b"/" + entry.path
        remote = remote_path(self.folder, entry.path)
        self._touch(entry.path)
        try:
            fd = await self._in_reader(_open_local, local)
        except FileNotFoundError:
            self.result.files_changed_during_read += 1  # gone since the scan
            return
        except OSError as err:
            self.result.add_error(f"{os.fsdecode(entry.path)}: {err.strerror or err}")
            return
        try:
            try:
                req, offset = await self.link.open_upload(
                    remote, entry.size, entry.mtime_ns, entry.mode
                )
            except MyNasError as err:
                self._failed(err, entry.path, entry.size)
                return
            digest = tree.new_hash()
            try:
                sent = await self._stream_file(fd, req, entry, offset, digest)
            except OSError as err:
                # The local disk failed us: keep what the host has for a later resume.
                await self.link.close_upload(req, Close.ABANDON)
                self.result.add_error(f"{os.fsdecode(entry.path)}: {err.strerror or err}")
                return
            if not sent:
                # Changed while we read it: never record it; the next run sends it again.
                await self.link.close_upload(req, Close.DISCARD)
                self.result.files_changed_during_read += 1
                return
            try:
                await self.link.close_upload(req, Close.FINISH)
            except MyNasError as err:
                self._failed(err, entry.path, entry.size)
                return
            self.index.record(IndexEntry.from_entry(entry, digest.digest()))
            self.result.files_sent += 1
            self.result.bytes_sent += entry.size - offset
            self.state.files_done += 1
        finally:
            # Queued behind any read still running: the descriptor outlives its last use.
            self._in_reader(os.close, fd)

    async def _stream_file(
        self, fd: int, req: int, entry: tree.Entry, offset: int, digest: Any
    ) -> bool:
        """Send ``entry`` from ``offset`` on; return False if it changed under the reader.

        The reader thread reads and hashes the next block while this one is being sent.
        """
        if offset:
            if not await self._in_reader(_hash_prefix, fd, offset, digest):
                return False
            self.state.bytes_done += offset
        position = offset
        ahead: asyncio.Future[bytes] | None = None
        if position < entry.size:
            ahead = self._in_reader(
                _read_block, fd, position, min(_READ_BLOCK, entry.size - position), digest
            )
        try:
            while ahead is not None:
                block = await ahead
                ahead = None
                if not block:
                    break
                position += len(block)
                if position < entry.size:
                    ahead = self._in_reader(
                        _read_block, fd, position, min(_READ_BLOCK, entry.size - position), digest
                    )
                view = memoryview(block)
                for start in range(0, len(block), _PIECE):
                    piece = view[start : start + _PIECE]
                    await self.throttle.consume(len(piece))
                    await self.link.send_data(req, piece)
                    await self.take_turns()
                self.state.bytes_done += len(block)
                self.report()
        finally:
            if ahead is not None:  # left early: nobody wants that block any more
                ahead.cancel()
        after = await self._in_reader(os.fstat, fd)
        return (
            position == entry.size
            and after.st_size == entry.size
            and after.st_mtime_ns == entry.mtime_ns
        )

    async def finish_dirs(self) -> None:
        """Create every new directory (empty ones too) and give each its local mtime."""
        self._dirs.setdefault(b"", None)
        # Deepest first, the folder itself last: creating a directory changes its parent's
        # mtime, never the reverse.
        paths = sorted(self._dirs, key=lambda p: p.count(b"/") if p else -1, reverse=True)
        mtimes = await self._loop.run_in_executor(None, _dir_mtimes, self.source, paths)
        for path in paths:
            mtime = mtimes.get(path)
            if mtime is None:
                continue  # gone locally since the scan; the next run deletes it

            def done(err: MyNasError | None, path: bytes = path, mtime: int = mtime) -> None:
                if err is not None:
                    self._failed(err, path)
                    return
                self.result.dirs_updated += 1
                if path:
                    self.index.record(
                        IndexEntry(path, tree.Kind.DIR, 0, mtime, tree.DIR_MODE, None)
                    )
                else:
                    self.index.record_root(mtime)

            await self.link.mkdir(remote_path(self.folder, path), mtime, done)
        await self.link.sync()


def _open_local(path: bytes) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _hash_prefix(fd: int, length: int, digest: Any) -> bool:
    """Hash the first ``length`` bytes; False if the file is shorter now."""
    position = 0
    while position < length:
        block = os.pread(fd, min(_READ_BLOCK, length - position), position)
        if not block:
            return False
        digest.update(block)
        position += len(block)
    return True


def _read_block(fd: int, position: int, size: int, digest: Any) -> bytes:
    block = os.pread(fd, size, position)
    digest.update(block)
    return block


def _dir_mtimes(source: bytes, paths: Iterable[bytes]) -> dict[bytes, int]:
    """Return the current local mtime of each directory (read now: files changed them)."""
    result = {}
    for path in paths:
        try:
            info = os.lstat(source + b"/" + path if path else source)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            result[path] = info.st_mtime_ns
    return result


def check_source(source: str | os.PathLike[str]) -> bytes:
    """Return the folder to back up as an absolute bytes path, or raise SourceMissing."""
    path = os.fsencode(os.path.abspath(source))
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise SourceMissing(os.fsdecode(path))
    return path


def _is_empty(path: bytes) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


async def _adopt(link: PeerLink, writer: IndexWriter, folder: str) -> int:
    """Learn what the host already holds when the index knows nothing of this pair.

    That happens after a lost index or on a rebuilt node: unchanged files are then neither
    sent again nor their host copies moved to trash. All or nothing: a listing cut short
    leaves the pair unknown, so the next run adopts again.
    """
    folder_name = check_folder_name(folder)
    prefix = folder_name + b"/"
    count = 0
    try:
        async with contextlib.aclosing(link.list(folder_name)) as listing:
            async for item, _ in listing:
                if not item.path.startswith(prefix):
                    continue
                rel = item.path[len(prefix) :]
                writer.record(IndexEntry(rel, item.kind, item.size, item.mtime_ns, item.mode, None))
                count += 1
                await writer.maybe_flush()
    except HostRefused as err:
        if err.code != "missing":
            await writer.discard_pair()
            raise
    except BaseException:
        await writer.discard_pair()
        raise
    await writer.flush()
    await writer.call(writer.register_pair)
    return count


async def push(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    source: str | os.PathLike[str],
    index: Index,
    *,
    exclude: Sequence[str] = (),
    bwlimit: int | None = None,
    retention_days: int | None = None,
    progress: ProgressCallback | None = None,
    allow_empty: bool = False,
    connect_if_unchanged: bool = True,
) -> PushResult:
    """Bring the replica of ``folder`` on ``target`` up to date with ``source``.

    Raises SourceMissing (also when ``source`` is empty while the host holds files of it,
    as when a disk is not mounted: emptying the replica takes ``allow_empty``), the
    connection errors of ``client.connect``, QuotaExceeded (with how much is still needed
    and how much is left) or PeerDiskFull — always after recording in the index everything
    the host acknowledged.

    The connection is made while the folder is scanned. With ``connect_if_unchanged``
    False, a run that finds nothing to change (the index knows the pair, no retention is
    asked) does not contact the peer at all: ``peer_contacted`` is then False, and its
    success says nothing about the peer being reachable.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    check_folder_name(folder)
    raw_source = await loop.run_in_executor(None, check_source, source)
    writer = IndexWriter(index, folder, target.id)
    connection = _Connection(identity, target)
    try:
        try:
            known = (folder, target.id) in await writer.call(index.folders)
            if connect_if_unchanged or not known or retention_days:
                connection.start()
            if not known:
                await _adopt(await connection.open(), writer, folder)
            if not allow_empty:
                await _refuse_empty(loop, writer, index, folder, target, raw_source)
            if retention_days:
                await (await connection.open()).set_retention(folder, retention_days)
            result = await _run_push(
                connection, writer, folder, raw_source, target, index, exclude, bwlimit, progress
            )
            if connect_if_unchanged and connection.link is None:
                await connection.open()  # nothing to send, but the peer must still answer
            result.peer_contacted = connection.link is not None
        finally:
            # Close first: no acknowledgement can arrive after the last flush.
            await connection.close()
            await writer.flush()
    finally:
        await loop.run_in_executor(None, writer.close)
    result.seconds = time.monotonic() - started
    return result


async def _refuse_empty(
    loop: asyncio.AbstractEventLoop,
    writer: IndexWriter,
    index: Index,
    folder: str,
    target: PeerTarget,
    source: bytes,
) -> None:
    """Raise SourceMissing if ``source`` is empty while the host holds files of it."""
    if not await loop.run_in_executor(None, _is_empty, source):
        return
    files, _ = await writer.call(index.stats, folder, target.id)
    if files:
        raise SourceMissing(
            os.fsdecode(source),
            f"is empty while the peer holds {files} file(s) of it (is the disk mounted?); "
            "nothing was deleted — to really empty the replica, allow an empty folder",
        )


async def _run_push(
    connection: _Connection,
    writer: IndexWriter,
    folder: str,
    source: bytes,
    target: PeerTarget,
    index: Index,
    exclude: Sequence[str],
    bwlimit: int | None,
    progress: ProgressCallback | None,
) -> PushResult:
    loop = asyncio.get_running_loop()
    pusher = _Pusher(connection, writer, folder, source, Throttle(bwlimit), progress)
    feeder = _Feeder(loop, source, index, folder, target.id, exclude)
    pusher.on_stop = feeder.count_only.set
    thread = loop.run_in_executor(None, feeder.run)
    try:
        while (item := await feeder.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            batch, last = item
            pusher.plan(batch, last)
            if batch and connection.link is None:
                await connection.open()  # the first change
            for work in batch:
                await pusher.handle(work)
                await pusher.take_turns()
            if isinstance(pusher.stop_error, PeerUnreachable):
                break  # nothing more can be sent; counting what is left is only for quota
        pusher.state.scan_complete = True
        if connection.link is not None:  # else nothing changed: nothing to finish
            pusher.state.phase = Phase.TRANSFERRING
            await connection.link.sync()
            if pusher.stop_error is None:
                await pusher.finish_dirs()
    except MyNasError as err:
        if pusher.stop_error is None:
            pusher.stop_error = err
    finally:
        feeder.stop()
        await asyncio.gather(thread, return_exceptions=True)
        await loop.run_in_executor(None, pusher.close)
    await writer.flush()
    result = pusher.result
    report = feeder.report
    result.files_total = report.files
    result.bytes_total = report.bytes
    for path, message in report.errors:
        result.add_error(f"{os.fsdecode(path)}: {message}")
    stopped = pusher.stop_error
    if stopped is not None:
        if isinstance(stopped, QuotaExceeded):
            available = pusher.quota_available
            raise QuotaExceeded(
                max(stopped.needed, pusher.still_needed),
                stopped.available if available is None else available,
            )
        raise stopped
    pusher.state.phase = Phase.DONE
    pusher.report(force=True)
    return result
