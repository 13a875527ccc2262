"""Helpers for the replication tests: a live host plus a pushing node, and tree snapshots.

The node under test here is "alice", the side that pushes; the host is a live NodeServer
that grants alice a jail. A replica of FOLDER is ``<storage>/alice/FOLDER/`` on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
import hashlib
import os
from pathlib import Path
import stat
from typing import Any

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import (
    push as replicator,
    restore as restorer,
    verify as verifier,
)
from custom_components.mynas.engine.owner.index import Index
from custom_components.mynas.engine.owner.run import (
    PeerTarget,
    PushResult,
    RestoreResult,
    VerifyResult,
)

from .conftest import ServerFactory, peer_target

FOLDER = "Docs"
MIB = 1 << 20
BIG_QUOTA = 1 << 30
MTIME = 1_600_000_000_123_456_789

type Snapshot = dict[bytes, tuple[Any, ...]]


async def plain_push(*args: Any, **kwargs: Any) -> PushResult:
    """``push`` to a plain mirror (what the tests that read the host's files use)."""
    kwargs.setdefault("encrypted", False)
    return await replicator.push(*args, **kwargs)


def digest(data: bytes) -> bytes:
    """The content hash MyNAS uses (SHA-256, as ``sha256sum`` computes it)."""
    return hashlib.sha256(data).digest()


def snapshot(root: Path | bytes, *, portable: bool = False) -> Snapshot:
    """Every entry below ``root`` and ``root`` itself (as b""), never following links.

    Files: ("f", content hash, mtime_ns, mode); directories: ("d", mtime_ns). With
    ``portable`` a file's mode is what MyNAS keeps of it (0o755 if owner-exec, else 0o644).
    """
    base = os.fsencode(root)
    result: Snapshot = {b"": ("d", os.lstat(base).st_mtime_ns)}
    for entry in tree.walk(base):
        info = os.lstat(base + b"/" + entry.path)
        if stat.S_ISDIR(info.st_mode):
            result[entry.path] = ("d", info.st_mtime_ns)
        else:
            mode = tree.portable_mode(info.st_mode) if portable else stat.S_IMODE(info.st_mode)
            with open(base + b"/" + entry.path, "rb") as handle:
                content = digest(handle.read())
            result[entry.path] = ("f", content, info.st_mtime_ns, mode)
    return result


def without_root(snap: Snapshot) -> Snapshot:
    """A snapshot without its root directory's entry."""
    return {path: value for path, value in snap.items() if path}


def index_view(index: Index, peer: str = "host") -> Snapshot:
    """What the index says the host holds of FOLDER, in ``snapshot``'s terms (no root)."""
    view: Snapshot = {}
    for entry in index.entries(FOLDER, peer):
        if entry.kind is tree.Kind.DIR:
            view[entry.path] = ("d", entry.mtime_ns)
        else:
            view[entry.path] = ("f", entry.hash, entry.mtime_ns, entry.mode, entry.size)
    return view


def host_view(replica: Path, hashes: bool = True) -> Snapshot:
    """What the host holds, in ``index_view``'s terms (hash None when ``hashes`` is off)."""
    view: Snapshot = {}
    for path, value in without_root(snapshot(replica)).items():
        if value[0] == "d":
            view[path] = value
        else:
            size = os.lstat(os.fsencode(replica) + b"/" + path).st_size
            view[path] = ("f", value[1] if hashes else None, value[2], value[3], size)
    return view


def check_index_matches_host(index: Index, replica: Path, *, exact: bool = True) -> None:
    """Assert the index claims only what the host holds (and all of it when ``exact``).

    Entries recorded without a hash (adopted from a listing) are compared without one.
    """
    claimed = index_view(index)
    held = host_view(replica) if replica.exists() else {}
    for path, value in claimed.items():
        assert path in held, f"the index claims {path!r}, which the host does not hold"
        have = held[path]
        if value[0] == "f" and value[1] is None:
            have = (have[0], None, *have[2:])
        assert value == have, f"{path!r}: index {value} != host {have}"
    if exact:
        assert set(claimed) == set(held)


def trash_files(storage: Path, peer: str = "alice") -> set[tuple[bytes, bytes]]:
    """(path relative to the jail, content hash) of every file in a peer's trash."""
    trash = os.fsencode(storage / ".mynas" / "trash" / peer)
    found: set[tuple[bytes, bytes]] = set()
    if not os.path.isdir(trash):
        return found
    for stamp in os.listdir(trash):
        for entry in tree.walk(trash + b"/" + stamp):
            if entry.kind is tree.Kind.FILE:
                with open(trash + b"/" + stamp + b"/" + entry.path, "rb") as handle:
                    found.add((entry.path, digest(handle.read())))
    return found


def write(path: Path | bytes, data: bytes, *, mtime_ns: int = MTIME, mode: int = 0o644) -> None:
    """Create or replace a file with ``data``, ``mtime_ns`` and ``mode``."""
    raw = os.fsencode(path)
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as handle:
        handle.write(data)
    os.chmod(raw, mode)
    os.utime(raw, ns=(mtime_ns, mtime_ns))


def change_under_reader(path: Path, how: str, size: int) -> None:
    """Change the file of ``size`` bytes at ``path`` as a user might while a push reads it.

    ``how``: it "grows", "shrinks", is "touched" (a new mtime) or is "rewritten" in place
    (same size, same mtime: only the ctime tells).
    """
    if how == "grows":
        with open(path, "ab") as handle:
            handle.write(b"more")
    elif how == "shrinks":
        os.truncate(path, size // 2)
    elif how == "touched":
        os.utime(path, ns=(MTIME + 7, MTIME + 7))
    else:
        assert how == "rewritten"
        with open(path, "r+b") as handle:
            handle.seek(size - 10)
            handle.write(b"0123456789")
        os.utime(path, ns=(MTIME, MTIME))


def partials(storage: Path, peer: str = "alice") -> list[str]:
    """The names of a peer's resumable partial uploads on the host."""
    return sorted(os.listdir(storage / ".mynas" / "partial" / peer))


def drop_connections(server: NodeServer) -> int:
    """Cut every connection the server holds, from the server's side."""
    connections = list(server._connections)
    for conn in connections:
        conn.close()
    return len(connections)


@dataclass
class Env:
    """A live host serving alice, alice's identity and index, and a source folder."""

    server: NodeServer
    storage: Path
    alice: Identity
    index: Index
    src: Path
    work: Path
    target: PeerTarget

    @property
    def replica(self) -> Path:
        """The replica of FOLDER on the host."""
        return self.storage / "alice" / FOLDER

    @property
    def jail(self) -> Path:
        """Alice's jail on the host."""
        return self.storage / "alice"

    async def push(self, **kwargs: Any) -> PushResult:
        """Push the source folder to the host (a plain mirror unless ``encrypted=True``).

        The tests that look at the host's files directly want to read them: the suite that
        attacks encrypted replicas is ``test_encrypted_replica.py``.
        """
        kwargs.setdefault("encrypted", False)
        return await replicator.push(
            self.alice, self.target, FOLDER, self.src, self.index, **kwargs
        )

    async def verify(self, **kwargs: Any) -> VerifyResult:
        """Verify the replica against the source folder."""
        return await verifier.verify(
            self.alice, self.target, FOLDER, self.src, self.index, **kwargs
        )

    async def restore(self, dest: Path, **kwargs: Any) -> RestoreResult:
        """Restore FOLDER (or a path in it) into ``dest`` (from a plain mirror unless told)."""
        kwargs.setdefault("encrypted", False)
        return await restorer.restore(self.alice, self.target, FOLDER, dest, **kwargs)

    async def set_quota(self, quota: int) -> None:
        """Change the quota the host grants alice."""
        await self.server.set_peers([PeerGrant("alice", self.alice.public_line, quota)])

    def check_replica(self) -> None:
        """Assert the replica equals the source: paths, bytes, mtimes, portable modes."""
        assert snapshot(self.replica) == snapshot(self.src, portable=True)

    def upload_idle(self) -> bool:
        """True once the host has no large upload of alice's open."""
        return not self.server.jail("alice")._uploads


async def make_env(
    make_server: ServerFactory, fast_dir: Path, alice: Identity, quota: int = BIG_QUOTA, **kw: Any
) -> Env:
    """Start a host on fast storage granting alice ``quota``; an index and an empty source."""
    storage = fast_dir / "storage"
    storage.mkdir()
    server = await make_server(
        [PeerGrant("alice", alice.public_line, quota)], storage=storage, **kw
    )
    src = fast_dir / "src"
    src.mkdir()
    work = fast_dir / "work"
    work.mkdir()
    index = await asyncio.get_running_loop().run_in_executor(None, Index, fast_dir / "index.sqlite")
    return Env(server, storage, alice, index, src, work, peer_target(server))


def close_env(env: Env) -> None:
    """Close the index (the server is closed by its fixture)."""
    with contextlib.suppress(Exception):
        env.index.close()
