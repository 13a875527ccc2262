"""The node's SSH server: peers known by their pinned keys, each confined to its own jail.

One listening port serves three subsystems to an authenticated peer and nothing else: the
replication protocol (``protocol.SUBSYSTEM``), read-only SFTP on its own jail, and reverse
channels (``protocol.REVERSE_SUBSYSTEM``): a peer that cannot accept connections keeps a few
idle ones open here, and this node's pushes to it run over them (``take_reverse``). Shell, exec,
pty, X11, agent and every kind of forwarding are refused. A key that is not a configured
peer's is refused and its fingerprint remembered, so the UI can say "someone with key X tried
to connect"; repeated failures from one address are slowed down.

This module listens, authenticates, counts and slows down; what the replication subsystem
does with a peer's frames is ``session.ReplicationSession``'s job, SFTP ``sftp``'s.

All disk I/O happens in worker threads; run the server on an event loop of its own (the
Home Assistant integration does) so a slow USB disk never stalls anything else.

Memory: what a replication session holds of a peer's data (frames read and not yet on disk:
the PUT batch it fills, the batches being written, an upload's chunks) is taken from a byte
budget per session and one per peer (``Limits.session_bytes``, ``Limits.peer_bytes``) before
it is read; a session whose budget is spent stops reading its channel until its writes give
bytes back, and SSH flow control holds the peer back meanwhile. Outside the budgets, a session
holds at most one read buffer (``protocol.READ_SIZE``) and what asyncssh buffers for its
channel (about two SSH windows of 2 MiB at worst).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
import hashlib
import ipaddress
import logging
import time
from typing import Any, cast

import asyncssh
from asyncssh import SSHReader, SSHWriter

# Not exported by asyncssh: the one session class that runs its SFTP server for a session
# we accept ourselves (see _Session for why, and test_asyncssh_contract for what we rely on).
from asyncssh.stream import SSHServerStreamSession

from .. import ciphers, protocol
from ..identity import Identity
from .budget import ByteBudget
from .jail import Jail
from .limits import Limits
from .reach import PeerReach, SessionReach
from .session import ReplicationSession
from .sftp import ReadOnlySFTPServer
from .space import HostedSpace

_LOGGER = logging.getLogger(__name__)
# Packets peers may send us: 4 x asyncssh's 32 KiB default. Each packet costs the host a
# decrypt call, a copy and a Python-level dispatch; bigger ones halve its CPU per MiB.
_MAX_PACKET = 128 * 1024


@dataclass(frozen=True, slots=True)
class PeerGrant:
    """A peer this node serves: its jail name, its pinned public key, the quota we grant."""

    name: str
    public_key: str
    quota: int


@dataclass(slots=True)
class UnknownKey:
    """A key that tried to log in without being any peer's."""

    fingerprint: str
    public_key: str
    address: str
    attempts: int = 0
    last_seen: float = 0.0


@dataclass(slots=True)
class PeerState:
    """What the server knows about a peer's connections."""

    connections: int = 0
    last_seen: float | None = None


type EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class ReverseChannel:
    """An idle channel a peer opened to us to be served over (see ``take_reverse``)."""

    peer: str
    address: str
    reader: SSHReader[bytes]
    writer: SSHWriter[bytes]
    taken: asyncio.Future[None]


