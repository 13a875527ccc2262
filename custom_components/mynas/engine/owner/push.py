"""Push: keep a folder's replica on a peer current.

A replica of folder ``F`` is a plain mirror at ``<jail>/F/`` on the host (same relative paths,
same bytes, same mtimes), readable with standard tools. Push follows DESIGN.md's data flow:
the scanner walks the folder in a worker thread and diffs it against the SQLite index, the
same thread reads the small files it must send (``feed``), and the event loop streams them
over one channel; the index records a file only once the host says it is durable
(``index_writer``), so a broken run leaves index and replica consistent, and the next run
completes the work.

Getting the replica back is ``restore``'s job, checking it ``verify``'s; the words they all
share (targets, progress, results) are ``run``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import dataclass
import os
import stat
import time
from typing import Any

from .. import tree
from ..errors import (
    HostRefused,
    MyNasError,
    PeerDiskFull,
    PeerUnreachable,
    QuotaExceeded,
    SourceMissing,
)
from ..identity import Identity
from .client import PeerLink, Upload, connect_any
from .feed import Feeder, Work
from .index import Index, IndexEntry
from .index_writer import IndexWriter
from .run import (
    PeerTarget,
    Phase,
    Progress,
    ProgressCallback,
    PushResult,
    Reporter,
    check_folder_name,
    check_source,
    remote_path,
)
from .scanner import Action
from .throttle import Throttle

# Read large files this much per worker-thread hop (sent as several pieces).
_READ_BLOCK = 4 * Upload.piece_size
# The longest the push handles files without letting the event loop run other tasks.
_TURN = 0.002


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


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
        self.report = Reporter(self.state, progress)
        self.stop_error: MyNasError | None = None
        # Bytes of the files the run could not store once the host ran out of room.
        self.still_needed = 0
        self.quota_available: int | None = None
        self.on_stop: Callable[[], None] | None = None
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

    def plan(self, batch: list[Work], last: bool) -> None:
        """Count a batch into the totals before sending it (final with the last one)."""
        for work in batch:
            if (
                work.change.action is not Action.DELETED
                and work.change.entry.kind is tree.Kind.FILE
            ):
                self.state.files_total += 1
                self.state.bytes_total += work.change.entry.size
        self.state.scan_complete = last

    async def handle(self, work: Work) -> None:
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

    async def _put(self, work: Work) -> None:
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
                upload = await self.link.upload(remote, entry.size, entry.mtime_ns, entry.mode)
            except MyNasError as err:
                self._failed(err, entry.path, entry.size)
                return
            digest = tree.new_hash()
            try:
                sent = await self._stream_file(fd, upload, entry, digest)
            except OSError as err:
                # The local disk failed us: keep what the host has for a later resume.
                await upload.abandon()
                self.result.add_error(f"{os.fsdecode(entry.path)}: {err.strerror or err}")
                return
            if not sent:
                # Changed while we read it: never record it; the next run sends it again.
                await upload.discard()
                self.result.files_changed_during_read += 1
                return
            try:
                await upload.finish()
            except MyNasError as err:
                self._failed(err, entry.path, entry.size)
                return
            self.index.record(IndexEntry.from_entry(entry, digest.digest()))
            self.result.files_sent += 1
            self.result.bytes_sent += entry.size - upload.offset
            self.state.files_done += 1
        finally:
            # Queued behind any read still running: the descriptor outlives its last use.
            self._in_reader(os.close, fd)

    async def _stream_file(self, fd: int, upload: Upload, entry: tree.Entry, digest: Any) -> bool:
        """Send ``entry`` from where the host's copy ends; False if it changed under the reader.

        The reader thread reads and hashes the next block while this one is being sent.
        """
        offset = upload.offset
        if offset:
            if not await self._in_reader(_hash_prefix, fd, offset, digest):
                return False
            self.state.bytes_done += offset
        position = offset
        step = upload.piece_size

        def read_ahead() -> asyncio.Future[bytes] | None:
            if position >= entry.size:
                return None
            size = min(_READ_BLOCK, entry.size - position)
            return self._in_reader(_read_block, fd, position, size, digest)

        ahead = read_ahead()
        try:
            while ahead is not None:
                block = await ahead
                ahead = None
                if not block:
                    break
                position += len(block)
                ahead = read_ahead()
                view = memoryview(block)
                for start in range(0, len(block), step):
                    piece = view[start : start + step]
                    await self.throttle.consume(len(piece))
                    await upload.send(piece)
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
    feeder = Feeder(loop, source, index, folder, target.id, exclude)
    pusher.on_stop = feeder.count_only.set
    thread = loop.run_in_executor(None, feeder.run)
    try:
        while (item := await feeder.handoff.get()) is not None:
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
    pusher.report.done()
    return result
