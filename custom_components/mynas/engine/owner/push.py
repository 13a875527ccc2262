"""Push: keep a folder's replica on a peer current.

A replica is encrypted by default: names and contents sealed here, on the owner's side,
with keys only this node has (``replica.SealedLayout``); or, asked for, a plain mirror at
``<jail>/F/`` (same relative paths, same bytes, same mtimes), readable with standard tools.
A replica stays what it was first pushed as: the index remembers it, and for a pair the
index does not know, the host is asked whether the other kind's folder is there — either
way the other kind is refused before anything is sent (``ReplicaKindMismatch``).

Push follows the data flow of docs/architecture.md: the scanner walks the folder in a
worker thread and diffs it against the SQLite index, the same thread reads (and seals) the
small files it must send (``feed``), and the event loop streams them over one channel
(``sender``); the index records a file only once the host says it is durable
(``index_writer``), so a broken run leaves index and replica consistent, and the next run
completes the work. This module runs the whole: the checks
before a run, the adoption of what the host already holds, the connection, and the result.

Getting the replica back is ``restore``'s job, checking it ``verify``'s; the words they all
share (targets, progress, results) are ``run``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from .. import tree
from ..errors import HostRefused, MyNasError, PeerUnreachable, QuotaExceeded, SourceMissing
from ..identity import Identity
from .feed import Feeder, MassChangeGuard
from .index import Index, IndexEntry
from .index_writer import IndexWriter
from .replica import (
    PlainLayout,
    ReplicaKindMismatch,
    SealedLayout,
    layout as make_layout,
    other_root,
)
from .run import PeerTarget, Phase, ProgressCallback, PushResult, check_folder_name, check_source
from .sender import Sender
from .throttle import Throttle

if TYPE_CHECKING:
    from .client import PeerLink
    from .names import StoredTree


async def open_link(identity: Identity, target: PeerTarget) -> PeerLink:
    """``client.open_link``: the client (and asyncssh) is loaded on the first connection.

    A command-line push with nothing to send connects to no one, and its start-up is a
    good part of its time.
    """
    from .client import open_link as connect  # noqa: PLC0415

    return await connect(identity, target)


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
            self._task = asyncio.create_task(open_link(self._identity, target))

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


def _is_empty(path: bytes) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


async def _adopt(link: PeerLink, writer: IndexWriter, layout: PlainLayout) -> int:
    """Learn what the host already holds when the index knows nothing of this pair.

    That happens after a lost index or on a rebuilt node: unchanged files are then neither
    sent again nor their host copies moved to trash. A plain replica's listing says it all;
    a sealed replica's files carry their mtime inside, so the host sends each file's first
    bytes (``HEADS``) and their meta block is opened here (an older host that cannot: the
    files are recorded with an unknown mtime, and the next scan sends them again). All or
    nothing: a listing cut short leaves the pair unknown, so the next run adopts again.
    """
    prefix = layout.root + b"/"
    reader = layout.tree() if isinstance(layout, SealedLayout) else None
    count = 0
    try:
        if reader is not None and link.serves_heads:
            from .sealed import OVERHEAD  # noqa: PLC0415 - sealed replicas only

            listing = link.heads(layout.root, OVERHEAD)
        else:
            listing = link.list(layout.root)
        async with contextlib.aclosing(listing) as items:
            async for item, head in items:
                if reader is not None:
                    entry = _adopt_sealed(reader, layout, item, head)
                    if entry is not None:
                        writer.record(entry)
                        count += 1
                elif item.path.startswith(prefix):
                    rel = item.path[len(prefix) :]
                    writer.record(
                        IndexEntry(rel, item.kind, item.size, item.mtime_ns, item.mode, None)
                    )
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
    await writer.call(writer.register_pair, layout.sealed)
    return count


# An mtime no file has: the scan sees an entry adopted without its mtime as changed.
_UNKNOWN_MTIME = -1


def _adopt_sealed(
    reader: StoredTree, layout: PlainLayout, item: tree.Entry, head: bytes | None
) -> IndexEntry | None:
    """Return the index entry of one listed entry of a sealed replica (None: none)."""
    try:
        rel = reader.plain(item.path, item.kind is tree.Kind.DIR)
    except MyNasError:
        return None  # not ours or altered: verify reports it, push never touches it
    if not rel:
        return None  # the folder itself, or a long name's continuation
    if item.kind is tree.Kind.DIR:
        return IndexEntry(rel, item.kind, 0, _UNKNOWN_MTIME, tree.DIR_MODE, None)
    if head is not None and isinstance(layout, SealedLayout):
        from .sealed import read_meta  # noqa: PLC0415

        try:
            meta = read_meta(layout.keys.contents, layout.jail_path(rel), head)
        except MyNasError:
            return None  # sent again: the host's copy goes to the trash
        if layout.stored_size(meta.size) == item.size:
            return IndexEntry(rel, item.kind, meta.size, meta.mtime_ns, meta.mode, None)
        return None
    plain = layout.plain_size(item.size)
    size = -1 if plain is None else plain
    return IndexEntry(rel, item.kind, size, _UNKNOWN_MTIME, item.mode, None)


async def push(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    source: str | os.PathLike[str],
    index: Index,
    *,
    exclude: Sequence[str] = (),
    bwlimit: int | None = None,
    node_limit: Throttle | None = None,
    retention_days: int | None = None,
    progress: ProgressCallback | None = None,
    allow_empty: bool = False,
    connect_if_unchanged: bool = True,
    encrypted: bool = True,
    select: Callable[[bytes], bool] | None = None,
    hold_over: int | None = None,
) -> PushResult:
    """Bring the replica of ``folder`` on ``target`` up to date with ``source``.

    The replica is sealed (names and contents encrypted with the node's keys) unless
    ``encrypted`` is False: a plain mirror. ReplicaKindMismatch, before anything is sent,
    if the replica already exists as the other kind. ``select`` limits the run to the
    changes of the paths it accepts (verify's repair).

    Raises SourceMissing (also when ``source`` is empty while the host holds files of it,
    as when a disk is not mounted: emptying the replica takes ``allow_empty``), the
    connection errors of ``client.connect``, QuotaExceeded (with how much is still needed
    and how much is left) or PeerDiskFull — always after recording in the index everything
    the host acknowledged.

    ``hold_over`` (a percentage; None or 0: never) holds a run that would replace or
    delete more than that share of the files the peer holds of the folder: it plans the
    whole run first and raises MassChangeHeld (counts and examples) before sending any of
    it (``feed.MassChangeGuard``; folders of fewer than ``feed.GUARD_MIN_FILES`` files at
    the peer are never held, nor a repair's run).

    ``bwlimit`` (bytes/s) limits this run; ``node_limit``, a throttle that other runs share,
    limits it together with them.

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
            kind = await writer.call(index.sealed, folder, target.id)
            if kind is not None and kind != encrypted:
                raise ReplicaKindMismatch(folder, sealed=kind)
            known = kind is not None
            if connect_if_unchanged or not known or retention_days:
                connection.start()
            layout = await loop.run_in_executor(
                None, lambda: make_layout(identity, folder, sealed=encrypted)
            )
            if not known:
                link = await connection.open()
                other = await loop.run_in_executor(
                    None, lambda: other_root(identity, folder, sealed=encrypted)
                )
                if await link.exists(other):
                    raise ReplicaKindMismatch(folder, sealed=not encrypted)
                await _adopt(link, writer, layout)
            if not allow_empty:
                await _refuse_empty(loop, writer, index, folder, target, raw_source)
            if retention_days:
                await (await connection.open()).set_retention(layout.retention_name, retention_days)
            result = await _run_push(
                connection,
                writer,
                layout,
                raw_source,
                target,
                index,
                exclude,
                Throttle(bwlimit, node_limit),
                progress,
                select,
                MassChangeGuard(hold_over) if hold_over and select is None else None,
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


async def convert(
    identity: Identity,
    target: PeerTarget,
    /,
    folder: str,
    source: str | os.PathLike[str],
    index: Index,
    **options: Any,
) -> PushResult:
    """Turn a plain replica into an encrypted one: send it encrypted, then trash the plain one.

    The encrypted copy is sent whole first (a run cut short is taken up by the next push
    or conversion: the pair is encrypted from now on); only once it is complete is the
    plain copy moved to the host's trash, as any replaced data (``replaced_plain``). Until
    the trash is purged the host holds both, and its quota counts both. ``options`` are
    ``push``'s.
    """
    loop = asyncio.get_running_loop()
    if await loop.run_in_executor(None, index.sealed, folder, target.id) is not True:
        await loop.run_in_executor(None, index.clear, folder, target.id)
        await loop.run_in_executor(None, lambda: index.register(folder, target.id, sealed=True))
    result = await push(identity, target, folder, source, index, encrypted=True, **options)
    if result.error_count or result.files_changed_during_read:
        return result  # the plain copy stays until the encrypted one is whole
    started = time.monotonic()
    plain = check_folder_name(folder)
    link = await open_link(identity, target)
    try:
        outcome: list[MyNasError | None] = []
        await link.delete(plain, outcome.append)
        await link.sync()
    finally:
        await link.close()
    (error,) = outcome
    if error is not None and not (isinstance(error, HostRefused) and error.nothing_there):
        raise error
    result.replaced_plain = True
    result.seconds += time.monotonic() - started
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
    layout: PlainLayout,
    source: bytes,
    target: PeerTarget,
    index: Index,
    exclude: Sequence[str],
    throttle: Throttle,
    progress: ProgressCallback | None,
    select: Callable[[bytes], bool] | None,
    guard: MassChangeGuard | None,
) -> PushResult:
    loop = asyncio.get_running_loop()
    folder = layout.name
    sender = Sender(writer, folder, source, throttle, progress, layout)
    feeder = Feeder(loop, source, index, folder, target.id, exclude, layout, select, guard)
    sender.on_stop = feeder.count_only.set
    thread = loop.run_in_executor(None, feeder.run)
    try:
        while (item := await feeder.handoff.get()) is not None:
            batch, last = item
            sender.plan(batch, last)
            if batch and not sender.attached:
                sender.attach(await connection.open())  # the first change
            for work in batch:
                await sender.handle(work)
                await sender.take_turns()
            if isinstance(sender.stop_error, PeerUnreachable):
                break  # nothing more can be sent; counting what is left is only for quota
        sender.state.scan_complete = True
        if connection.link is not None:  # else nothing changed: nothing to finish
            sender.attach(connection.link)  # perhaps opened before any change
            sender.state.phase = Phase.TRANSFERRING
            await connection.link.sync()
            if sender.stop_error is None:
                await sender.finish_dirs()
    except MyNasError as err:
        if sender.stop_error is None:
            sender.stop_error = err
    finally:
        feeder.stop()
        await asyncio.gather(thread, return_exceptions=True)
        await loop.run_in_executor(None, sender.close)
    await writer.flush()
    result = sender.result
    report = feeder.report
    result.files_total = report.files
    result.bytes_total = report.bytes
    for path, message in report.errors:
        result.add_error(f"{os.fsdecode(path)}: {message}")
    stopped = sender.stop_error
    if stopped is not None:
        if isinstance(stopped, QuotaExceeded):
            available = sender.quota_available
            raise QuotaExceeded(
                max(stopped.needed, sender.still_needed),
                stopped.available if available is None else available,
            )
        raise stopped
    sender.report.done()
    return result
