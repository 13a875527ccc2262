"""Where the host's peers say they can be reached, and the checks it dials back for them.

ANNOUNCE (see ``protocol``) arrives on a replication session, that is, over a connection
authenticated by the peer's pinned key: what it says is recorded for that peer alone, and
only as addresses (at most ``protocol.MAX_ANNOUNCED``, each one syntactically an address);
a key is never taken from it. CHECK asks the host to dial back the peer's own announced
addresses and say what answered (``reachability.dial_check``): at most
``protocol.MAX_CHECKED`` of them, with a short timeout, one check at a time for the whole
host and one per peer every ``Limits.check_every`` seconds — this cannot be made into a
scanner of other people's machines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
import time
from typing import Any

from .. import protocol
from ..identity import Identity
from ..invite import format_address, parse_address
from ..reachability import AddressCheck, Outcome, dial_check
from .limits import Limits


class CheckRefused(Exception):
    """A CHECK the host will not run now: ``retry_after`` seconds from now it will."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"one reachability check at a time: retry in {retry_after:.0f} s")


@dataclass(frozen=True, slots=True)
class Announced:
    """The addresses a peer last announced: since when it says so, when it last said it."""

    addresses: tuple[str, ...]
    since: float
    at: float


def canonical_addresses(addresses: list[str]) -> tuple[str, ...]:
    """Return the addresses in canonical ``host:port`` form; ValueError names a bad one."""
    found: list[str] = []
    for address in addresses:
        host, port = parse_address(address)  # ValueError says what is wrong with it
        text = format_address(host, port)
        if text not in found:
            found.append(text)
    return tuple(found)


type Emit = Callable[..., None]


class PeerReach:
    """The server's record of announced addresses, and its rate-limited check dialer."""

    def __init__(self, identity: Identity, limits: Limits, emit: Emit) -> None:
        self._identity = identity
        self._limits = limits
        self._emit = emit
        self.announced: dict[str, Announced] = {}
        self._last_check: dict[str, float] = {}
        self._one_at_a_time = asyncio.Lock()

    def announce(self, peer: str, addresses: list[str]) -> Announced:
        """Record where ``peer`` says it can be reached; ValueError for a bad address."""
        canonical = canonical_addresses(addresses)
        now = time.time()
        before = self.announced.get(peer)
        changed = before is None or before.addresses != canonical
        since = now if changed or before is None else before.since
        record = Announced(canonical, since, now)
        self.announced[peer] = record
        if changed:
            self._emit("addresses_announced", peer=peer, addresses=list(canonical), since=since)
        return record

    def forget(self, peer: str) -> None:
        """Drop what a removed peer announced."""
        self.announced.pop(peer, None)
        self._last_check.pop(peer, None)

    async def check(
        self, peer: str, public_key: str, requested: list[str], seen_from: str
    ) -> dict[str, Any]:
        """Dial back ``peer``'s announced addresses (``requested`` of them, or all).

        Raises CheckRefused when the peer asked too recently. An address the peer did not
        announce is answered SKIPPED, never dialed.
        """
        now = time.monotonic()
        last = self._last_check.get(peer)
        if last is not None and now - last < self._limits.check_every:
            raise CheckRefused(self._limits.check_every - (now - last))
        self._last_check[peer] = now
        record = self.announced.get(peer)
        announced = record.addresses if record is not None else ()
        try:
            wanted = canonical_addresses(requested) if requested else announced
        except ValueError as err:
            raise ValueError(f"cannot check {err}") from None
        to_dial: list[str] = []
        results: dict[str, AddressCheck] = {}
        for address in wanted:
            if address not in announced:
                results[address] = AddressCheck(address, Outcome.SKIPPED, "not announced")
            elif len(to_dial) >= protocol.MAX_CHECKED:
                results[address] = AddressCheck(address, Outcome.SKIPPED, "over the limit")
            else:
                to_dial.append(address)
        async with self._one_at_a_time:
            dialed = await asyncio.gather(
                *(
                    dial_check(
                        address,
                        public_key,
                        identity=self._identity,
                        seconds=self._limits.check_timeout,
                    )
                    for address in to_dial
                )
            )
        results.update((check.address, check) for check in dialed)
        return {
            "results": [results[address].as_dict() for address in wanted],
            "seen_from": seen_from,
        }


@dataclass(frozen=True, slots=True)
class SessionReach:
    """ANNOUNCE and CHECK as one session serves them: its peer, its key, where it came from."""

    reach: PeerReach
    peer: str
    public_key: str
    address: str

    def announce(self, addresses: list[str]) -> None:
        """Record the peer's addresses (ValueError for a bad one)."""
        self.reach.announce(self.peer, addresses)

    async def check(self, addresses: list[str]) -> dict[str, Any]:
        """Dial back the peer's announced addresses (CheckRefused when asked too often)."""
        return await self.reach.check(self.peer, self.public_key, addresses, self.address)
