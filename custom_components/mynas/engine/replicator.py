"""Push, restore and verify: keep a folder's replica on a peer current, and get it back.

A replica of folder ``F`` is a plain mirror at ``<jail>/F/`` on the host (same relative paths,
same bytes, same mtimes), readable with standard tools. Push follows DESIGN.md's data flow:
the scanner walks the folder in a worker thread and diffs it against the SQLite index, the
same thread reads the small files it must send, and the event loop streams them over one
channel; the index records a file only once the host says it is durable, so a broken run
leaves index and replica consistent, and the next run completes the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
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

from . import protocol, scanner, tree
from .client import PeerLink, connect_any
from .errors import (
    HostRefused,
    MyNasError,
    PathRefused,
    PeerDiskFull,
    PeerUnreachable,
    QuotaExceeded,
    RestoreConflict,
    SourceMissing,
)
from .identity import Identity
from .index import Index, IndexEntry
from .protocol import CHUNK, Close, FailCode, Frame
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
_PROGRESS_INTERVAL = 0.25
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
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass(slots=True)
class VerifyResult:
    """What verify found (and repaired)."""

    folder: str
    checked: int = 0
    missing: int = 0
    mismatched: int = 0
    extra: int = 0
    repaired: int = 0
    # True once a repair push went through without errors: the replica matches now.
    repair_complete: bool = False
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """True when the replica matches the source exactly."""
        return not (self.missing or self.mismatched or self.extra)

    def note(self, kind: str, path: bytes) -> None:
        """Remember an example of a difference."""
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(f"{kind}: {os.fsdecode(path)}")

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as plain data."""
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["clean"] = self.clean
        return data


