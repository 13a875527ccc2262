"""The index's writer during a run: acknowledged changes applied in order, off the loop.

The host acknowledges files one by one; a run records each in the index only then (so the
index never claims more than the peer holds), in batches, from one dedicated thread: the
event loop never waits on SQLite, and the order of records and forgets is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import itertools
import time
from typing import Any

from .. import tree
from .index import Index, IndexEntry

# Pending changes flushed at once (or once the oldest waits for over a second).
_INDEX_BATCH = 1000


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

    def register_pair(self, sealed: bool = False) -> None:
        """Make (folder, peer) known to the index, even while the peer holds nothing."""
        self._index.register(self._folder, self._peer, sealed=sealed)

    async def discard_pair(self) -> None:
        """Forget everything about (folder, peer), pending changes included."""
        self._ops, self._count = [], 0
        await asyncio.shield(self.call(self._index.clear, self._folder, self._peer))

    def close(self) -> None:
        """Stop the writer's thread once its work is done (blocking)."""
        self._executor.shutdown(wait=True)
