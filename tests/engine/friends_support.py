"""Two friends' nodes, Alice and Bob, each with a folder to protect and a place for the other.

``Friend`` is one node (a ``ThreadedNode``, so it may run in a network namespace of its own)
with its storage root and its folder; ``pair`` makes each the other's peer, at the addresses
given (typed, as an invite code would carry them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_components.mynas.engine import identity as identity_mod
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.node import FolderConfig, PeerConfig
from custom_components.mynas.engine.threaded_node import ThreadedNode

QUOTA = 64 << 20


@dataclass
class Friend:
    """One friend's node, its folder, and what its engine reported."""

    name: str
    identity: Identity
    storage: Path
    source: Path
    node: ThreadedNode
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def folder(self) -> FolderConfig:
        """The folder this friend protects (named after it)."""
        return FolderConfig(id=f"{self.name}-docs", name=f"{self.name}-docs", path=str(self.source))

    def replica_of(self, other: Friend) -> Path:
        """Where this friend keeps ``other``'s folder."""
        return self.storage / other.name / other.folder.name

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """Keep what the engine reports (on the test's loop)."""
        self.events.append((kind, data))

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        """What the engine reported of one kind, in order."""
        return [data for seen, data in self.events if seen == kind]

    def peer_config(self, addresses: tuple[str, ...]) -> PeerConfig:
        """How another node pairs with this one, reaching it at ``addresses``."""
        return PeerConfig(
            id=self.name,
            name=self.name.title(),
            jail=self.name,
            addresses=addresses,
            public_key=self.identity.public_line,
            quota=QUOTA,
        )


def friend(tmp_path: Path, name: str, **options: Any) -> Friend:
    """A friend's node (not started): its key, storage root and a folder with one file."""
    key, _ = identity_mod.load_or_create(tmp_path / name / "key")
    storage = tmp_path / name / "storage"
    storage.mkdir(parents=True)
    source = tmp_path / name / "docs"
    source.mkdir()
    (source / "hello.txt").write_text(f"{name}'s first file\n")
    return Friend(name, key, storage, source, ThreadedNode(key, storage, **options))


def files(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by relative path, with its content."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
