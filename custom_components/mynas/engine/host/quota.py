"""What a peer's space costs and how much of it is left (docs/architecture.md, invariant 3).

Usage counts what the disk really holds for a peer: its jail, its trash and its partial
uploads, each file by ``charge(size)`` (4 KiB blocks, at least one) and each directory by
``DIR_CHARGE``. Space is reserved before any byte or directory reaches the disk, so
``used + reserved`` always covers what is on disk, and a rescan (``Jail.rescan``) recomputes
``used`` from disk with the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
import threading

from ..errors import QuotaExceeded

BLOCK = 4096
DIR_CHARGE = BLOCK


def charge(size: int) -> int:
    """Return the bytes a file of ``size`` bytes costs: whole 4 KiB blocks, at least one."""
    if size < 0:
        raise ValueError(f"negative size: {size}")
    return max(1, -(-size // BLOCK)) * BLOCK


@dataclass(frozen=True, slots=True)
class JailUsage:
    """A peer's usage in bytes: on disk (jail, trash, partials), reserved, and its quota."""

    used: int
    reserved: int
    quota: int


class Quota:
    """Bytes a peer may use on this host: ``used`` on disk plus ``reserved`` for writes in flight.

    Thread-safe. Space is reserved before anything reaches the disk, then committed (it is on
    disk) or released (it never got there).
    """

    def __init__(self, limit: int, used: int = 0) -> None:
        if limit < 0 or used < 0:
            raise ValueError(f"negative quota figures: limit {limit}, used {used}")
        self._lock = threading.Lock()
        self._limit = limit
        self._used = used
        self._reserved = 0

    @property
    def limit(self) -> int:
        """Return the most bytes the peer may use."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"negative quota: {value}")
        with self._lock:
            self._limit = value

    @property
    def used(self) -> int:
        """Return the bytes on disk."""
        return self._used

    @property
    def reserved(self) -> int:
        """Return the bytes reserved for writes in flight."""
        return self._reserved

    @property
    def available(self) -> int:
        """Return the bytes that can still be reserved (never negative)."""
        with self._lock:
            return self._available()

    def _available(self) -> int:
        return max(0, self._limit - self._used - self._reserved)

    def reserve(self, amount: int) -> None:
        """Reserve ``amount`` bytes, or raise QuotaExceeded if they do not fit."""
        _check_amount(amount)
        with self._lock:
            available = self._available()
            if amount > available:
                raise QuotaExceeded(needed=amount, available=available)
            self._reserved += amount

    def commit(self, amount: int) -> None:
        """Turn ``amount`` reserved bytes into used bytes: they are on disk now."""
        with self._lock:
            self._unreserve(amount)
            self._used += amount

    def release(self, amount: int) -> None:
        """Drop a reservation of ``amount`` bytes that never reached the disk."""
        with self._lock:
            self._unreserve(amount)

    def credit(self, amount: int) -> None:
        """Lower ``used`` by ``amount`` bytes that left the disk (e.g. a purge)."""
        _check_amount(amount)
        with self._lock:
            # Clamped: a stale persisted figure may be lower than what is freed.
            self._used = max(0, self._used - amount)

    def set_used(self, amount: int) -> None:
        """Set ``used`` to a figure measured on disk."""
        _check_amount(amount)
        with self._lock:
            self._used = amount

    def _unreserve(self, amount: int) -> None:
        _check_amount(amount)
        if amount > self._reserved:
            raise ValueError(f"{amount} bytes are not reserved (only {self._reserved})")
        self._reserved -= amount


def _check_amount(amount: int) -> None:
    if amount < 0:
        raise ValueError(f"negative amount of bytes: {amount}")
