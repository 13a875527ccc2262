"""Verify: compare the host's content hashes with the local files, without downloading.

The host hashes its copy (SHA-256) while a worker thread here walks and hashes the source;
both streams come in canonical order and are merged. Repair teaches the index what the host
really holds, then a push sends what is missing or wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
import contextlib
from dataclasses import dataclass, field
import os
import threading
import time
from typing import Any

from .. import tree
from ..errors import HostRefused
from ..identity import Identity
from ..protocol import FailCode
from . import scanner
from .client import PeerLink, connect_any
from .index import Index, IndexEntry
from .push import (
    MAX_REPORTED,
    PROGRESS_INTERVAL,
    IndexWriter,
    PeerTarget,
    Phase,
    Progress,
    ProgressCallback,
    check_folder_name,
    check_source,
    push,
    summary,
)

# Hashed entries handed to the event loop at a time, and batches queued at most.
_HAND_OFF = 256
_QUEUE_BATCHES = 4


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
        return {**summary(self), "clean": self.clean}


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
                if len(batch) >= _HAND_OFF and not self._hand(batch):
                    return
                if len(batch) >= _HAND_OFF:
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
    raw_source = await loop.run_in_executor(None, check_source, source)
    result = VerifyResult(folder)
    state = Progress(Phase.VERIFYING)
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
    writer: IndexWriter | None,
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
            if progress is not None and now - last >= PROGRESS_INTERVAL:
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
