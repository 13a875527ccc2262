"""Large files received into resumable partials, in the jail's internal resume area.

A large file's partial is kept in ``<storage>/.mynas/partial/<peer>/`` when its upload
breaks off, so the next run resumes where it stopped; it stays counted in the quota and
``Uploads.purge`` removes it after ``PARTIAL_MAX_AGE`` without activity. Its name carries the
length known to be on disk (fsynced every ``CHECKPOINT`` bytes and when the upload is
abandoned), so a resume after a power cut never trusts bytes the disk may not have kept.

Quota of a partial: it is charged ``charge(length)`` for its current length, like any file.
``Uploads.begin`` reserves the rest of the final charge (``charge(size) - charge(length)``);
each write moves the growth from reserved to used; ``abandon`` keeps the partial's charge as
used and releases the rest; ``discard`` credits it back.

Everything here blocks: call it from worker threads, never from an event loop.
"""

from __future__ import annotations

from collections.abc import Buffer, Sequence
import contextlib
import hashlib
import logging
import os
import stat
from types import TracebackType
from typing import Self

from ..errors import ProtocolError
from . import disk
from .jailfs import JailFS
from .paths import check_mtime, file_mode, refuse, show
from .quota import charge
from .writes import JailWriter

_LOGGER = logging.getLogger(__name__)

PARTIAL_MAX_AGE = 7 * 86400
CHECKPOINT = 64 << 20


def _partial_names(rel: bytes, size: int, mtime_ns: int) -> tuple[bytes, bytes]:
    """Return (slot, key): the partial of ``rel`` is named ``<slot>.<key>.<durable>.part``.

    The slot depends on the path alone (one partial per path); the key also on the size and
    modification time, so a changed file never resumes from the bytes of an older one.
    """
    slot = hashlib.sha256(rel).hexdigest()[:32].encode()
    key = hashlib.sha256(b"%d:%d:%b" % (size, mtime_ns, rel)).hexdigest()[:32].encode()
    return slot, key


class Uploads:
    """The large files one jail is receiving: at most one upload per path (thread-safe)."""

    def __init__(self, fs: JailFS, writer: JailWriter) -> None:
        self._fs = fs
        self._writer = writer
        self._active: set[bytes] = set()  # the slots being uploaded, under fs.lock

    def __len__(self) -> int:
        """Return how many uploads are in progress."""
        return len(self._active)

    def begin(self, rel: bytes, size: int, mtime_ns: int, mode: int) -> Upload:
        """Start (or resume) receiving a large file; ``upload.offset`` says where to go on.

        Reserves what the file will cost beyond its partial's current charge, before any
        byte is written. Only one upload per path at a time (PathRefused otherwise).
        """
        if size < 0:
            raise ProtocolError(f"negative size for {show(rel)}: {size}")
        check_mtime(rel, mtime_ns)
        with disk.translate_errors(rel):
            where = self._fs.locate(rel)
            if where.info is not None and stat.S_ISDIR(where.info.st_mode):
                refuse(rel, "a directory is in the way")
            slot, key = _partial_names(rel, size, mtime_ns)
            with self._fs.lock:
                if slot in self._active:
                    refuse(rel, "it is already being uploaded")
                self._active.add(slot)
            try:
                return self._open_partial(rel, size, mtime_ns, mode, (slot, key))
            except BaseException:
                self._end(slot)
                raise

    def _open_partial(
        self, rel: bytes, size: int, mtime_ns: int, mode: int, names: tuple[bytes, bytes]
    ) -> Upload:
        """Resume the partial of this very version of ``rel``, or start a new one."""
        slot, key = names
        found: tuple[bytes, int] | None = None
        for name in os.listdir(self._fs.partial_b):
            if not name.startswith(slot + b"."):
                continue
            path = self._fs.partial_b + b"/" + name
            fields = name.split(b".")
            if found is None and len(fields) == 4 and fields[1] == key and fields[2].isdigit():
                found = (path, int(fields[2]))
            else:  # a partial of an older version of the file
                self._fs.quota.credit(disk.remove_tree(path))
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if found is None:
            path = self._fs.partial_b + b"/" + b".".join([slot, key, b"0", b"part"])
            self._fs.quota.reserve(charge(size))
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except BaseException:
                self._fs.quota.release(charge(size))
                raise
            self._fs.quota.commit(charge(0))
            reserved = charge(size) - charge(0)
            offset = 0
        else:
            path, durable = found
            fd = os.open(path, flags)
            try:
                length = os.fstat(fd).st_size
                # Bytes past the last checkpoint may not have survived a power cut: drop them.
                offset = min(durable, length, size)
                if length > offset:
                    os.ftruncate(fd, offset)
                    self._fs.quota.credit(charge(length) - charge(offset))
                reserved = charge(size) - charge(offset)
                self._fs.quota.reserve(reserved)
                os.utime(fd)  # touched: it is in use again
            except BaseException:
                os.close(fd)
                raise
        return Upload(
            self,
            rel,
            size=size,
            mtime_ns=mtime_ns,
            mode=mode,
            path=path,
            fd=fd,
            offset=offset,
            reserved=reserved,
        )

    def _end(self, slot: bytes) -> None:
        with self._fs.lock:
            self._active.discard(slot)

    def purge(self, now: float) -> int:
        """Remove partials left without activity for ``PARTIAL_MAX_AGE``; return bytes freed.

        The quota is not told: the caller credits what is freed.
        """
        freed = 0
        with self._fs.lock:  # an upload starting now cannot take a partial being removed
            for name in os.listdir(self._fs.partial_b):
                if name.partition(b".")[0] in self._active:
                    continue
                path = self._fs.partial_b + b"/" + name
                # ctime: every write, resume or rename touches it, and no peer can set it.
                if now - os.lstat(path).st_ctime > PARTIAL_MAX_AGE:
                    freed += disk.remove_quietly(path)
        return freed


