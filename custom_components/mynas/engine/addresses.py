"""Where friends can be reached, and where we can: typed, learned, hinted, in use.

A peer's addresses come from three places, tried in this order when we dial it:

1. **typed**: what the user gave (its invite code, or an address edited in by hand) — kept
   as they are, never replaced by what is learned;
2. **learned**: what the peer itself announced (``protocol`` ANNOUNCE, over a connection
   authenticated by its pinned key), marked as learned, with since when;
3. **hint**: the address it last connected to us from (its public address as we see it,
   with the port of its other addresses), tried last.

``AddressBook`` keeps 2 and 3 (and which address worked last, with since when) per peer id,
in ``<storage root>/.mynas/addresses.json``, written whole to a temporary file and renamed.
Its methods are cheap and run on the engine loop; only ``write`` does I/O (a worker thread,
with the text ``dump`` made on the loop).

Our own addresses (what we announce) are ``own_addresses``: the typed ones, the address
UPnP mapped on the router, and the host's global IPv6 addresses (``host_addresses``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
import ipaddress
import json
import logging
import os
from pathlib import Path
import time
from typing import Any, Literal

from .invite import format_address, parse_address

_LOGGER = logging.getLogger(__name__)

ADDRESSES_FILE = "addresses.json"
DEFAULT_PORT = 8022
# A thread's own view of its network namespace (a test may give the engine thread its own).
IF_INET6 = "/proc/thread-self/net/if_inet6"
# if_inet6 flags that make an address unfit to announce: temporary (privacy), deprecated,
# tentative (duplicate address detection not done), DAD failed.
_UNFIT = 0x01 | 0x20 | 0x40 | 0x08


@dataclass(frozen=True, slots=True)
class Seen:
    """An address and since when it has been the one (learned, hinted, in use)."""

    address: str
    since: float

    def as_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"address": self.address, "since": self.since}


@dataclass(slots=True)
class PeerAddresses:
    """What we learned of one peer's addresses."""

    learned: tuple[Seen, ...] = ()
    hint: Seen | None = None  # a host (no port): where it last connected from
    in_use: Seen | None = None  # where we last reached it


