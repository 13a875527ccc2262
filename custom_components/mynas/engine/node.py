"""One node, assembled: its key, its hosted space and server, its index, its peers.

This is what a host application (Home Assistant, the demo) drives: it keeps the pieces
together and offers one coroutine per thing a user asks for. Every method runs on the
engine's own event loop; a host application drives it through ``threaded_node``, which
makes that hop. Blocking work goes to worker threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
import enum
import logging
import os
from pathlib import Path
import time
from typing import Any, Concatenate

from .errors import AuthRefused, HostKeyMismatch, MyNasError, PeerUnreachable
from .host.quota import JailUsage
from .host.server import EventCallback, NodeServer, PeerGrant
from .host.space import HostedSpace
from .identity import Identity
from .owner import client
from .owner.index import Index
from .owner.push import convert as convert_folder, push as push_folder
from .owner.restore import restore as restore_folder
from .owner.run import PeerTarget, ProgressCallback, PushResult, RestoreResult, VerifyResult
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
    # Encrypted replicas are the engine's default (``push``); a folder set up before they
    # existed has plain ones, and the Home Assistant layer decides (issue 11, its part).
    encrypted: bool = False


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
    return ProbeResult(
        Reachability.ONLINE, used_there=int(usage["used"]), quota_there=int(usage["quota"])
    )


class Node:
    """A running node. Create, ``start``, use, ``stop`` — all on the engine loop."""

    def __init__(
        self,
        identity: Identity,
        storage_root: str | os.PathLike[str],
        *,
        trash_days: int = 30,
        on_event: EventCallback | None = None,
    ) -> None:
        """Prepare a node on ``storage_root`` (no I/O until ``start``)."""
        self.identity = identity
        self.storage_root = Path(storage_root)
        self.peers: dict[str, PeerConfig] = {}
        self._trash_days = trash_days
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
            retention_days=folder.retention_days,
            progress=progress,
            encrypted=folder.encrypted,
        )

    async def convert(
        self,
        folder: FolderConfig,
        peer_id: str,
        progress: ProgressCallback | None = None,
    ) -> PushResult:
        """Turn a folder's plain replica on a peer into an encrypted one (``push.convert``).

        The folder must be set up encrypted from now on: later pushes are.
        """
        return await self._with_peer(
            peer_id,
            None,
            convert_folder,
            folder.name,
            folder.path,
            self.index,
            exclude=folder.exclude,
            bwlimit=folder.bwlimit,
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
        )

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
