"""One node, assembled: its key, its hosted space and server, its index, its peers.

This is what a host application (Home Assistant, the demo) drives: it keeps the pieces
together and offers one coroutine per thing a user asks for. Every method runs on the
engine's own event loop; a host application drives it through ``threaded_node``, which
makes that hop. Blocking work goes to worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
import enum
import logging
import os
from pathlib import Path
import time
from typing import Any, Concatenate, TypedDict, Unpack

from .errors import AuthRefused, HostKeyMismatch, MyNasError, PeerUnreachable, SourceMissing
from .host.quota import JailUsage
from .host.server import EventCallback, NodeServer, PeerGrant
from .host.space import HostedSpace
from .identity import Identity
from .owner import backup_area, client
from .owner.backup_area import BytesCallback, OpenStream, StoredBackup
from .owner.index import Index
from .owner.push import push as push_folder
from .owner.restore import restore as restore_folder
from .owner.run import (
    PeerTarget,
    ProgressCallback,
    PushResult,
    RestoreResult,
    VerifyResult,
    check_source,
)
from .owner.throttle import Throttle
from .owner.verify import verify as verify_folder

_LOGGER = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A paired peer, as the host application stores it."""

    id: str
    name: str
    jail: str
    addresses: tuple[str, ...]
    public_key: str
    quota: int

    @property
    def target(self) -> PeerTarget:
        """Where and how to reach this peer."""
        return PeerTarget(self.id, self.addresses, self.public_key)

    @property
    def grant(self) -> PeerGrant:
        """What this node grants the peer."""
        return PeerGrant(self.jail, self.public_key, self.quota)


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """A protected folder, as the host application stores it."""

    id: str
    name: str
    path: str
    exclude: tuple[str, ...] = ()
    bwlimit: int | None = None
    retention_days: int | None = None


class Reachability(enum.StrEnum):
    """What happened when we last tried to reach a peer."""

    ONLINE = "online"
    WAITING = "waiting"  # it answers but has not added us yet
    UNREACHABLE = "unreachable"
    KEY_MISMATCH = "key_mismatch"


@dataclass(slots=True)
class ProbeResult:
    """The outcome of one connection test."""

    status: Reachability
    at: float = field(default_factory=time.time)
    used_there: int | None = None
    quota_there: int | None = None
    disk_free_there: int | None = None
    error: str | None = None
    presented_key: str | None = None


async def probe(identity: Identity, peer: PeerTarget) -> ProbeResult:
    """Connect to a peer, ask how much of its quota we use, and hang up."""
    try:
        link = await client.connect_any(identity, peer.addresses, peer.public_key)
    except HostKeyMismatch as err:
        return ProbeResult(
            Reachability.KEY_MISMATCH, error=str(err), presented_key=err.presented_key
        )
    except AuthRefused as err:
        return ProbeResult(Reachability.WAITING, error=str(err))
    except (PeerUnreachable, MyNasError) as err:
        return ProbeResult(Reachability.UNREACHABLE, error=str(err))
    try:
        usage = await link.usage()
    except MyNasError as err:
        return ProbeResult(Reachability.UNREACHABLE, error=str(err))
    finally:
        await link.close()
    free = usage.get("disk_free")
    return ProbeResult(
        Reachability.ONLINE,
        used_there=int(usage["used"]),
        quota_there=int(usage["quota"]),
        disk_free_there=int(free) if isinstance(free, int) else None,
    )


class NodeOptions(TypedDict, total=False):
    """How a node is set up beyond its key and its disk (``ThreadedNode`` passes them on)."""

    # Days a replaced or deleted file of a friend's stays in the trash.
    trash_days: int
    # Bytes/s for the whole node, None for none: every push (and repair) shares the upload
    # limit, every restore the download limit, whichever the peer.
    upload_limit: int | None
    download_limit: int | None


