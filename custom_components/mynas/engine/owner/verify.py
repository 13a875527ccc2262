"""Verify: compare the host's copy with what was sent, and the folder with what it was.

Nothing is downloaded. The host hashes what it stores (SHA-256, ``LIST`` with hashes) while
a worker thread here walks and hashes the folder; both land in temporary SQLite tables (on
disk: memory does not grow with the tree), then one merge in canonical key order reads
them beside the index, which recorded at upload what each file was (size, mtime, mode,
content hash) and what the host was given (the stored bytes' hash: for an encrypted
replica the hash of the sealed file). Three findings, never mixed up (issue 15):

- **host damage** (``host_damaged``): the host's bytes are not what was sent (altered,
  truncated, an old version put back, missing), or it holds something we never sent, or
  a name that does not open (encrypted replicas);
- **not sent yet** (``unsent``): a local file new, changed or deleted since the last push —
  the next push's ordinary work;
- **local rot** (``local_rot``): a local file whose content changed while its size and
  mtime did not: the disk here, not the friend's, is failing (or a program rewrote it
  behind its mtime). Never sent to the friend by a repair.

``repair`` re-sends only the first kind: the index forgets what the host lost or damaged,
learns what the host holds that we never sent, and a push limited to exactly those paths
sends them again and moves the extras to the host's trash. A file damaged on the host whose
local copy rotted too has no good copy left: it is reported and left alone.

Entries recorded without a hash (adopted from a listing after a lost index) are compared
with the local file instead, for a plain replica; a sealed replica's adopted entries are sent
again by the next push anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import dataclass, field
import os
import sqlite3
import threading
import time
from typing import Any

from .. import tree
from ..errors import HostRefused, MyNasError
from ..identity import Identity
from ..protocol import FailCode
from . import scanner
from .client import PeerLink, open_link
from .index import Index, IndexEntry
from .index_writer import IndexWriter

# The repair is a push: verify runs one (after teaching the index) when asked to.
from .push import push
from .replica import PlainLayout, SealedLayout, layout as make_layout
from .run import (
    PROGRESS_INTERVAL,
    PeerTarget,
    Phase,
    Progress,
    ProgressCallback,
    Reporter,
    VerifyResult,
    check_folder_name,
    check_source,
)
from .throttle import Throttle

_BATCH = 512  # rows per insert into a temporary table
_FETCH = 1024


class _Table:
    """Rows in canonical key order on disk: a private temporary SQLite database.

    Used by one thread at a time (verify's own worker thread).
    """

    def __init__(self, columns: str) -> None:
        self._conn = sqlite3.connect("", check_same_thread=False)
        # ``columns`` is one of this module's constants, never data.
        self._conn.execute(f"CREATE TABLE t(key BLOB PRIMARY KEY, {columns}) WITHOUT ROWID")
        marks = ", ".join("?" * (columns.count(",") + 2))
        self._insert = f"INSERT OR REPLACE INTO t VALUES ({marks})"  # noqa: S608

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        with self._conn:
            self._conn.executemany(self._insert, rows)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        cursor = self._conn.execute("SELECT * FROM t ORDER BY key")
        while batch := cursor.fetchmany(_FETCH):
            yield from batch

    def close(self) -> None:
        self._conn.close()


@dataclass
class _Findings:
    """What the merge found and what a repair would do."""

    forget: list[tuple[bytes, tree.Kind]] = field(default_factory=list)
    learn: list[IndexEntry] = field(default_factory=list)
    select: set[bytes] = field(default_factory=set)
    unreadable: list[bytes] = field(default_factory=list)  # stored paths of names that fail


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
    node_limit: Throttle | None = None,
) -> VerifyResult:
    """Compare the host's copy with the index, and the folder with the index.

    Reports host damage, local changes not sent yet and local rot as three counts (with
    examples); ``repair`` re-sends only what the host damaged or lost (within
    ``node_limit``, the node's upload limit). The replica's kind
    (plain or encrypted) is the index's, or found on the host for a pair it does not know.
    """
    if index is None:
        raise ValueError("verify compares with the index of what was sent: it needs the index")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    check_folder_name(folder)
    raw_source = await loop.run_in_executor(None, check_source, source)
    result = VerifyResult(folder)
    report = Reporter(Progress(Phase.VERIFYING), progress)
    worker = ThreadPoolExecutor(1, thread_name_prefix="mynas-verify")
    hasher = ThreadPoolExecutor(1, thread_name_prefix="mynas-verify-hash")
    host = _Table("size INTEGER, hash BLOB, stored BLOB")
    local = _Table("size INTEGER, mtime_ns INTEGER, mode INTEGER, hash BLOB")
    findings = _Findings()
    try:
        link = await open_link(identity, target)
        try:
            sealed = await loop.run_in_executor(worker, index.sealed, folder, target.id)
            if sealed is None:
                probe = await loop.run_in_executor(
                    None, lambda: make_layout(identity, folder, sealed=True)
                )
                sealed = await link.exists(probe.root)
            layout = await loop.run_in_executor(
                None, lambda: make_layout(identity, folder, sealed=bool(sealed))
            )
            state = report.state
            stop = threading.Event()
            hashing = loop.run_in_executor(
                hasher, _hash_local, raw_source, exclude, local, state, stop
            )
            try:
                await _list_host(link, layout, host, worker, result, findings)
            except BaseException:
                stop.set()  # the local hashing is of no use now
                raise
            finally:
                await _wait(hashing, report)
            await _wait(
                loop.run_in_executor(
                    worker,
                    _merge,
                    index,
                    folder,
                    target.id,
                    raw_source,
                    layout,
                    local,
                    host,
                    result,
                    findings,
                ),
                report,
            )
            if repair and findings.unreadable:
                result.repaired += await _delete_unreadable(link, findings.unreadable)
        finally:
            await link.close()
    finally:
        await loop.run_in_executor(worker, host.close)
        await loop.run_in_executor(hasher, local.close)
        worker.shutdown(wait=False)
        hasher.shutdown(wait=False)
    report.state.scan_complete = True
    if repair:
        await _repair(
            identity,
            target,
            folder,
            source,
            index,
            exclude,
            progress,
            layout,
            result,
            findings,
            node_limit,
        )
    report.done()
    result.seconds = time.monotonic() - started
    return result


async def _wait(work: asyncio.Future[Any], report: Reporter) -> Any:
    """Await ``work`` (a worker thread's), reporting progress meanwhile."""
    while True:
        done, _ = await asyncio.wait([work], timeout=PROGRESS_INTERVAL)
        report()
        if done:
            return work.result()


async def _list_host(
    link: PeerLink,
    layout: PlainLayout,
    table: _Table,
    worker: ThreadPoolExecutor,
    result: VerifyResult,
    findings: _Findings,
) -> None:
    """Put the host's entries (plain keys, plain sizes, stored hashes) into ``table``."""
    loop = asyncio.get_running_loop()
    names = layout.tree() if isinstance(layout, SealedLayout) else None
    prefix = layout.root + b"/"
    batch: list[tuple[Any, ...]] = []
    try:
        async with contextlib.aclosing(link.list(layout.root, with_hash=True)) as listing:
            async for item, digest in listing:
                is_dir = item.kind is tree.Kind.DIR
                if names is None:
                    rel: bytes | None = item.path[len(prefix) :]
                else:
                    try:
                        rel = names.plain(item.path, is_dir)
                    except MyNasError:
                        result.host_damaged += 1
                        result.note(
                            "host damage",
                            b"(sealed) " + item.path[-40:],
                            "a name that does not open",
                        )
                        findings.unreadable.append(item.path)
                        continue
                if not rel:
                    continue  # the folder itself, or a long name's continuation
                size = 0 if is_dir else layout.plain_size(item.size)
                key = tree.sort_key(rel, item.kind)
                batch.append((key, -1 if size is None else size, digest, item.path))
                if len(batch) >= _BATCH:
                    rows, batch = batch, []
                    await loop.run_in_executor(worker, table.add, rows)
    except HostRefused as err:
        if err.code != FailCode.MISSING:
            raise
    if batch:
        await loop.run_in_executor(worker, table.add, batch)


def _hash_local(
    source: bytes, exclude: Sequence[str], table: _Table, state: Progress, stop: threading.Event
) -> None:
    """Walk and hash the folder into ``table`` (a worker thread), until done or ``stop``."""
    skip = scanner.Excludes(exclude) if exclude else None
    batch: list[tuple[Any, ...]] = []
    for key, size, mtime_ns, mode in tree.walk_rows(source, skip=skip, on_error=lambda *_: None):
        if stop.is_set():
            return
        digest = None
        if key[-1] != 0x2F:  # a file
            try:
                digest = tree.hash_file(source + b"/" + key)
            except OSError:
                digest = None
            state.files_done += 1
            state.bytes_done += size
        batch.append((key, size, mtime_ns, mode, digest))
        if len(batch) >= _BATCH:
            table.add(batch)
            batch = []
    if batch:
        table.add(batch)


def _merge(
    index: Index,
    folder: str,
    peer: str,
    source: bytes,
    layout: PlainLayout,
    local: _Table,
    host: _Table,
    result: VerifyResult,
    findings: _Findings,
) -> None:
    """Read the index, the folder and the host side by side; note every finding."""
    recorded = index.stored_rows(folder, peer)
    try:
        for key, mine, sent, there in _side_by_side(local.rows(), recorded, host.rows()):
            is_dir = key[-1] == 0x2F
            path = key[:-1] if is_dir else key
            kind = tree.Kind.DIR if is_dir else tree.Kind.FILE
            rotted = False
            if not is_dir:
                rotted = _compare_local(path, mine, sent, result)
            if sent is not None and there is None:
                _damaged(path, kind, "missing on the host", mine, rotted, result, findings)
            elif sent is None and there is not None and mine is None:
                result.host_damaged += 1
                result.note("host damage", path, "never sent from here")
                findings.learn.append(IndexEntry(path, kind, max(there[1], 0), 0, 0o644, None))
                findings.select.add(path)
            elif sent is not None and there is not None and not is_dir:
                expected = sent[5] or sent[4]
                result.checked += 1
                if expected is None:  # adopted: no hash was recorded
                    if layout.sealed or mine is None or mine[4] is None:
                        continue
                    expected = mine[4]
                if there[2] != expected:
                    _damaged(path, kind, "not what was sent", mine, rotted, result, findings)
    finally:
        recorded.close()


def _compare_local(
    path: bytes,
    mine: tuple[Any, ...] | None,
    sent: tuple[Any, ...] | None,
    result: VerifyResult,
) -> bool:
    """Note a local file changed since it was sent, or rotted; return whether it rotted."""
    if mine is None and sent is None:
        return False
    if mine is None or sent is None or tuple(mine[1:4]) != tuple(sent[1:4]):
        result.unsent += 1
        result.note("not sent yet", path, "deleted here" if mine is None else "changed here")
        return False
    if sent[4] is not None and mine[4] != sent[4]:
        result.local_rot += 1
        why = "cannot be read" if mine[4] is None else "content changed, size and mtime did not"
        result.note("local rot", path, why)
        return True
    return False


def _damaged(
    path: bytes,
    kind: tree.Kind,
    why: str,
    mine: tuple[Any, ...] | None,
    rotted: bool,
    result: VerifyResult,
    findings: _Findings,
) -> None:
    result.host_damaged += 1
    if rotted:
        result.note("host damage", path, f"{why}; no good copy here either (local rot)")
        return
    result.note("host damage", path, why)
    if mine is not None:  # a repair sends the local file again
        findings.forget.append((path, kind))
        findings.select.add(path)


def _side_by_side(
    local: Iterator[tuple[Any, ...]],
    recorded: Iterator[tuple[Any, ...]],
    host: Iterator[tuple[Any, ...]],
) -> Iterator[tuple[bytes, Any, Any, Any]]:
    """Merge three streams in key order: (key, local row, index row, host row)."""
    streams = (local, recorded, host)
    heads: list[Any] = [next(stream, None) for stream in streams]
    while any(head is not None for head in heads):
        key = min(head[0] for head in heads if head is not None)
        matched = [head if head is not None and head[0] == key else None for head in heads]
        yield key, matched[0], matched[1], matched[2]
        for position, head in enumerate(matched):
            if head is not None:
                heads[position] = next(streams[position], None)


async def _delete_unreadable(link: PeerLink, paths: list[bytes]) -> int:
    """Move stored entries whose names do not open to the host's trash; return how many."""
    done = 0
    tops: list[bytes] = []
    for path in sorted(paths):
        if tops and path.startswith(tops[-1] + b"/"):
            continue  # goes with its directory
        tops.append(path)
    outcomes: list[MyNasError | None] = []
    for path in tops:
        await link.delete(path, outcomes.append)
    await link.sync()
    done = sum(1 for outcome in outcomes if outcome is None)
    return done


async def _repair(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    source: str | os.PathLike[str],
    index: Index,
    exclude: Sequence[str],
    progress: ProgressCallback | None,
    layout: PlainLayout,
    result: VerifyResult,
    findings: _Findings,
    node_limit: Throttle | None,
) -> None:
    """Teach the index what the host lost or holds in excess, then push exactly that."""
    loop = asyncio.get_running_loop()
    if findings.select:
        writer = IndexWriter(index, folder, target.id)
        try:
            if await writer.call(index.sealed, folder, target.id) is None:
                await writer.call(writer.register_pair, layout.sealed)
            for path, kind in findings.forget:
                writer.forget(path, kind)
            for entry in findings.learn:
                writer.record(entry)
            await writer.flush()
        finally:
            await loop.run_in_executor(None, writer.close)
        chosen = findings.select
        select: Callable[[bytes], bool] = chosen.__contains__
        pushed = await push(
            identity,
            target,
            folder,
            source,
            index,
            exclude=exclude,
            progress=progress,
            encrypted=layout.sealed,
            select=select,
            node_limit=node_limit,
        )
        result.repaired += pushed.files_sent + pushed.files_deleted
        result.repair_complete = not (pushed.error_count or pushed.files_changed_during_read)
    else:
        result.repair_complete = True