class AddressBook:
    """Learned addresses, hints and the address in use, per peer id (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Read the book at ``path`` (blocking: a worker thread); a bad file reads as empty."""
        self.path = Path(path)
        self._peers: dict[str, PeerAddresses] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            for peer_id, item in data.get("peers", {}).items():
                self._peers[str(peer_id)] = PeerAddresses(
                    tuple(_seen(seen) for seen in item.get("learned", [])),
                    _seen(item["hint"]) if item.get("hint") else None,
                    _seen(item["in_use"]) if item.get("in_use") else None,
                )
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            _LOGGER.warning("Ignoring the unreadable address book %s: %s", self.path, err)
            self._peers = {}

    def peer(self, peer_id: str) -> PeerAddresses:
        """What is known of one peer (an empty record for a peer never heard of)."""
        return self._peers.get(peer_id) or PeerAddresses()

    def learn(self, peer_id: str, addresses: Sequence[str], since: float | None = None) -> bool:
        """Record what a peer announced (in its order); return whether anything changed.

        An address announced before keeps its first "since".
        """
        record = self._peers.setdefault(peer_id, PeerAddresses())
        before = {seen.address: seen for seen in record.learned}
        now = since if since is not None else time.time()
        learned = tuple(before.get(address) or Seen(address, now) for address in addresses)
        if learned == record.learned:
            return False
        record.learned = learned
        self.dirty = True
        return True

    def hint(self, peer_id: str, host: str) -> bool:
        """Record the address a peer connected from; return whether it is a new one."""
        try:
            host = str(ipaddress.ip_address(host.split("%", maxsplit=1)[0]))
        except ValueError:
            return False  # "?" or a name: nothing to dial
        return self._note(peer_id, "hint", host)

    def used(self, peer_id: str, address: str) -> bool:
        """Record the address a peer was just reached at; return whether it changed."""
        return self._note(peer_id, "in_use", address)

    def _note(self, peer_id: str, which: Literal["hint", "in_use"], address: str) -> bool:
        """Set a peer's ``which`` to ``address``, seen now; return whether it changed."""
        record = self._peers.setdefault(peer_id, PeerAddresses())
        before: Seen | None = getattr(record, which)
        if before is not None and before.address == address:
            return False
        setattr(record, which, Seen(address, time.time()))
        self.dirty = True
        return True

    def dial_order(self, peer_id: str, typed: Sequence[str]) -> tuple[str, ...]:
        """Where to try the peer, in order: typed, then learned, then the hint."""
        record = self.peer(peer_id)
        order = list(dict.fromkeys(typed))
        for seen in record.learned:
            if seen.address not in order:
                order.append(seen.address)
        if record.hint is not None:
            port = _port_of(order)
            hinted = format_address(record.hint.address, port)
            if hinted not in order:
                order.append(hinted)
        return tuple(order)

    def view(self, peer_id: str, typed: Sequence[str]) -> dict[str, Any]:
        """Everything about one peer's addresses, as plain data (the device page shows it)."""
        record = self.peer(peer_id)
        return {
            "typed": list(typed),
            "learned": [seen.as_dict() for seen in record.learned],
            "hint": record.hint.as_dict() if record.hint is not None else None,
            "in_use": record.in_use.as_dict() if record.in_use is not None else None,
        }

    def keep_only(self, peer_ids: Iterable[str]) -> None:
        """Forget the peers that are gone."""
        keep = set(peer_ids)
        for peer_id in list(self._peers):
            if peer_id not in keep:
                del self._peers[peer_id]
                self.dirty = True

    def dump(self) -> str | None:
        """The book as the text ``write`` stores, or None when nothing changed since."""
        if not self.dirty:
            return None
        self.dirty = False
        data = {
            "version": 1,
            "peers": {
                peer_id: {
                    "learned": [seen.as_dict() for seen in record.learned],
                    "hint": record.hint.as_dict() if record.hint is not None else None,
                    "in_use": record.in_use.as_dict() if record.in_use is not None else None,
                }
                for peer_id, record in self._peers.items()
            },
        }
        return json.dumps(data, indent=1, sort_keys=True)

    def write(self, text: str) -> None:
        """Store ``dump``'s text (blocking: a worker thread): a temporary file, renamed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text(text)
        os.replace(temp, self.path)


def _seen(item: Any) -> Seen:
    return Seen(str(item["address"]), float(item["since"]))


def _port_of(addresses: Sequence[str]) -> int:
    """The port a peer listens on, as its other addresses say (8022 when none do)."""
    for address in addresses:
        try:
            return parse_address(address)[1]
        except ValueError:
            continue
    return DEFAULT_PORT


def host_addresses(port: int, path: str = IF_INET6) -> list[str]:
    """The host's global IPv6 addresses, as ``[addr]:port`` (blocking: a worker thread).

    Temporary (privacy), deprecated and tentative addresses are left out: a friend must be
    able to dial them for days. Empty where the host has no IPv6.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        try:
            address = ipaddress.IPv6Address(int(fields[0], 16))
            flags = int(fields[4], 16)
        except ValueError:
            continue
        if address.is_global and not flags & _UNFIT:
            found.append(format_address(str(address), port))
    return found


def own_addresses(typed: Sequence[str], *more: Iterable[str]) -> tuple[str, ...]:
    """Our addresses to announce, in order and without repeats: typed ones first."""
    found: list[str] = []
    for address in (*typed, *(item for group in more for item in group)):
        try:
            host, port = parse_address(address)
        except ValueError:
            continue
        text = format_address(host, port)
        if text not in found:
            found.append(text)
    return tuple(found)
