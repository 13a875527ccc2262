"""Byte budgets: how much of a peer's data the server may hold in memory at once.

A replication session takes bytes from its budget before it takes a frame off its channel,
and gives them back once the frame's data is on disk (or dropped). When the budget is spent
the session simply waits: it stops reading the channel, SSH flow control then holds the
sender back, and nothing fails (back-pressure, not errors).

Budgets nest: a session's budget has its peer's as parent, so all sessions of one peer (over
all its connections) share one ceiling too. Bytes are taken from every level at once or not
at all: a session never sits on its own share while it waits for its peer's. At a level
that holds nothing, any amount fits: one item larger than a budget waits for the others to
finish, never forever.

Whoever waits must first make sure that everything it holds is on its way to the disk (the
server submits its pending batch before waiting); then every held byte is eventually given
back and no set of waiters can block each other for good.

Not thread-safe: use it from one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

# What one frame held in memory costs beyond its body (the bytes object, a memoryview, a
# batch entry): charged with the body, so that a flood of tiny frames is bounded too.
FRAME_COST = 512


def frame_cost(body: bytes) -> int:
    """Return the budget bytes a frame with ``body`` holds while it is kept."""
    return len(body) + FRAME_COST


class ByteBudget:
    """A ceiling on bytes held; ``take`` waits until the bytes fit, ``give`` returns them."""

    def __init__(self, limit: int, parent: ByteBudget | None = None) -> None:
        """Allow ``limit`` bytes here, and whatever ``parent`` (if any) allows above."""
        if limit <= 0:
            raise ValueError(f"a byte budget must be positive, not {limit}")
        self.limit = limit
        self.parent = parent
        self._used = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def used(self) -> int:
        """Bytes held at this level (by this holder, or by every child of it)."""
        return self._used

    def _chain(self) -> Iterator[ByteBudget]:
        level: ByteBudget | None = self
        while level is not None:
            yield level
            level = level.parent

    def _blocking(self, amount: int) -> ByteBudget | None:
        """Return the first level where ``amount`` does not fit now, or None."""
        for level in self._chain():
            if level._used and level._used + amount > level.limit:
                return level
        return None

    def try_take(self, amount: int) -> bool:
        """Take ``amount`` bytes if they fit at every level now; return whether they did."""
        if amount < 0:
            raise ValueError(f"negative amount of bytes: {amount}")
        if self._blocking(amount) is not None:
            return False
        for level in self._chain():
            level._used += amount
        return True

    async def take(self, amount: int) -> None:
        """Take ``amount`` bytes, waiting until they fit at every level."""
        while not self.try_take(amount):
            level = self._blocking(amount)
            assert level is not None
            waiter = asyncio.get_running_loop().create_future()
            level._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in level._waiters:
                    level._waiters.remove(waiter)

    def give(self, amount: int) -> None:
        """Give back ``amount`` bytes taken earlier (at every level); wake whoever waits."""
        if amount < 0:
            raise ValueError(f"negative amount of bytes: {amount}")
        if amount > self._used:
            raise ValueError(f"{amount} bytes were not taken (only {self._used})")
        for level in self._chain():
            level._used -= amount
            # Everyone re-checks: the bytes freed here may be what a waiter's level lacked.
            waiters, level._waiters = level._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def close(self) -> None:
        """Give back everything still held here (a holder that is done, whatever happened)."""
        if self._used:
            self.give(self._used)