@dataclass(slots=True)
class RestoreResult:
    """What a restore wrote."""

    folder: str
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as plain data."""
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
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


def _remote(folder: bytes, path: bytes) -> bytes:
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


class _IndexWriter:
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
        self._ops.append(("record", entry))
        self._count += 1

    def forget(self, path: bytes, kind: tree.Kind) -> None:
        self._ops.append(("forget", (path, kind)))
        self._count += 1

    def forget_tree(self, path: bytes) -> None:
        self._ops.append(("forget_tree", path))
        self._count += 1

    def record_root(self, mtime_ns: int) -> None:
        self._ops.append(("root", mtime_ns))
        self._count += 1

    async def maybe_flush(self) -> None:
        if self._count >= _INDEX_BATCH or (self._ops and time.monotonic() - self._last > 1.0):
            await self.flush()

    async def flush(self) -> None:
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
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def register_pair(self) -> None:
        """Make (folder, peer) known to the index, even while the peer holds nothing."""
        self._index.record(self._folder, self._peer, [])

    async def discard_pair(self) -> None:
        """Forget everything about (folder, peer), pending changes included."""
        self._ops, self._count = [], 0
        await asyncio.shield(self.call(self._index.clear, self._folder, self._peer))

    def close(self) -> None:
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
        index: _IndexWriter,
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
        if self._progress is not None and (
            force or now - self._last_progress >= _PROGRESS_INTERVAL
        ):
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
        await self.link.delete(_remote(self.folder, path), done)

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
            _remote(self.folder, entry.path), entry.mtime_ns, entry.mode, work.data, done
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
        remote = _remote(self.folder, entry.path)
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

            await self.link.mkdir(_remote(self.folder, path), mtime, done)
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


def _check_source(source: str | os.PathLike[str]) -> bytes:
    """Return the folder to back up as an absolute bytes path, or raise SourceMissing."""
    path = os.fsencode(os.path.abspath(source))
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise SourceMissing(os.fsdecode(path))
    return path


def _is_empty(path: bytes) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


async def _adopt(link: PeerLink, writer: _IndexWriter, folder: str) -> int:
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
    raw_source = await loop.run_in_executor(None, _check_source, source)
    writer = _IndexWriter(index, folder, target.id)
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
    writer: _IndexWriter,
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
    writer: _IndexWriter,
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


# --- restore ---------------------------------------------------------------------------------


def check_subpath(path: str | bytes) -> bytes:
    """Return a sub-path of a folder as relative bytes, or raise ValueError."""
    raw = os.fsencode(path).strip(b"/")
    parts = raw.split(b"/") if raw else []
    if any(part in (b"", b".", b"..") or b"\0" in part for part in parts):
        raise ValueError(f"{os.fsdecode(raw)!r} is not a path inside the folder")
    return raw


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _LocalWriter:
    """Writes restored files under the target directory (blocking; worker threads only).

    Paths come from the host, which is not trusted with our disk: each must be a plain
    relative path, and a file is written to a temporary name and renamed, never through a
    symlink.
    """

    def __init__(self, target: bytes, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite

    def local(self, rel: bytes) -> bytes:
        """Return where ``rel`` goes; PathRefused unless it is a plain path under the target."""
        if rel.startswith(b"/") or rel.endswith(b"/"):
            raise PathRefused(f"the host sent {rel!r}, not a relative path")
        try:
            check_subpath(rel)
        except ValueError:
            raise PathRefused(f"the host sent {rel!r}, not a plain relative path") from None
        if not rel:
            return self.target
        # No existing component may be a symlink: the host must not steer writes elsewhere.
        current = self.target
        for part in rel.split(b"/")[:-1]:
            current = current + b"/" + part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(info.st_mode):
                raise PathRefused(f"{os.fsdecode(current)} is in the way (not a directory)")
        return self.target + b"/" + rel

    def make_dir(self, rel: bytes) -> None:
        path = self.local(rel)
        if os.path.islink(path):
            raise PathRefused(f"{os.fsdecode(path)} is a symlink")
        os.makedirs(path, exist_ok=True)

    def conflicts(self, rels: Iterable[bytes]) -> list[bytes]:
        return [rel for rel in rels if os.path.lexists(self.local(rel))]

    def write_files(self, files: Iterable[tuple[tree.Entry, bytes, bytes]]) -> None:
        for entry, rel, data in files:
            tmp = self.open_temp(rel)
            try:
                _write_all(tmp[0], data)
            except BaseException:
                self.discard(tmp)
                raise
            self.install(tmp, entry, rel)

    def open_temp(self, rel: bytes) -> tuple[int, bytes]:
        if not rel:
            raise PathRefused("the host sent a file where the restored folder itself goes")
        path = self.local(rel)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)  # local() checked what exists of it
        tmp = os.path.join(parent, b".mynas-restore-" + os.urandom(6).hex().encode())
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        return fd, tmp

    def install(self, tmp: tuple[int, bytes], entry: tree.Entry, rel: bytes) -> None:
        """Give the temp file its mode and mtime and its final name (closes and consumes it)."""
        fd, tmp_path = tmp
        try:
            try:
                os.fchmod(fd, tree.portable_mode(entry.mode))
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            self._place(tmp_path, rel)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise

    def _place(self, tmp_path: bytes, rel: bytes) -> None:
        path = self.local(rel)
        if not self.overwrite and os.path.lexists(path):
            raise RestoreConflict(os.fsdecode(self.target), os.fsdecode(rel), 1)
        os.replace(tmp_path, path)

    @staticmethod
    def write(tmp: tuple[int, bytes], data: bytes) -> None:
        _write_all(tmp[0], data)

    @staticmethod
    def discard(tmp: tuple[int, bytes]) -> None:
        """Drop a temp file that ``install`` has not consumed."""
        with contextlib.suppress(OSError):
            os.close(tmp[0])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp[1])

    def set_dir_mtimes(self, dirs: list[tuple[bytes, int]]) -> None:
        for rel, mtime in dirs:
            path = self.local(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def _make_destination(destination: str | os.PathLike[str]) -> bytes:
    path = os.fsencode(os.path.abspath(destination))
    os.makedirs(path, exist_ok=True)
    return path


async def restore(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    destination: str | os.PathLike[str],
    *,
    path: str | bytes = b"",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Copy a folder's replica (or ``path`` inside it) from the host into ``destination``.

    Needs nothing but our key and the peer's address and key: no index, no old config (the
    house-fire case). Paths keep their place relative to the folder, mtimes are restored.
    Existing files are never overwritten unless ``overwrite``: RestoreConflict is raised
    before anything is written. PathRefused if the host sends anything else than what was
    asked.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    folder_name = check_folder_name(folder)
    sub = check_subpath(path)
    dest = await loop.run_in_executor(None, _make_destination, destination)
    writer = _LocalWriter(dest, overwrite)
    result = RestoreResult(folder)
    state = Progress(Phase.RESTORING)
    remote_root = _remote(folder_name, sub)
    prefix = folder_name + b"/"

    def relative(item_path: bytes) -> bytes:
        if item_path != remote_root and not item_path.startswith(remote_root + b"/"):
            raise PathRefused(f"the host sent {item_path!r}, outside what was asked")
        return item_path[len(prefix) :] if item_path != folder_name else b""

    link = await connect_any(identity, target.addresses, target.public_key)
    try:
        # Totals for progress, and the overwrite check before a single byte is written.
        files: list[bytes] = []
        try:
            async with contextlib.aclosing(link.list(remote_root)) as listing:
                async for item, _ in listing:
                    rel = relative(item.path)
                    if item.kind is tree.Kind.FILE:
                        if not rel:
                            raise PathRefused("the host sent a file where the folder itself goes")
                        state.files_total += 1
                        state.bytes_total += item.size
                        if not overwrite:
                            files.append(rel)
        except HostRefused as err:
            if err.code == FailCode.MISSING:
                raise HostRefused(
                    err.code, f"the peer holds nothing at {os.fsdecode(remote_root)}"
                ) from None
            if err.code != FailCode.PATH or not sub:
                raise
            # Not a directory: one file (READ says which, or why not). Totals come with it.
            files = [sub] if not overwrite else []
        else:
            state.scan_complete = True
        if files:
            conflicts = await loop.run_in_executor(None, writer.conflicts, files)
            if conflicts:
                raise RestoreConflict(os.fsdecode(dest), os.fsdecode(conflicts[0]), len(conflicts))
        files.clear()
        await _receive(link, remote_root, writer, relative, result, state, progress)
    finally:
        await link.close()
    result.seconds = time.monotonic() - started
    state.phase = Phase.DONE
    state.scan_complete = True
    if progress is not None:
        progress(state)
    return result


async def _receive(
    link: PeerLink,
    remote_root: bytes,
    writer: _LocalWriter,
    relative: Callable[[bytes], bytes],
    result: RestoreResult,
    state: Progress,
    progress: ProgressCallback | None,
) -> None:
    loop = asyncio.get_running_loop()
    dirs: list[tuple[bytes, int]] = []
    pending: list[tuple[tree.Entry, bytes, bytes]] = []
    pending_size = 0
    current: tree.Entry | None = None
    current_rel = b""
    parts: list[bytes] = []
    received = 0
    large: tuple[int, bytes] | None = None
    last = 0.0

    async def flush() -> None:
        nonlocal pending, pending_size
        if pending:
            batch, pending, pending_size = pending, [], 0
            await loop.run_in_executor(None, writer.write_files, batch)

    async def complete() -> None:
        nonlocal current, large, pending_size
        assert current is not None
        if large is not None:
            tmp, large = large, None
            await loop.run_in_executor(None, writer.install, tmp, current, current_rel)
        else:
            pending.append((current, current_rel, b"".join(parts)))
            pending_size += current.size
            if len(pending) >= 256 or pending_size >= 4 * 1024 * 1024:
                await flush()
        result.files += 1
        result.bytes += current.size
        state.files_done += 1
        current = None

    try:
        async with contextlib.aclosing(link.read(remote_root)) as frames:
            async for kind, value in frames:
                if kind is Frame.ENTRY:
                    if current is not None:
                        raise PathRefused("the host sent a file shorter than announced")
                    item: tree.Entry = value[0]
                    rel = relative(item.path)
                    if item.kind is tree.Kind.DIR:
                        await loop.run_in_executor(None, writer.make_dir, rel)
                        dirs.append((rel, item.mtime_ns))
                        result.dirs += 1
                        continue
                    if not state.scan_complete:  # a single file: its totals come now
                        state.files_total, state.bytes_total = 1, item.size
                        state.scan_complete = True
                    current, current_rel, parts, received = item, rel, [], 0
                    if item.size > SMALL_FILE:
                        await flush()
                        large = await loop.run_in_executor(None, writer.open_temp, rel)
                    elif item.size == 0:
                        await complete()
                else:
                    chunk = bytes(value)
                    if current is None or received + len(chunk) > current.size:
                        raise PathRefused("the host sent more data than announced")
                    received += len(chunk)
                    state.bytes_done += len(chunk)
                    if large is not None:
                        await loop.run_in_executor(None, writer.write, large, chunk)
                    else:
                        parts.append(chunk)
                    if received == current.size:
                        await complete()
                    now = time.monotonic()
                    if progress is not None and now - last >= _PROGRESS_INTERVAL:
                        last = now
                        progress(state)
        if current is not None:
            raise PathRefused("the host sent a file shorter than announced")
        await flush()
        dirs.sort(key=lambda d: len(d[0]), reverse=True)
        await loop.run_in_executor(None, writer.set_dir_mtimes, dirs)
    finally:
        if large is not None:
            await loop.run_in_executor(None, writer.discard, large)


# --- verify ----------------------------------------------------------------------------------


class _LocalHasher:
    """Walks the source and hashes its files in a worker thread, for verify."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, source: bytes, exclude: Sequence[str]
    ) -> None:
        self.queue: asyncio.Queue[list[tuple[tree.Entry, bytes | None]] | BaseException | None] = (
            asyncio.Queue(_QUEUE_BATCHES)
        )
        self._loop = loop
        self._source = source
        self._exclude = exclude
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            skip = scanner.Excludes(self._exclude) if self._exclude else None
            batch: list[tuple[tree.Entry, bytes | None]] = []
            for entry in tree.walk(self._source, skip=skip, on_error=lambda *_: None):
                digest = None
                if entry.kind is tree.Kind.FILE:
                    try:
                        digest = tree.hash_file(self._source + b"/" + entry.path)
                    except OSError:
                        digest = None
                batch.append((entry, digest))
                if len(batch) >= _HANDOFF_FILES and not self._hand(batch):
                    return
                if len(batch) >= _HANDOFF_FILES:
                    batch = []
            if batch and not self._hand(batch):
                return
            self._hand(None)
        except BaseException as err:  # handed to the loop, which re-raises
            self._hand(err)

    def _hand(self, item: Any) -> bool:
        future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self._loop)
        while not self._stop.is_set():
            try:
                future.result(timeout=0.2)
                return True
            except TimeoutError:
                continue
        future.cancel()
        return False

    async def entries(self) -> AsyncGenerator[tuple[tree.Entry, bytes | None]]:
        while (batch := await self.queue.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            for item in batch:
                yield item


async def verify(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    source: str | os.PathLike[str],
    index: Index | None = None,
    *,
    exclude: Sequence[str] = (),
    repair: bool = False,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Compare the host's content hashes with the local files, without downloading.

    Reports missing (here, not there), extra (there, not here) and mismatched files. With
    ``repair`` (which needs ``index``), the index learns what the host really holds —
    mismatched files left out — and a push then sends what is missing or wrong and moves
    the extras to the host's trash.
    """
    if repair and index is None:
        raise ValueError("repairing a replica needs the index")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    folder_name = check_folder_name(folder)
    raw_source = await loop.run_in_executor(None, _check_source, source)
    result = VerifyResult(folder)
    state = Progress(Phase.VERIFYING)
    prefix = folder_name + b"/"
    writer = _IndexWriter(index, folder, target.id) if repair and index is not None else None
    try:
        link = await connect_any(identity, target.addresses, target.public_key)
        try:
            await _compare(
                link,
                loop,
                folder_name,
                prefix,
                raw_source,
                exclude,
                result,
                state,
                writer,
                progress,
            )
        finally:
            await link.close()
            if writer is not None:
                await writer.flush()
    finally:
        if writer is not None:
            await loop.run_in_executor(None, writer.close)
    state.scan_complete = True
    if repair and index is not None and not result.clean:
        pushed = await push(
            identity, target, folder, source, index, exclude=exclude, progress=progress
        )
        result.repaired = pushed.files_sent + pushed.files_deleted
        result.repair_complete = not (pushed.error_count or pushed.files_changed_during_read)
    state.phase = Phase.DONE
    if progress is not None:
        progress(state)
    result.seconds = time.monotonic() - started
    return result


async def _compare(
    link: PeerLink,
    loop: asyncio.AbstractEventLoop,
    folder_name: bytes,
    prefix: bytes,
    source: bytes,
    exclude: Sequence[str],
    result: VerifyResult,
    state: Progress,
    writer: _IndexWriter | None,
    progress: ProgressCallback | None,
) -> None:
    """Merge the host's listing with the local walk (both in canonical order)."""
    hasher = _LocalHasher(loop, source, exclude)
    thread = loop.run_in_executor(None, hasher.run)
    remote = _host_entries(link, folder_name, prefix)
    local_items = hasher.entries()
    last = 0.0
    try:
        host = await anext(remote, None)
        mine = await anext(local_items, None)
        while host is not None or mine is not None:
            if mine is not None and (host is None or mine[0].key < host[0].key):
                result.missing += 1
                result.note("missing", mine[0].path)
                if writer is not None:
                    writer.forget(mine[0].path, mine[0].kind)
                mine = await anext(local_items, None)
            elif host is not None and (mine is None or host[0].key < mine[0].key):
                result.extra += 1
                result.note("extra", host[0].path)
                if writer is not None:  # known to the index, so the push deletes it
                    writer.record(IndexEntry.from_entry(host[0], host[1]))
                host = await anext(remote, None)
            else:
                assert host is not None
                assert mine is not None
                same = True
                if mine[0].kind is tree.Kind.FILE:
                    result.checked += 1
                    state.files_done += 1
                    state.bytes_done += mine[0].size
                    if mine[1] is None or mine[1] != host[1] or mine[0].size != host[0].size:
                        same = False
                        result.mismatched += 1
                        result.note("mismatched", mine[0].path)
                if writer is not None:
                    if same:
                        writer.record(IndexEntry.from_entry(host[0], host[1]))
                    else:
                        writer.forget(mine[0].path, mine[0].kind)
                host = await anext(remote, None)
                mine = await anext(local_items, None)
            if writer is not None:
                await writer.maybe_flush()
            now = time.monotonic()
            if progress is not None and now - last >= _PROGRESS_INTERVAL:
                last = now
                progress(state)
    finally:
        hasher.stop()
        await remote.aclose()
        await local_items.aclose()
        await asyncio.gather(thread, return_exceptions=True)


async def _host_entries(
    link: PeerLink, folder: bytes, prefix: bytes
) -> AsyncGenerator[tuple[tree.Entry, bytes | None]]:
    try:
        async with contextlib.aclosing(link.list(folder, with_hash=True)) as listing:
            async for item, digest in listing:
                if item.path.startswith(prefix):
                    rel = item.path[len(prefix) :]
                    yield tree.Entry(rel, item.kind, item.size, item.mtime_ns, item.mode), digest
    except HostRefused as err:
        if err.code != FailCode.MISSING:
            raise