class Upload:
    """A large file being received into a resumable partial (see the module docstring).

    Used by one thread at a time. End it with ``finish``, ``abandon`` or ``discard``; as a
    context manager it is abandoned on exit unless finished, so a lost connection keeps the
    partial for a later resume.
    """

    def __init__(
        self,
        owner: Uploads,
        rel: bytes,
        *,
        size: int,
        mtime_ns: int,
        mode: int,
        path: bytes,
        fd: int,
        offset: int,
        reserved: int,
    ) -> None:
        self.rel = rel
        self.size = size
        self.mtime_ns = mtime_ns
        self.mode = mode
        self.offset = offset
        self._owner = owner
        self._quota = owner._fs.quota
        self._path = path
        self._fd = fd
        self._durable = offset
        self._reserved = reserved
        self._done = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abandon()

    def _check_open(self) -> None:
        if self._done:
            raise ProtocolError(f"the upload of {show(self.rel)} is already over")

    def write(self, data: Buffer) -> None:
        """Append ``data`` at ``offset``; ProtocolError if it would pass the announced size."""
        self.write_many([data])

    def write_many(self, chunks: Sequence[Buffer]) -> None:
        """Append ``chunks`` in order at ``offset``, in one system call for many of them."""
        self._check_open()
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        end = self.offset + sum(view.nbytes for view in views)
        if end > self.size:
            raise ProtocolError(
                f"{end} bytes sent for {show(self.rel)}, announced as {self.size} bytes"
            )
        try:
            disk.pwrite_all(self._fd, views, self.offset)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.offset)  # back to what is counted and known
            raise disk.batch_error(err, self.rel) from err
        grown = charge(end) - charge(self.offset)
        self._quota.commit(grown)
        self._reserved -= grown
        self.offset = end
        if self.offset - self._durable >= CHECKPOINT:
            with disk.translate_errors(self.rel):
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Make the bytes so far durable and record their length in the partial's name."""
        if self.offset == self._durable:
            return
        os.fsync(self._fd)
        head, _, _ = self._path.rsplit(b".", 2)
        path = head + b".%d.part" % self.offset
        os.rename(self._path, path)
        self._path = path
        disk.fsync_dir(os.path.dirname(path))
        self._durable = self.offset

    def finish(self) -> None:
        """Put the complete file in place, durably (the old version goes to the trash).

        On failure the upload stays open: end it with ``abandon`` or ``discard``.
        """
        self._check_open()
        if self.offset != self.size:
            raise ProtocolError(
                f"only {self.offset} of {self.size} bytes received for {show(self.rel)}"
            )
        with disk.translate_errors(self.rel):
            os.fchmod(self._fd, file_mode(self.mode))
            os.utime(self._fd, ns=(self.mtime_ns, self.mtime_ns))
            os.fsync(self._fd)
            self._owner._writer.install(self._path, self.rel)
            self._end()
            self._owner._fs.sync()

    def abandon(self) -> None:
        """Stop for now: keep the partial (and its charge) for a resume, release the rest."""
        if self._done:
            return
        try:
            self._checkpoint()
        except OSError as err:
            _LOGGER.warning("cannot checkpoint the upload of %s: %s", show(self.rel), err)
        finally:
            self._end()

    def discard(self) -> None:
        """Give up: delete the partial and give back all it cost."""
        if self._done:
            return
        self._end()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            return
        self._quota.credit(charge(self.offset))

    def _end(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._quota.release(self._reserved)
        self._reserved = 0
        self._owner._end(os.path.basename(self._path).partition(b".")[0])
