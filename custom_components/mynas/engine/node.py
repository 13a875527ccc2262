"""One node, assembled: its key, its hosted space and server, its index, its peers.

This is what a host application (Home Assistant, the demo) drives: it keeps the pieces
together and offers one coroutine per thing a user asks for. Every method runs on the
engine's own event loop; a host application drives it through ``threaded_node``, which
makes that hop. Blocking work goes to worker threads.

Reaching a peer (``_dial``): its typed addresses first, then those it announced, then the
address it last connected from (``addresses.AddressBook``, kept in the storage root). Once
connected, we announce our own addresses if that peer has not heard them yet; when they
change (the typed ones, the router's from UPnP or NAT-PMP, the host's global IPv6 ones,
looked at every ``refresh_every`` seconds) we tell every peer we can reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
import enum
import functools
import logging
import os
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any, Concatenate, TypedDict, Unpack

from .addresses import ADDRESSES_FILE, AddressBook, host_addresses, own_addresses
from .errors import (
    AuthRefused,
    HostKeyMismatch,
    HostRefused,
    MyNasError,
    PeerUnreachable,
    SourceMissing,
)
from .host.limits import Limits
from .host.quota import JailUsage
from .host.server import EventCallback, NodeServer, PeerGrant
from .host.space import HostedSpace
from .identity import Identity
from .owner import backup_area, client
from .owner.backup_area import BytesCallback, NewBackup, StoredBackup
from .owner.client import PeerLink
from .owner.holdings import Holdings, holdings
from .owner.index import Index
from .owner.push import convert as convert_folder, push as push_folder
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
from .reachability import UNREACHABLE_CAUSES, AddressCheck, Cause, Outcome, diagnose
from .reverse import ReverseKeeper, Serve

if TYPE_CHECKING:
    from .portmap import RouterMapper
    from .upnp import MapState

_LOGGER = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
# Our own addresses are looked at this often (seconds): the host's IPv6 ones may change.
REFRESH_EVERY = 600.0
# Hosts that listen on every address: only then are the host's IPv6 addresses ours to give.
_ALL_ADDRESSES = ("", "::")
# A peer that keeps a connection to us: how long a push waits for one of its idle channels.
REVERSE_WAIT = 10.0
# A push that would replace or delete more than this share (%) of a replica's files waits.
MASS_CHANGE_PERCENT = 30


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


class Inbound(enum.StrEnum):
    """Whether this node can accept connections; if not, it keeps its own open to peers."""

    AUTO = "auto"  # as the last reachability check says
    YES = "yes"
    NO = "no"


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
    # What the host says of our trash there once our quota is nearly used (else None):
    # its size, when its oldest part leaves it, when all of it will have.
    trash_there: int | None = None
    trash_frees_at: float | None = None
    trash_kept_until: float | None = None


_DAY = 86400.0


async def probe(identity: Identity, peer: PeerTarget) -> ProbeResult:
    """Connect to a peer, ask how much of its quota we use, and hang up."""
    try:
        link = await client.open_link(identity, peer)
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
    trash, oldest, newest = (usage.get(key) for key in ("trash", "trash_oldest", "trash_newest"))
    days, longest = usage.get("trash_days"), usage.get("trash_days_longest")
    return ProbeResult(
        Reachability.ONLINE,
        used_there=int(usage["used"]),
        quota_there=int(usage["quota"]),
        disk_free_there=int(free) if isinstance(free, int) else None,
        trash_there=int(trash) if isinstance(trash, int) else None,
        trash_frees_at=(
            oldest + days * _DAY
            if isinstance(oldest, (int, float)) and isinstance(days, int)
            else None
        ),
        trash_kept_until=(
            newest + longest * _DAY
            if isinstance(newest, (int, float)) and isinstance(longest, int)
            else None
        ),
    )


class NodeOptions(TypedDict, total=False):
    """How a node is set up beyond its key and its disk (``ThreadedNode`` passes them on)."""

    # Days a replaced or deleted file of a friend's stays in the trash.
    trash_days: int
    # Bytes/s for the whole node, None for none: every push (and repair) shares the upload
    # limit, every restore the download limit, whichever the peer.
    upload_limit: int | None
    download_limit: int | None
    # The host's limits (None: the defaults).
    limits: Limits | None
    # Bounds each address tried when reaching a peer.
    dial_timeout: float
    # How often our own addresses are looked at.
    refresh_every: float
    # Whether this node can accept connections (AUTO: the reachability check says).
    inbound: Inbound
    # Map our port on the router while the node runs: UPnP first, then NAT-PMP
    # (``portmap.RouterMapper``; ``upnp_options`` go to ``upnp.PortMapper``: a router's
    # description URL, a lease...; ``natpmp_options`` to ``natpmp.NatPmpMapper``: a gateway).
    upnp: bool
    upnp_options: dict[str, Any] | None
    natpmp_options: dict[str, Any] | None
    # Hold a push that would replace or delete more than this share (%) of the files a
    # peer holds of a folder, until asked to send it (0: never hold). Default 30.
    mass_change_percent: int


@dataclass(slots=True)
class ReachReport:
    """What our friends saw when they dialed back our addresses (``Node.check_reachability``).

    ``checks`` has what each peer found at each address (or, in ``errors``, why that peer
    could not check); ``seen_from`` is where peers see us connect from (our public address,
    when behind a router), ``lan_address`` our end of those connections (the address to
    forward the port to), ``answered_by`` the addresses where another host answered.
    """

    cause: Cause
    port: int
    addresses: tuple[str, ...]
    checks: dict[str, list[AddressCheck]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seen_from: list[str] = field(default_factory=list)
    lan_address: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def answered_by(self) -> list[str]:
        """Our addresses where something else than this node answered."""
        return sorted(
            {
                check.address
                for found in self.checks.values()
                for check in found
                if check.outcome in (Outcome.OTHER_KEY, Outcome.NOT_SSH)
            }
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data (events, diagnostics, the command line)."""
        return {
            "cause": str(self.cause),
            "port": self.port,
            "addresses": list(self.addresses),
            "checks": {
                peer: [check.as_dict() for check in found] for peer, found in self.checks.items()
            },
            "errors": dict(self.errors),
            "seen_from": list(self.seen_from),
            "lan_address": self.lan_address,
            "answered_by": self.answered_by,
            "at": self.at,
        }


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
        self.mass_change_percent = options.get("mass_change_percent", MASS_CHANGE_PERCENT)
        self._on_event = on_event
        self._limits = options.get("limits")
        self._dial_timeout = options.get("dial_timeout", client.CONNECT_TIMEOUT)
        self._refresh_every = options.get("refresh_every", REFRESH_EVERY)
        self._server: NodeServer | None = None
        self._index: Index | None = None
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self._book: AddressBook | None = None
        self._book_lock = asyncio.Lock()
        self._listen_host = ""
        # Our addresses: typed by the user, and those other sources found ("host", "upnp").
        self._typed_own: tuple[str, ...] = ()
        self._found_own: dict[str, tuple[str, ...]] = {}
        self._own: tuple[str, ...] = ()
        # What each peer last accepted from us (ANNOUNCE), by peer id.
        self._announced: dict[str, tuple[str, ...]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self.reachability: ReachReport | None = None
        self._inbound = options.get("inbound", Inbound.AUTO)
        self._keepers: dict[str, ReverseKeeper] = {}
        self._upnp = options.get("upnp", False)
        self._upnp_options = dict(options.get("upnp_options") or {})
        self._natpmp_options = dict(options.get("natpmp_options") or {})
        self.mapper: RouterMapper | None = None

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

    @property
    def book(self) -> AddressBook:
        """What the node learned of its peers' addresses (after ``start``)."""
        assert self._book is not None, "node not started"
        return self._book

    async def start(
        self,
        host: str,
        port: int,
        peers: Iterable[PeerConfig],
        *,
        addresses: Sequence[str] = (),
    ) -> None:
        """Open the index and the hosted space and listen; OSError if the port is taken.

        ``addresses`` are ours as the user typed them (announced to peers, see
        ``set_addresses``).
        """
        loop = asyncio.get_running_loop()
        self.peers = {peer.id: peer for peer in peers}
        space = await loop.run_in_executor(
            None, lambda: HostedSpace(self.storage_root, trash_days=self._trash_days)
        )
        index_path = self.storage_root / ".mynas" / INDEX_FILE
        self._index = await loop.run_in_executor(None, Index, index_path)
        self._book = await loop.run_in_executor(
            None, AddressBook, self.storage_root / ".mynas" / ADDRESSES_FILE
        )
        server = NodeServer(
            self.identity,
            space,
            [peer.grant for peer in self.peers.values()],
            limits=self._limits,
            on_event=self._server_event,
        )
        try:
            await server.start(host, port)
        except BaseException:
            await server.close()
            await loop.run_in_executor(None, self._index.close)
            self._index = None
            raise
        self._server = server
        self._listen_host = host
        self._typed_own = own_addresses(addresses)
        self._own = self._typed_own
        self._refresher = asyncio.create_task(self._refresh_loop())
        await self._update_keepers()
        if self._upnp:
            # Imported here: aiohttp and the UPnP library only load where mapping is used.
            from .natpmp import NatPmpMapper  # noqa: PLC0415
            from .portmap import RouterMapper  # noqa: PLC0415
            from .upnp import PortMapper  # noqa: PLC0415

            self.mapper = RouterMapper(
                PortMapper(server.port, **self._upnp_options),
                NatPmpMapper(server.port, **self._natpmp_options),
                on_change=self._mapped,
            )
            self.mapper.start()

    async def stop(self) -> None:
        """Stop listening and close everything."""
        if self.mapper is not None:
            await self.mapper.stop()  # the router forgets the mapping now, not at its lease
            self.mapper = None
        for keeper in list(self._keepers.values()):
            await keeper.stop()
        self._keepers.clear()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._book is not None:
            await self._save_book()
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
        self.book.keep_only(self.peers)
        for peer_id in set(self._announced) - set(self.peers):
            del self._announced[peer_id]
        await self._save_book()
        await self._update_keepers()

    # --- one-sided pairs ---------------------------------------------------------------------

    @property
    def inbound(self) -> Inbound:
        """Whether we take connections (as set; AUTO: as the last check said)."""
        return self._inbound

    @property
    def keeping_connections(self) -> bool:
        """Whether we keep a connection open to each peer (we cannot accept theirs)."""
        if self._inbound is not Inbound.AUTO:
            return self._inbound is Inbound.NO
        report = self.reachability
        return report is not None and report.cause in UNREACHABLE_CAUSES

    async def set_inbound(self, inbound: Inbound) -> None:
        """Say whether this node can accept connections (AUTO: as the check finds)."""
        self._inbound = inbound
        await self._update_keepers()

    def kept_connections(self) -> dict[str, str | None]:
        """Peer id → the address our kept connection is up to (None while it is not)."""
        return {peer_id: keeper.connected_to for peer_id, keeper in self._keepers.items()}

    async def _update_keepers(self) -> None:
        wanted = set(self.peers) if self.keeping_connections else set()
        for peer_id in list(self._keepers):
            keeper = self._keepers[peer_id]
            peer = self.peers.get(peer_id)
            if peer_id not in wanted or peer is None or keeper.public_key != peer.public_key:
                del self._keepers[peer_id]
                await keeper.stop()
        for peer_id in wanted - set(self._keepers):
            peer = self.peers[peer_id]
            keeper = ReverseKeeper(
                self.identity,
                peer.name,
                functools.partial(self.dial_order, peer_id),
                peer.public_key,
                functools.partial(self._serve_reverse, peer_id),
                typed=len(dict.fromkeys(peer.addresses)),
                connect_timeout=self._dial_timeout,
            )
            self._keepers[peer_id] = keeper
            keeper.start()

    def _mapped(self, state: MapState) -> None:
        """The router's answer changed: announce its external address (when dialable)."""
        self._emit("upnp", **state.as_dict())
        public = state.public
        self._spawn(self.set_found_addresses("upnp", [public] if public else []))

    def upnp_state(self) -> dict[str, Any] | None:
        """Where the port mapping (UPnP or NAT-PMP) stands (None when mapping is off)."""
        return self.mapper.state.as_dict() if self.mapper is not None else None

    def _serve_reverse(self, peer_id: str, address: str) -> Serve:
        return functools.partial(self.server.serve, self.peers[peer_id].jail, address)

    async def _reverse_link(self, peer: PeerConfig) -> PeerLink | None:
        """A link over one of the peer's idle reverse channels, if it keeps them here."""
        server = self.server
        while server.has_reverse(peer.jail):
            slot = await server.take_reverse(peer.jail, wait=REVERSE_WAIT)
            if slot is None:
                return None
            try:
                return await client.over_channel(
                    slot.writer, slot.reader, f"{slot.address} (its connection to us)"
                )
            except PeerUnreachable:
                continue  # that channel was stale: the next one
        return None

    # --- addresses -------------------------------------------------------------------------

    @property
    def own_addresses(self) -> tuple[str, ...]:
        """Our addresses as we announce them: typed, then UPnP's, then the host's IPv6."""
        return self._own

    async def set_addresses(self, typed: Sequence[str]) -> None:
        """Replace our typed addresses; if that changes what we announce, tell the peers."""
        self._typed_own = own_addresses(typed)
        await self._recompute_own()

    async def set_found_addresses(self, source: str, addresses: Sequence[str]) -> None:
        """Replace what ``source`` ("upnp", "host") found of our addresses; tell peers."""
        self._found_own[source] = tuple(addresses)
        await self._recompute_own()

    async def refresh_addresses(self) -> None:
        """Look at the host's global IPv6 addresses again (they change with the prefix)."""
        found: list[str] = []
        if self._listen_host in _ALL_ADDRESSES:
            found = await asyncio.get_running_loop().run_in_executor(
                None, host_addresses, self.server.port
            )
        await self.set_found_addresses("host", found)

    async def _recompute_own(self) -> None:
        found = self._found_own
        own = own_addresses(self._typed_own, found.get("upnp", ()), found.get("host", ()))
        if own == self._own:
            return
        self._own = own
        _LOGGER.info("Our addresses are now %s", ", ".join(own) or "(none)")
        self._emit("own_addresses", addresses=list(own))
        self._spawn(self.announce())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_addresses()
            except Exception:
                _LOGGER.exception("Looking at our own addresses failed")
            await asyncio.sleep(self._refresh_every)

    async def announce(self) -> dict[str, str | None]:
        """Tell every peer we can reach where we are now; by peer id, None or what failed."""

        async def one(peer_id: str) -> str | None:
            try:
                link = await self._dial(peer_id)
            except MyNasError as err:
                return str(err)
            await link.close()
            return None

        peer_ids = [peer_id for peer_id in self.peers if self._announced.get(peer_id) != self._own]
        results = await asyncio.gather(*(one(peer_id) for peer_id in peer_ids))
        return dict(zip(peer_ids, results, strict=True))

    async def check_reachability(self) -> ReachReport:
        """Ask every peer we can reach to dial back our addresses; say what that means.

        Each peer hears our addresses first (ANNOUNCE), then dials them (CHECK). A peer
        that is offline, too old for CHECK, or asked too recently is named in ``errors``.
        """
        port = self.server.port
        report = ReachReport(Cause.NO_ADDRESS, port, self._own)
        if not self._own:
            self._reached(report)
            return report

        async def one(peer_id: str) -> None:
            try:
                link = await self._dial(peer_id)
            except MyNasError as err:
                report.errors[peer_id] = str(err)
                return
            try:
                if not link.serves("check"):
                    report.errors[peer_id] = "this friend's MyNAS is too old to check"
                    return
                answer = await link.check()
                report.checks[peer_id] = [
                    AddressCheck.from_dict(item) for item in answer.get("results", [])
                ]
                seen = answer.get("seen_from")
                if isinstance(seen, str) and seen not in report.seen_from:
                    report.seen_from.append(seen)
                report.lan_address = report.lan_address or link.local_address
            except MyNasError as err:
                report.errors[peer_id] = str(err)
            finally:
                await link.close()

        await asyncio.gather(*(one(peer_id) for peer_id in self.peers))
        found = [check for checks in report.checks.values() for check in checks]
        report.cause = diagnose(found) if report.checks else Cause.UNKNOWN
        self._reached(report)
        await self._update_keepers()
        return report

    def _reached(self, report: ReachReport) -> None:
        self.reachability = report
        _LOGGER.info("Reachability: %s", report.cause)
        self._emit("reachability", **report.as_dict())

    def peer_addresses(self, peer_id: str) -> dict[str, Any]:
        """A peer's addresses: typed, learned (since when), hint, the one in use (since when)."""
        return self.book.view(peer_id, self.peers[peer_id].addresses)

    def dial_order(self, peer_id: str) -> tuple[str, ...]:
        """Where ``_dial`` tries a peer, in order."""
        return self.book.dial_order(peer_id, self.peers[peer_id].addresses)

    async def _dial(self, peer_id: str) -> PeerLink:
        """Open a link to a peer: typed addresses, then learned ones, then the hint.

        A peer that keeps a connection to us (it cannot accept ours) is reached over one
        of the idle channels it holds open on it, before any address is dialed.
        """
        peer = self.peers[peer_id]
        link = await self._reverse_link(peer)
        if link is None:
            link = await client.connect_any(
                self.identity,
                self.dial_order(peer_id),
                peer.public_key,
                connect_timeout=self._dial_timeout,
                mismatch_ends=len(dict.fromkeys(peer.addresses)),
            )
        if self.book.used(peer_id, link.address):
            self._addresses_changed(peer_id)
        try:
            await self._announce_on(peer_id, link)
        except BaseException:
            await link.close()
            raise
        return link

    async def _announce_on(self, peer_id: str, link: PeerLink) -> None:
        own = self._own
        if not own or self._announced.get(peer_id) == own or not link.serves("announce"):
            return
        try:
            await link.announce(own)
        except HostRefused as err:
            _LOGGER.warning("%s refused our addresses: %s", link.address, err)
            return
        self._announced[peer_id] = own

    def _target(self, peer: PeerConfig) -> PeerTarget:
        return PeerTarget(
            peer.id,
            self.dial_order(peer.id),
            peer.public_key,
            dial=functools.partial(self._dial, peer.id),
        )

    def _peer_of_jail(self, jail: object) -> str | None:
        for peer in self.peers.values():
            if peer.jail == jail:
                return peer.id
        return None

    def _server_event(self, kind: str, data: dict[str, Any]) -> None:
        """What the server tells: learn from it, then pass it on."""
        peer_id = self._peer_of_jail(data.get("peer"))
        if peer_id is not None and self._book is not None:
            if kind == "addresses_announced":
                if self._book.learn(peer_id, data["addresses"], data.get("since")):
                    _LOGGER.info(
                        "%s can be reached at %s (it says so)",
                        self.peers[peer_id].name,
                        ", ".join(data["addresses"]) or "(nowhere)",
                    )
                    self._addresses_changed(peer_id)
            elif kind == "peer_connected" and self._book.hint(peer_id, str(data.get("address"))):
                self._addresses_changed(peer_id)
        self._emit(kind, **data)

    def _addresses_changed(self, peer_id: str) -> None:
        self._spawn(self._save_book())
        self._emit("peer_addresses", peer_id=peer_id)

    async def _save_book(self) -> None:
        async with self._book_lock:
            text = self.book.dump()
            if text is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.book.write, text)
                except OSError:
                    _LOGGER.exception("Could not save the address book")

    def _emit(self, kind: str, **data: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:
                _LOGGER.exception("Event callback failed")

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
            return await run(self.identity, self._target(peer), *args, **kwargs)

    async def push(
        self,
        folder: FolderConfig,
        peer_id: str,
        progress: ProgressCallback | None = None,
        *,
        on_start: Callable[[], None] | None = None,
        guard: bool = True,
    ) -> PushResult:
        """Push ``folder`` to a peer, after any other transfer to that peer finished.

        A run that would replace or delete more than ``mass_change_percent`` % of the
        peer's files of the folder raises MassChangeHeld before sending anything, unless
        ``guard`` is False (the user said to send it).
        """
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
            encrypted=folder.encrypted,
            hold_over=self.mass_change_percent if guard else None,
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
        self, peer_id: str, backup: NewBackup, *, progress: BytesCallback | None = None
    ) -> StoredBackup:
        """Store an archive at a peer (``backup_area``), after any other transfer to it."""
        return await self._with_peer(peer_id, None, backup_area.upload, backup, progress=progress)

    async def list_backups(self, peer_id: str) -> list[StoredBackup]:
        """The archives kept at a peer (not queued behind a transfer: it reads a listing)."""
        return await backup_area.listing(self.identity, self._target(self.peers[peer_id]))

    async def get_backup(self, peer_id: str, backup_id: str) -> StoredBackup:
        """One archive kept at a peer; BackupMissing if it is not there."""
        return await backup_area.get(self.identity, self._target(self.peers[peer_id]), backup_id)

    async def delete_backup(self, peer_id: str, backup_id: str) -> None:
        """Move one archive kept at a peer into the peer's trash."""
        await backup_area.delete(self.identity, self._target(self.peers[peer_id]), backup_id)

    def download_backup(self, peer_id: str, backup_id: str) -> AsyncGenerator[bytes]:
        """Yield the bytes of an archive kept at a peer (a download: not queued either).

        Close the generator (``contextlib.aclosing``) when leaving it early.
        """
        return backup_area.download(self.identity, self._target(self.peers[peer_id]), backup_id)

    async def list_folders(self, peer_id: str) -> Holdings:
        """The folders our space at a peer holds (``owner.holdings``): not queued either.

        Needs only our key: a node rebuilt after a fire, with no index, lists them too.
        """
        return await holdings(self.identity, self._target(self.peers[peer_id]))

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
        return await probe(self.identity, self._target(self.peers[peer_id]))

    def hosted(self) -> dict[str, JailUsage]:
        """Space each peer uses here, by peer id."""
        server = self.server
        return {
            peer.id: server.jail(peer.jail).usage()
            for peer in self.peers.values()
            if peer.jail in server.jail_names
        }

    async def hosted_trash(self, peer_id: str) -> dict[str, Any]:
        """What a peer's trash here holds (``Jail.trash_report``; walked in a worker thread)."""
        jail = self.server.jail(self.peers[peer_id].jail)
        return await asyncio.get_running_loop().run_in_executor(None, jail.trash_report)

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
