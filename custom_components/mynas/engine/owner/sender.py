"""Push's sending half: each change over the link, and what the host acknowledged booked.

``push`` feeds a ``Sender`` the scan's work in batches (``feed``): small files go whole in a
PUT each, large ones stream from a reader thread (``Upload``), deletions and directories
are requests of their own. A small file waits for nothing but the channel's flow control:
the host's acknowledgements arrive as callbacks that update the result and queue index
records (``IndexWriter``). A quota or disk-full refusal, or a lost connection, stops the sending
(``stop_error``) while the scan goes on counting what the run still needed.

Where each entry goes and how its bytes look on the host is the ``Layout``'s business
(``replica``): a sealed replica's large files are sealed here, in the reader thread, block
by block as they are read (``_SealedReader``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
import functools
import os
import stat
from typing import TYPE_CHECKING, Any

from .. import tree
from ..errors import HostRefused, MyNasError, PeerDiskFull, PeerUnreachable, QuotaExceeded
from .feed import Work
from .index import IndexEntry
from .index_writer import IndexWriter
from .replica import PlainLayout, SealedLayout
from .run import Phase, Progress, ProgressCallback, PushResult, Reporter
from .scanner import Action
from .throttle import Throttle

if TYPE_CHECKING:  # the client (and asyncssh) is loaded by the connection, when one is made
    from .client import PeerLink, Upload


@functools.cache
def _block_size() -> int:
    """Read large files this much per worker-thread hop (sent as several pieces).

    Asked of the client when first needed: it is loaded with the connection, and a run with
    nothing to send has none.
    """
    from .client import Upload  # noqa: PLC0415

    return 4 * Upload.piece_size


# A sealed file's blocks (a whole number of sealed chunks).
_SEALED_BLOCK = 64 * 64 * 1024
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


class Sender:
    """Sends one push's changes to one peer, over a link attached at the first change."""

    def __init__(
        self,
        index: IndexWriter,
        folder: str,
        source: bytes,
        throttle: Throttle,
        progress: ProgressCallback | None,
        layout: PlainLayout | None = None,
    ) -> None:
        self.index = index
        self.layout = PlainLayout(folder) if layout is None else layout
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
        self._hasher: ThreadPoolExecutor | None = None  # a sealed replica's, likewise
        self._turn_ends = 0.0  # when sending must next let the loop's other tasks run
        self._link: PeerLink | None = None

    @property
    def attached(self) -> bool:
        """Whether a link is attached (``push`` attaches it before the first change)."""
        return self._link is not None

    @property
    def link(self) -> PeerLink:
        """The attached link."""
        assert self._link is not None
        return self._link

    def attach(self, link: PeerLink) -> None:
        """Send over ``link`` from now on."""
        self._link = link

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
        """Send one change (or, once stopped, count what it would have needed)."""
        change = work.change
        entry = change.entry
        if self.stop_error is not None:
            if change.action is not Action.DELETED and entry.kind is tree.Kind.FILE:
                self.still_needed += self.layout.stored_size(entry.size)
            return
        if change.action is not Action.DELETED and entry.kind is tree.Kind.DIR:
            self._dirs[entry.path] = entry.mtime_ns
            return
        self.state.phase = Phase.TRANSFERRING
        if change.action is Action.DELETED:
            await self._delete(entry, work.remote)
        elif work.error is not None:
            self.result.add_error(work.error)
        elif work.changed:
            self.result.files_changed_during_read += 1
        elif work.data is not None:
            await self._put(work)
        else:
            assert isinstance(entry, tree.Entry)
            await self._upload(entry, work.remote)
        await self.index.maybe_flush()
        self.report()

    async def _delete(self, entry: tree.Entry | IndexEntry, remote: bytes) -> None:
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
        await self.link.delete(remote, done)

    async def _put(self, work: Work) -> None:
        entry = work.change.entry
        assert work.data is not None
        size = len(work.data)
        record = IndexEntry(
            entry.path,
            tree.Kind.FILE,
            entry.size,
            entry.mtime_ns,
            entry.mode,
            work.digest,
            work.stored,
        )

        def done(err: MyNasError | None) -> None:
            if err is not None:
                self._failed(err, entry.path, size)
                return
            self.index.record(record)
            self.result.files_sent += 1
            self.result.bytes_sent += size
            self.state.files_done += 1
            self.state.bytes_done += entry.size

        self._touch(entry.path)
        await self.throttle.consume(size)
        layout = self.layout
        await self.link.put(
            work.remote,
            layout.host_mtime(entry.mtime_ns),
            layout.host_mode(entry.mode),
            work.data,
            done,
        )

    def _in_reader[T](self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``func`` in the thread that reads large files, after what it already runs.

        One thread, so a file's reads, its hash updates and its close happen in order, and a
        close never races a read still running for a transfer that was cut short.
        """
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="mynas-read")
        return self._loop.run_in_executor(self._reader, func, *args)

    async def _open_for[T](
        self, entry: tree.Entry, opener: Callable[..., T], *args: Any
    ) -> T | None:
        """Open ``entry`` with ``opener`` in the reader thread; None (counted) if it cannot be."""
        try:
            return await self._in_reader(opener, *args)
        except FileNotFoundError:
            self.result.files_changed_during_read += 1  # gone since the scan
        except OSError as err:
            self.result.add_error(f"{os.fsdecode(entry.path)}: {err.strerror or err}")
        return None

    def close(self) -> None:
        """Wait for the reader thread's last jobs (blocking: call it from a worker thread)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)

    async def _upload(self, entry: tree.Entry, remote: bytes) -> None:
        if isinstance(self.layout, SealedLayout):
            await self._upload_sealed(entry, remote, self.layout)
            return
        self._touch(entry.path)
        fd = await self._open_for(entry, _open_local, self.source + b"/" + entry.path)
        if fd is None:
            return
        try:
            digest = tree.new_hash()
            await self._send_large(
                entry,
                remote,
                (entry.size, entry.mtime_ns, entry.mode),
                lambda upload: self._stream_file(fd, upload, entry, digest),
                lambda: IndexEntry.from_entry(entry, digest.digest()),
            )
        finally:
            # Queued behind any read still running: the descriptor outlives its last use.
            self._in_reader(os.close, fd)

    async def _send_large(
        self,
        entry: tree.Entry,
        remote: bytes,
        stored: tuple[int, int, int],
        stream: Callable[[Upload], Awaitable[bool]],
        indexed: Callable[[], IndexEntry],
    ) -> None:
        """Upload ``entry`` as ``stored`` (size, mtime, mode on the host) through ``stream``.

        ``stream`` sends from where the host's copy ends and says whether the file stayed
        as scanned; ``indexed`` is what the index records once the host has it whole.
        """
        size = stored[0]
        try:
            upload = await self.link.upload(remote, *stored)
        except MyNasError as err:
            self._failed(err, entry.path, size)
            return
        try:
            sent = await stream(upload)
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
            self._failed(err, entry.path, size)
            return
        self.index.record(indexed())
        self.result.files_sent += 1
        self.result.bytes_sent += size - upload.offset
        self.state.files_done += 1

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
            size = min(_block_size(), entry.size - position)
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

    async def _upload_sealed(self, entry: tree.Entry, remote: bytes, layout: SealedLayout) -> None:
        """Send a large file of a sealed replica, sealed block by block as it is read."""
        self._touch(entry.path)
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="mynas-hash")
        reader = await self._open_for(
            entry, _SealedReader, self.source + b"/" + entry.path, entry, layout, self._hasher
        )
        if reader is None:
            return
        try:
            if reader.changed:
                self.result.files_changed_during_read += 1
                return
            await self._send_large(
                entry,
                remote,
                (
                    layout.stored_size(entry.size),
                    layout.host_mtime(entry.mtime_ns),
                    layout.host_mode(entry.mode),
                ),
                lambda upload: self._stream_sealed(reader, upload),
                lambda: IndexEntry.from_entry(
                    entry, reader.digest.digest(), reader.stored.digest()
                ),
            )
        finally:
            self._in_reader(reader.close)

    async def _stream_sealed(self, reader: _SealedReader, upload: Upload) -> bool:
        """Send the sealed file from where the host's copy ends; False if it changed.

        The part the host already holds is sealed again (the same salt gives the same
        bytes) for the hashes, and not sent.
        """
        offset = upload.offset
        position = 0  # in the stored file
        step = upload.piece_size
        ahead: asyncio.Future[bytes | bytearray | None] | None = self._in_reader(reader.next_block)
        try:
            while ahead is not None:
                block = await ahead
                ahead = None
                if block is None:
                    return False
                plain = reader.last_plain
                ahead = None if reader.done else self._in_reader(reader.next_block)
                start = max(0, offset - position)
                position += len(block)
                view = memoryview(block)
                for begin in range(start, len(block), step):
                    piece = view[begin : begin + step]
                    await self.throttle.consume(len(piece))
                    await upload.send(piece)
                    await self.take_turns()
                self.state.bytes_done += plain
                self.report()
        finally:
            if ahead is not None:
                ahead.cancel()
        return await self._in_reader(reader.unchanged)

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

            layout = self.layout
            await self.link.mkdir(layout.stored(path), layout.dir_mtime(mtime), done)
        await self.link.sync()


