"""What our space at a peer holds: the folders kept there, told from the host's answer.

After a house fire the user need not remember folder names: a node rebuilt from its key
file or recovery code (no index, no old configuration) asks the peer for the top-level
folders of its space (QUERY ``folders``, ``PeerLink.folders``) and reads their names back.
An encrypted replica's name is sealed (``names.NameCipher``, keys from ``keys.DataKeys``):
it opens with this node's keys; a name that does not open is a plain mirror's, itself. The
backup area (``backup_area.AREA``) is no folder: it is told apart as Home Assistant's
backups. Sizes are what the host stores (an encrypted file is a little larger than its
plain self); ``last_update`` is when the host last wrote there (its ctimes), or, from an
older host that cannot say, the newest mtime it lists (none for an encrypted replica).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import os
from typing import Any

from ..errors import MyNasError
from ..identity import Identity
from .client import open_link
from .run import RESERVED_FOLDER as AREA, PeerTarget


@dataclass(frozen=True, slots=True)
class HeldFolder:
    """One folder kept at a peer (or, ``backups``, the area of Home Assistant's backups)."""

    name: str
    encrypted: bool
    files: int
    stored_bytes: int
    last_update: float | None
    backups: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain data (a service response, the command line)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Holdings:
    """The folders kept at one peer; ``more`` when the host named only the first ones."""

    folders: list[HeldFolder]
    more: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"folders": [item.as_dict() for item in self.folders], "more": self.more}


def read_names(identity: Identity, items: list[dict[str, Any]]) -> list[HeldFolder]:
    """Turn the host's top-level entries into folders, sealed names opened with our keys."""
    from .keys import DataKeys  # noqa: PLC0415 - the ciphers load only where needed
    from .names import NameCipher  # noqa: PLC0415

    names = NameCipher(DataKeys.of(identity).names)
    found: list[HeldFolder] = []
    for item in items:
        stored: bytes = item["name"]
        try:
            plain, encrypted = names.open(b"", stored), True
        except MyNasError:
            plain, encrypted = stored, False  # a plain mirror: its name is the folder's
        name = os.fsdecode(plain)
        found.append(
            HeldFolder(
                name,
                encrypted,
                int(item["files"]),
                int(item["bytes"]),
                item.get("changed"),
                backups=encrypted and name == AREA,
            )
        )
    found.sort(key=lambda held: (held.backups, held.name.casefold(), held.encrypted))
    return found


async def holdings(identity: Identity, target: PeerTarget) -> Holdings:
    """Connect to the peer and list the folders our space there holds."""
    async with await open_link(identity, target) as link:
        items, more = await link.folders()
    return Holdings(read_names(identity, items), more)
