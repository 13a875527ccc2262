"""Verify: compare the host's content hashes with the local files, without downloading.

The host hashes its copy (SHA-256) while a worker thread here walks and hashes the source;
both streams come in canonical order and are merged. Repair teaches the index what the host
really holds, then a push sends what is missing or wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
import contextlib
import os
import time

from .. import tree
from ..errors import HostRefused
from ..identity import Identity
from ..protocol import FailCode
from . import scanner
from .client import PeerLink, connect_any
from .handoff import Handoff
from .index import Index, IndexEntry
from .index_writer import IndexWriter

# The repair is a push: verify runs one (after teaching the index) when asked to.
from .push import push
from .run import (
    BATCH_FILES,
    PeerTarget,
    Phase,
    Progress,
    ProgressCallback,
    Reporter,
    VerifyResult,
    check_folder_name,
    check_source,
)

type _Hashed = tuple[tree.Entry, bytes | None]


class _LocalHasher:
    """Walks the source and hashes its files in a worker thread, for verify."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, source: bytes, exclude: Sequence[str]
    ) -> None:
        self.handoff: Handoff[list[_Hashed]] = Handoff(loop)
        self._source = source
        self._exclude = exclude

    def run(self) -> None:
        self.handoff.feed(self._hash)

    def _hash(self) -> bool:
        skip = scanner.Excludes(self._exclude) if self._exclude else None
        batch: list[_Hashed] = []
        for entry in tree.walk(self._source, skip=skip, on_error=lambda *_: None):
            digest = None
            if entry.kind is tree.Kind.FILE:
                try:
                    digest = tree.hash_file(self._source + b"/" + entry.path)
                except OSError:
                    digest = None
            batch.append((entry, digest))
            if len(batch) >= BATCH_FILES:
                if not self.handoff.put(batch):
                    return False
                batch = []
        return not batch or self.handoff.put(batch)

    async def entries(self) -> AsyncGenerator[_Hashed]:
        while (batch := await self.handoff.get()) is not None:
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
    raw_source = await loop.run_in_executor(None, check_source, source)
    result = VerifyResult(folder)
    report = Reporter(Progress(Phase.VERIFYING), progress)
    prefix = folder_name + b"/"
    writer = IndexWriter(index, folder, target.id) if repair and index is not None else None
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
                report,
                writer,
            )
        finally:
            await link.close()
            if writer is not None:
                await writer.flush()
    finally:
        if writer is not None:
            await loop.run_in_executor(None, writer.close)
    report.state.scan_complete = True
    if repair and index is not None and not result.clean:
        sealed = await loop.run_in_executor(None, index.sealed, folder, target.id)
        pushed = await push(
            identity,
            target,
            folder,
            source,
            index,
            exclude=exclude,
            progress=progress,
            encrypted=bool(sealed),
        )
        result.repaired = pushed.files_sent + pushed.files_deleted
        result.repair_complete = not (pushed.error_count or pushed.files_changed_during_read)
    report.done()
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
    report: Reporter,
    writer: IndexWriter | None,
) -> None:
    """Merge the host's listing with the local walk (both in canonical order)."""
    hasher = _LocalHasher(loop, source, exclude)
    thread = loop.run_in_executor(None, hasher.run)
    remote = _host_entries(link, folder_name, prefix)
    local_items = hasher.entries()
    state = report.state
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
            report()
    finally:
        hasher.handoff.stop()
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