class NodeServer:
    """The SSH server of one node."""

    def __init__(
        self,
        identity: Identity,
        space: HostedSpace,
        peers: Iterable[PeerGrant] = (),
        *,
        limits: Limits | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        """Serve ``space``'s jails to ``peers``; ``on_event`` hears connects and intruders."""
        self.identity = identity
        self.space = space
        self.limits = limits or Limits()
        self.unknown_keys: dict[str, UnknownKey] = {}
        self.peer_state: dict[str, PeerState] = {}
        self._on_event = on_event
        self._grants: dict[str, PeerGrant] = {}
        self._jails: dict[str, Jail] = {}
        self._budgets: dict[str, ByteBudget] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._authorized: asyncssh.SSHAuthorizedKeys | None = None
        self._tokens: dict[str, str] = {}
        self._failures: dict[str, deque[float]] = {}
        self._unauthenticated = 0
        self._unauthenticated_from: dict[str, int] = {}
        self._connections: set[_Connection] = set()
        self._listener: asyncssh.SSHAcceptor | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._peers_to_apply = list(peers)
        # Where each peer says it can be reached (ANNOUNCE), and the checks dialed for it.
        self.reach = PeerReach(identity, self.limits, self._emit)
        # Idle reverse channels, by peer, oldest first; ``_reverse_ready`` wakes waiters.
        self._reverse: dict[str, deque[ReverseChannel]] = {}
        self._reverse_ready = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Prepare the jails and listen; raises OSError if the port is taken."""
        await self._in_thread(self.space.clean_tmp)
        await self.set_peers(self._peers_to_apply)
        if not ciphers.has_post_quantum():
            _LOGGER.warning(
                "This installation cannot do post-quantum key exchange (mlkem768x25519-sha256 "
                "needs a cryptography package built with OpenSSL 3.5 or later): connections "
                "use curve25519-sha256 only"
            )
        self._listener = await asyncssh.create_server(
            lambda: _Connection(self),
            host,
            port,
            server_host_keys=[self.identity.private_key],
            encoding=None,
            allow_pty=False,
            # No pty, no text: the line editor could never engage, but its wrapper would
            # still sit between every channel read and write and the session.
            line_editor=False,
            x11_forwarding=False,
            agent_forwarding=False,
            allow_scp=False,
            # Modern algorithms only (ciphers.py): hybrid post-quantum key exchange first,
            # Ed25519 host keys, AEAD ciphers.
            kex_algs=ciphers.key_exchange(),
            encryption_algs=ciphers.preferred(),
            mac_algs=ciphers.MAC_ALGS,
            signature_algs=ciphers.HOST_KEY_ALGS,
            login_timeout=self.limits.login_timeout,
            keepalive_interval=60,
            keepalive_count_max=3,
            max_pktsize=_MAX_PACKET,
        )
        self._maintenance = asyncio.create_task(self._maintain())

    @property
    def port(self) -> int:
        """The port actually listened on (useful when started on port 0)."""
        assert self._listener is not None
        return int(self._listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, drop every connection, and persist usage.

        Returns once every session has ended: nothing writes into the storage afterwards.
        """
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        # Before waiting for the listener: its wait_closed() waits for every connection.
        for conn in list(self._connections):
            conn.close()
        if listener is not None:
            await listener.wait_closed()
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
            self._maintenance = None
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self._in_thread(self.space.persist)

    async def set_peers(self, peers: Iterable[PeerGrant]) -> None:
        """Apply the list of peers: keys, quotas, jails. Removed peers are disconnected."""
        grants = {grant.name: grant for grant in peers}
        for name, grant in grants.items():
            if name not in self._jails:
                self._jails[name] = await self._in_thread(self.space.jail, name, grant.quota)
                self._budgets[name] = ByteBudget(self.limits.peer_bytes)
                self._ready[name] = asyncio.Event()
                self._track(asyncio.ensure_future(self._rescan(name)))
            else:
                self._jails[name].quota.limit = grant.quota
        for name in set(self._jails) - set(grants):
            del self._jails[name]
            # Sessions still running keep their reference until they end (they are cut).
            del self._budgets[name]
            self._ready.pop(name, None)
            self.reach.forget(name)
        self._grants = grants
        # Tokens, not names, go into the key options: names may hold any character. A token
        # stands for one name *and* one key, and is never given to another peer: a login that
        # began before this change (its key list taken then) cannot end in another jail, and
        # one with a replaced key ends nowhere.
        self._tokens = {_token(name, grant.public_key): name for name, grant in grants.items()}
        lines = [
            f'restrict,peer-id="{token}" {grants[name].public_key}'
            for token, name in self._tokens.items()
        ]
        self._authorized = (
            asyncssh.import_authorized_keys("\n".join(lines) + "\n") if lines else None
        )
        for conn in list(self._connections):
            if conn.peer is not None and conn.token not in self._tokens:
                conn.close()  # removed, or its key replaced (leaked?): cut it off now

    def jail(self, name: str) -> Jail:
        """Return a configured peer's jail."""
        return self._jails[name]

    @property
    def jail_names(self) -> frozenset[str]:
        """The jails of the configured peers."""
        return frozenset(self._jails)

    async def jail_ready(self, name: str) -> Jail:
        """Return a peer's jail once its usage has been recounted from disk."""
        await self._ready[name].wait()
        return self._jails[name]

    def session_reach(self, name: str, address: str) -> SessionReach:
        """ANNOUNCE and CHECK for a session of peer ``name`` that came from ``address``."""
        return SessionReach(self.reach, name, self._grants[name].public_key, address)

    async def serve(
        self, name: str, address: str, reader: protocol.BufferedReader, writer: SSHWriter[bytes]
    ) -> None:
        """Serve the replication protocol to peer ``name`` on a channel we opened to it.

        That is a reverse channel seen from the other end: we could not accept the peer's
        connection, so we connected to it (its key pinned) and serve it there, in its jail,
        with the same budgets, limits and ANNOUNCE/CHECK as any session.
        """
        task = asyncio.current_task()
        if task is not None:
            self._track(task)  # close() waits for the session to end its writes
        if name not in self._grants:
            return
        jail = await self.jail_ready(name)
        budget = ByteBudget(self.limits.session_bytes, self.peer_budget(name))
        reach = self.session_reach(name, address)
        await ReplicationSession(self.limits, jail, reader, writer, budget, reach).run()

    def has_reverse(self, name: str) -> bool:
        """Whether peer ``name`` keeps a connection here that offers reverse channels."""
        return any(conn.peer == name and conn.reverse for conn in self._connections)

    def reverse_waiting(self, name: str) -> int:
        """How many idle reverse channels peer ``name`` holds open here."""
        return len(self._reverse.get(name, ()))

    async def take_reverse(self, name: str, wait: float = 0.0) -> ReverseChannel | None:
        """Take one of peer ``name``'s idle reverse channels (waiting up to ``wait`` s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            slots = self._reverse.get(name)
            while slots:
                slot = slots.popleft()
                if not slot.taken.done() and not slot.writer.channel.is_closing():
                    slot.taken.set_result(None)
                    return slot
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._reverse_ready.clear()
            try:
                async with asyncio.timeout(left):
                    await self._reverse_ready.wait()
            except TimeoutError:
                return None

    async def _park(
        self, name: str, address: str, reader: SSHReader[bytes], writer: SSHWriter[bytes]
    ) -> None:
        """Hold a peer's reverse channel until we take it, or it closes."""
        slots = self._reverse.setdefault(name, deque())
        if len(slots) >= self.limits.reverse_slots_per_peer:
            return  # the channel closes: enough of them wait already
        slot = ReverseChannel(
            name, address, reader, writer, asyncio.get_running_loop().create_future()
        )
        slots.append(slot)
        self._reverse_ready.set()
        closed = asyncio.ensure_future(writer.channel.wait_closed())
        try:
            await asyncio.wait([slot.taken, closed], return_when=asyncio.FIRST_COMPLETED)
            if slot.taken.done():
                await closed  # the link that took it ends by closing it
        finally:
            closed.cancel()
            if slot in slots:
                slots.remove(slot)

    def peer_budget(self, name: str) -> ByteBudget:
        """Return the budget that all replication sessions of a configured peer share."""
        return self._budgets[name]

    # --- internals -------------------------------------------------------------------------

    async def _rescan(self, name: str) -> None:
        try:
            await self._in_thread(self.space.rescan, name)
        except OSError:
            _LOGGER.exception("Could not recount the space used by %s", name)
        finally:
            event = self._ready.get(name)
            if event is not None:
                event.set()

    async def _maintain(self) -> None:
        """Persist usage every minute and purge expired trash every hour (``Limits``)."""
        last_purge = 0.0
        while True:
            await asyncio.sleep(self.limits.persist_every)
            try:
                if time.monotonic() - last_purge >= self.limits.purge_every:
                    freed = await self._in_thread_to_the_end(self.space.purge)
                    last_purge = time.monotonic()
                    if freed:
                        _LOGGER.info("Purged %d bytes of expired trash", freed)
                await self._in_thread_to_the_end(self.space.persist)
            except OSError:
                _LOGGER.exception("Storage maintenance failed")

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def _in_thread[T](self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    async def _in_thread_to_the_end[T](self, func: Callable[..., T], *args: Any) -> T:
        """``_in_thread`` for work that close() must wait for, even if its caller is cancelled.

        Cancelling the caller does not stop a thread: without this, close() could return
        while a purge still deletes files.
        """
        future = asyncio.get_running_loop().run_in_executor(None, func, *args)
        self._track(future)
        return await asyncio.shield(future)

    def _emit(self, kind: str, **data: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:
                _LOGGER.exception("Event callback failed")

    def _login_delay(self, address: str) -> float:
        window = self._failures.get(_source(address))
        if not window:
            return 0.0
        cutoff = time.monotonic() - 600
        while window and window[0] < cutoff:
            window.popleft()
        excess = len(window) - self.limits.free_failures
        return 0.0 if excess < 0 else min(self.limits.max_delay, 0.5 * 2**excess)

    def _record_failure(self, address: str) -> None:
        source = _source(address)
        # Most recent last; the table is bounded (sources are as many as an attacker has
        # addresses): the source that failed longest ago is forgotten first.
        window = self._failures.pop(source, None) or deque(maxlen=64)
        window.append(time.monotonic())
        self._failures[source] = window
        while len(self._failures) > _MAX_SOURCES:
            del self._failures[next(iter(self._failures))]

    def _record_unknown_key(self, key: asyncssh.SSHKey, address: str) -> None:
        fingerprint = key.get_fingerprint("sha256")
        seen = self.unknown_keys.get(fingerprint)
        if seen is None:
            public = key.export_public_key("openssh").decode().split()
            seen = UnknownKey(fingerprint, " ".join(public[:2]), address)
            self.unknown_keys[fingerprint] = seen
            # Bounded: a flood of fresh keys must not grow memory without end.
            while len(self.unknown_keys) > 100:
                del self.unknown_keys[next(iter(self.unknown_keys))]
        seen.attempts += 1
        seen.last_seen = time.time()
        seen.address = address
        if seen.attempts == 1:
            _LOGGER.warning("Refused unknown key %s from %s", fingerprint, address)
            self._emit("unknown_key", fingerprint=fingerprint, address=address)


class _Connection(asyncssh.SSHServer):
    """One incoming SSH connection."""

    def __init__(self, server: NodeServer) -> None:
        self._server = server
        self._conn: asyncssh.SSHServerConnection | None = None
        self.address = "?"
        self.peer: str | None = None
        self.token: str | None = None
        self._sessions = 0
        self.reverse = False  # it offered reverse channels
        self._auth_attempts = 0
        self._counted_unauthenticated = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        server = self._server
        server._connections.add(self)
        source = _source(self.address)
        from_source = server._unauthenticated_from.get(source, 0)
        if (
            server._unauthenticated >= server.limits.unauthenticated_connections
            or from_source >= server.limits.unauthenticated_per_address
        ):
            _LOGGER.warning("Too many connections still logging in; dropping %s", self.address)
            conn.close()
            return
        server._unauthenticated += 1
        server._unauthenticated_from[source] = from_source + 1
        self._counted_unauthenticated = True

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        server._connections.discard(self)
        self._leave_unauthenticated()
        if self.peer is None:
            server._record_failure(self.address)
        else:
            state = server.peer_state.setdefault(self.peer, PeerState())
            state.connections = max(0, state.connections - 1)
            state.last_seen = time.time()
            server._emit("peer_disconnected", peer=self.peer, address=self.address)

    def _leave_unauthenticated(self) -> None:
        if self._counted_unauthenticated:
            server = self._server
            server._unauthenticated -= 1
            source = _source(self.address)
            server._unauthenticated_from[source] -= 1
            if not server._unauthenticated_from[source]:
                del server._unauthenticated_from[source]
            self._counted_unauthenticated = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    async def begin_auth(self, username: str) -> bool:
        delay = self._server._login_delay(self.address)
        if delay:
            await asyncio.sleep(delay)
        assert self._conn is not None
        self._conn.set_authorized_keys(self._server._authorized or _NO_KEYS)
        # True means "authentication is required"; False would let the client in unchecked.
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Only reached for keys missing from the authorized list (and for unsigned probes):
        # remember the attempt, grant nothing.
        self._server._record_unknown_key(key, self.address)
        self._auth_attempts += 1
        if self._auth_attempts >= self._server.limits.auth_attempts and self._conn is not None:
            # Key after key in one connection would dodge the per-connection slow-down.
            self._conn.close()
        return False

    def auth_completed(self) -> None:
        assert self._conn is not None
        self._leave_unauthenticated()
        # Unknown options come back as the list of their values.
        tokens = self._conn.get_key_option("peer-id")
        token = tokens[0] if isinstance(tokens, list) and len(tokens) == 1 else None
        name = self._server._tokens.get(str(token)) if token else None
        if name is None or name not in self._server._grants:
            self._conn.close()
            return
        self.token = str(token)
        state = self._server.peer_state.setdefault(name, PeerState())
        if state.connections >= self._server.limits.connections_per_peer:
            _LOGGER.warning("%s has too many connections open; dropping one", name)
            self._conn.close()
            return
        state.connections += 1
        state.last_seen = time.time()
        self.peer = name
        self._server._emit("peer_connected", peer=name, address=self.address)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        server = self._server
        if self.peer is None or self._sessions >= server.limits.sessions_per_connection:
            return False
        self._sessions += 1
        peer, address = self.peer, self.address

        async def replicate(stdin: SSHReader[bytes], stdout: SSHWriter[bytes], _: Any) -> None:
            task = asyncio.current_task()
            if task is not None:
                server._track(task)  # close() waits for the session to end its writes
            try:
                if stdout.channel.get_subsystem() == protocol.REVERSE_SUBSYSTEM:
                    self.reverse = True
                    await server._park(peer, address, stdin, stdout)
                    return
                jail = await server.jail_ready(peer)
                budget = ByteBudget(server.limits.session_bytes, server.peer_budget(peer))
                reach = server.session_reach(peer, address)
                await ReplicationSession(server.limits, jail, stdin, stdout, budget, reach).run()
            finally:
                cast(asyncssh.SSHServerChannel[bytes], stdout.channel).exit(0)

        def sftp(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
            return ReadOnlySFTPServer(chan, server.jail(peer))

        return _Session(replicate, sftp, self._session_ended)

    def _session_ended(self) -> None:
        self._sessions -= 1


_NO_KEYS = asyncssh.import_authorized_keys("")
# Sources whose failed logins are remembered (each a few hundred bytes).
_MAX_SOURCES = 4096


def _source(address: str) -> str:
    """Where logins are counted from: an IPv4 address, or an IPv6 /64 (one site's range)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _token(name: str, public_key: str) -> str:
    """Return the key option that identifies this peer with this key (see ``set_peers``)."""
    key = " ".join(public_key.split()[:2])  # the comment is no part of the key
    return hashlib.sha256(f"{name}\n{key}".encode()).hexdigest()[:32]


class _Session(SSHServerStreamSession[bytes]):
    """A session that offers exactly our three subsystems and nothing else.

    asyncssh's public choices do not fit: with a ``process_factory`` or ``session_factory``
    on ``create_server``, ``session_requested`` is never called (no per-connection limit),
    shell and exec requests are accepted before the handler can refuse them, and nothing
    lets SFTP requests wait for the answers to drain. So this subclasses the (unexported)
    session that asyncssh itself makes for ``session_factory`` and ``sftp_factory``, using
    only what ``tests/engine/host/test_asyncssh_contract.py`` pins: its keyword arguments,
    the public ``SSHServerSession`` callbacks, and ``read``/``drain``, through which
    ``SSHReader`` reads.
    """

    def __init__(
        self,
        replicate: Callable[[SSHReader[bytes], SSHWriter[bytes], Any], Awaitable[None]],
        sftp: Callable[[asyncssh.SSHServerChannel[bytes]], asyncssh.SFTPServer],
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(
            session_factory=cast(Any, replicate),
            sftp_factory=cast(Any, sftp),
            sftp_version=3,
            allow_scp=False,
        )
        self._on_close: Callable[[], None] | None = on_close
        self._subsystem: str | None = None
        self._sftp = False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Every session gives its slot back when its channel closes, whatever it was: SFTP,
        # replication, or a refused exec/shell/subsystem request.
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    async def read(self, datatype: int | None, n: int = -1, exact: bool = False) -> bytes:
        """Hand the next bytes of a request to the subsystem (SFTP: once its answers flow).

        asyncssh's SFTP server writes each answer without waiting for the peer to take it,
        and a READ of 30 bytes asks for up to 1 MiB: a peer that sends requests and never
        reads the answers would make the host buffer gigabytes. So an SFTP request is taken
        only when what was written before has drained. (The replication session drains
        after every frame itself.)
        """
        if self._sftp:
            await self.drain(datatype)
        return await super().read(datatype, n, exact)

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        # One subsystem per channel: asyncssh would start a second handler on the same
        # channel, and each SFTP handler has its own handle limit (descriptor exhaustion).
        if self._subsystem is not None:
            return False
        if subsystem not in ("sftp", protocol.SUBSYSTEM, protocol.REVERSE_SUBSYSTEM):
            return False
        self._subsystem = subsystem
        self._sftp = subsystem == "sftp"
        return True

    def pty_requested(self, *_args: Any) -> bool:
        return False