class Node:
    """A running node. Create, ``start``, use, ``stop`` — all on the engine loop."""

    def __init__(
        self,
        identity: Identity,
        storage_root: str | os.PathLike[str],
        *,
        on_event: EventCallback | None = None,
        **options: Unpack[NodeOptions],
    ) -> None:
        """Prepare a node on ``storage_root`` (no I/O until ``start``)."""
        self.identity = identity
        self.upload = Throttle(options.get("upload_limit"))
        self.download = Throttle(options.get("download_limit"))
        self.storage_root = Path(storage_root)
        self.peers: dict[str, PeerConfig] = {}
        self._trash_days = options.get("trash_days", 30)
        self._on_event = on_event
        self._server: NodeServer | None = None
        self._index: Index | None = None
        self._peer_locks: dict[str, asyncio.Lock] = {}

    @property
    def server(self) -> NodeServer:
        """The node's SSH server (after ``start``)."""
        assert self._server is not None, "node not started"
        return self._server

    @property
    def index(self) -> Index:
        """The node's index (after ``start``)."""
        assert self._index is not None, "node not started"
        return self._index

    async def start(self, host: str, port: int, peers: Iterable[PeerConfig]) -> None:
        """Open the index and the hosted space and listen; OSError if the port is taken."""
        loop = asyncio.get_running_loop()
        self.peers = {peer.id: peer for peer in peers}
        space = await loop.run_in_executor(
            None, lambda: HostedSpace(self.storage_root, trash_days=self._trash_days)
        )
        index_path = self.storage_root / ".mynas" / INDEX_FILE
        self._index = await loop.run_in_executor(None, Index, index_path)
        server = NodeServer(
            self.identity,
            space,
            [peer.grant for peer in self.peers.values()],
            on_event=self._on_event,
        )
        try:
            await server.start(host, port)
        except BaseException:
            await server.close()
            await loop.run_in_executor(None, self._index.close)
            self._index = None
            raise
        self._server = server

    async def stop(self) -> None:
        """Stop listening and close everything."""
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._index is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._index.close)
            self._index = None

    async def set_peers(self, peers: Iterable[PeerConfig]) -> None:
        """Apply a new list of peers (keys, quotas; removed ones are disconnected)."""
        self.peers = {peer.id: peer for peer in peers}
        await self.server.set_peers([peer.grant for peer in self.peers.values()])

    async def _with_peer[**P, T](
        self,
        peer_id: str,
        on_start: Callable[[], None] | None,
        run: Callable[Concatenate[Identity, PeerTarget, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``run(our identity, the peer, ...)`` once other transfers to the peer are done."""
        peer = self.peers[peer_id]  # KeyError at once for an unknown peer, not after a wait
        # One transfer per peer at a time: a household uplink gains nothing from two.
        async with self._peer_locks.setdefault(peer_id, asyncio.Lock()):
            if on_start is not None:
                on_start()
            return await run(self.identity, peer.target, *args, **kwargs)

    async def push(
        self,
        folder: FolderConfig,
        peer_id: str,
        progress: ProgressCallback | None = None,
        *,
        on_start: Callable[[], None] | None = None,
    ) -> PushResult:
        """Push ``folder`` to a peer, after any other transfer to that peer finished."""
        return await self._with_peer(
            peer_id,
            on_start,
            push_folder,
            folder.name,
            folder.path,
            self.index,
            exclude=folder.exclude,
            bwlimit=folder.bwlimit,
            node_limit=self.upload,
            retention_days=folder.retention_days,
            progress=progress,
        )

    async def verify(
        self,
        folder: FolderConfig,
        peer_id: str,
        *,
        repair: bool = False,
        progress: ProgressCallback | None = None,
    ) -> VerifyResult:
        """Compare a folder's replica on a peer with the folder (optionally repair it)."""
        return await self._with_peer(
            peer_id,
            None,
            verify_folder,
            folder.name,
            folder.path,
            self.index,
            exclude=folder.exclude,
            repair=repair,
            progress=progress,
            node_limit=self.upload,
        )

    async def restore(
        self,
        folder_name: str,
        peer_id: str,
        destination: str,
        *,
        path: str = "",
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreResult:
        """Copy a folder's replica (or a path in it) back from a peer."""
        return await self._with_peer(
            peer_id,
            None,
            restore_folder,
            folder_name,
            destination,
            path=path,
            overwrite=overwrite,
            progress=progress,
            limit=self.download,
        )

    # --- the host application's own backups, in the backup area at a peer ------------------

    async def upload_backup(
        self,
        peer_id: str,
        backup_id: str,
        metadata: dict[str, Any],
        size: int,
        open_stream: OpenStream,
        *,
        progress: BytesCallback | None = None,
    ) -> StoredBackup:
        """Store an archive at a peer (``backup_area``), after any other transfer to it."""
        return await self._with_peer(
            peer_id,
            None,
            backup_area.upload,
            backup_id,
            metadata,
            size,
            open_stream,
            progress=progress,
        )

    async def list_backups(self, peer_id: str) -> list[StoredBackup]:
        """The archives kept at a peer (not queued behind a transfer: it reads a listing)."""
        return await backup_area.listing(self.identity, self.peers[peer_id].target)

    async def get_backup(self, peer_id: str, backup_id: str) -> StoredBackup:
        """One archive kept at a peer; BackupMissing if it is not there."""
        return await backup_area.get(self.identity, self.peers[peer_id].target, backup_id)

    async def delete_backup(self, peer_id: str, backup_id: str) -> None:
        """Move one archive kept at a peer into the peer's trash."""
        await backup_area.delete(self.identity, self.peers[peer_id].target, backup_id)

    def download_backup(self, peer_id: str, backup_id: str) -> AsyncGenerator[bytes]:
        """Yield the bytes of an archive kept at a peer (a download: not queued either).

        Close the generator (``contextlib.aclosing``) when leaving it early.
        """
        return backup_area.download(self.identity, self.peers[peer_id].target, backup_id)

    async def check_folder(self, folder: FolderConfig) -> str | None:
        """Say why ``folder`` cannot be backed up now, or None when it can.

        Missing or unreadable; or empty while a peer holds files of it, as when the disk it
        lives on is not mounted (a push would refuse it too). Cheap: a stat, the folder's
        first entry, and the index only for an empty folder.
        """
        index = self.index

        def check() -> str | None:
            try:
                path = check_source(folder.path)
            except SourceMissing as err:
                return str(err)
            with os.scandir(path) as entries:
                if next(entries, None) is not None:
                    return None
            held = [
                index.stats(name, peer)[0] for name, peer in index.folders() if name == folder.name
            ]
            if any(held):
                return str(
                    SourceMissing(
                        os.fsdecode(path),
                        f"is empty while the peer holds {max(held)} file(s) of it "
                        "(is the disk mounted?)",
                    )
                )
            return None

        try:
            return await asyncio.get_running_loop().run_in_executor(None, check)
        except OSError as err:  # vanished between the checks, or an I/O error
            return str(SourceMissing(folder.path, f"cannot be read ({err.strerror or err})"))

    async def probe(self, peer_id: str) -> ProbeResult:
        """Test the connection to a peer."""
        return await probe(self.identity, self.peers[peer_id].target)

    def hosted(self) -> dict[str, JailUsage]:
        """Space each peer uses here, by peer id."""
        server = self.server
        return {
            peer.id: server.jail(peer.jail).usage()
            for peer in self.peers.values()
            if peer.jail in server.jail_names
        }

    def last_contact(self) -> dict[str, float]:
        """When each peer was last connected to us, by peer id."""
        states = self.server.peer_state
        return {
            peer.id: state.last_seen
            for peer in self.peers.values()
            if (state := states.get(peer.jail)) is not None and state.last_seen is not None
        }

    async def remove_peer_data(self, jail: str) -> None:
        """Delete everything a (removed) peer stored here, trash included."""
        await asyncio.get_running_loop().run_in_executor(
            None, self.server.space.remove_peer_data, jail
        )

    async def known_pairs(self) -> list[tuple[str, str]]:
        """Every (folder name, peer id) the index holds something for."""
        return await asyncio.get_running_loop().run_in_executor(None, self.index.folders)

    async def forget_pairs(self, folders: Sequence[tuple[str, str]]) -> None:
        """Drop the index of (folder name, peer id) pairs that no longer exist."""
        loop = asyncio.get_running_loop()
        for folder, peer in folders:
            await loop.run_in_executor(None, self.index.clear, folder, peer)

    def snapshot(self) -> dict[str, Any]:
        """Figures for diagnostics (no keys, no addresses, no paths)."""
        server = self.server
        return {
            "peers": len(self.peers),
            "unknown_keys": len(server.unknown_keys),
            "connections": {name: state.connections for name, state in server.peer_state.items()},
        }