class _SealedReader:
    """Reads and seals one large file in the reader thread, checking it does not change.

    Its salt follows the file's identity on disk (``sealed.resume_salt``), so a resumed
    upload seals the same bytes; every block read is checked against that identity first,
    so changed data is never sealed with the old salt.

    Both hashes (of the plain block and of its sealed bytes) are updated in ``hasher``, a
    thread of their own, while this one seals: hashing and AES-GCM both release the GIL, so
    on two cores the file is hashed and sealed at once. ``unchanged`` (the last step) waits
    for the hashes.
    """

    def __init__(
        self, path: bytes, entry: tree.Entry, layout: SealedLayout, hasher: ThreadPoolExecutor
    ) -> None:
        from . import sealed  # noqa: PLC0415 - with the layout, already loaded

        self._fd = _open_local(path)
        try:
            info = os.fstat(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._entry = entry
        self._identity = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        self.changed = (
            not stat.S_ISREG(info.st_mode)
            or info.st_size != entry.size
            or info.st_mtime_ns != entry.mtime_ns
        )
        jail_path = layout.jail_path(entry.path)
        salt = sealed.resume_salt(layout.keys.salts, jail_path, info)
        meta = sealed.Meta(entry.mtime_ns, entry.mode, entry.size)
        self._sealer = sealed.Sealer(layout.keys.contents, jail_path, meta, salt=salt)
        self._position = 0
        self._head: bytes | None = self._sealer.head
        self.digest = tree.new_hash()
        self.stored = tree.new_hash()
        self._hasher = hasher
        self._hashing: Future[None] | None = None  # the last hash update handed over
        self.last_plain = 0  # plain bytes in the last block returned

    @property
    def done(self) -> bool:
        """Whether the whole file was sealed."""
        return self._sealer.done

    def _same(self) -> bool:
        info = os.fstat(self._fd)
        return (info.st_size, info.st_mtime_ns, info.st_ctime_ns) == self._identity

    def next_block(self) -> bytes | bytearray | None:
        """Return the next sealed bytes; None if the file changed (nothing sealed then)."""
        size = min(_SEALED_BLOCK, self._entry.size - self._position)
        block = os.pread(self._fd, size, self._position)
        if len(block) != size or not self._same():
            return None
        self._position += size
        if self._hashing is not None:  # at most one block waits for its hashes
            self._hashing.result()
        # One hashing thread, so the updates of each hash keep their order.
        self._hasher.submit(self.digest.update, block)
        out: bytes | bytearray = self._sealer.update_buffer(block)
        if self._head is not None:
            out, self._head = self._head + out, None
        self._hashing = self._hasher.submit(self.stored.update, out)
        self.last_plain = size
        return out

    def unchanged(self) -> bool:
        """Whether the file was sealed whole and is still what the scan saw (hashes done)."""
        if self._hashing is not None:
            self._hashing.result()
        return self.done and self._same()

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def _open_local(path: bytes) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _hash_prefix(fd: int, length: int, digest: Any) -> bool:
    """Hash the first ``length`` bytes; False if the file is shorter now."""
    position = 0
    while position < length:
        block = os.pread(fd, min(_block_size(), length - position), position)
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
