"""The node's SSH server: peers known by their pinned keys, each confined to its own jail.

One listening port serves two subsystems to an authenticated peer and nothing else: the
replication protocol (``protocol.SUBSYSTEM``) and read-only SFTP on its own jail. Shell, exec,
pty, X11, agent and every kind of forwarding are refused. A key that is not a configured
peer's is refused and its fingerprint remembered, so the UI can say "someone with key X tried
to connect"; repeated failures from one address are slowed down.

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
from collections.abc import Awaitable, Callable, Iterable, Iterator
import dataclasses
from dataclasses import dataclass, field
import hashlib
import ipaddress
import itertools
import logging
import os
import time
from typing import Any, ClassVar, cast

import asyncssh
from asyncssh.session import DataType
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from . import ciphers, protocol
from .budget import ByteBudget
from .errors import MyNasError, PathRefused, PeerDiskFull, ProtocolError, QuotaExceeded
from .identity import Identity
from .protocol import FailCode, Frame
from .sftp import ReadOnlySFTPServer
from .storage import HostedSpace, IncomingFile, Jail, Upload, charge
from .tree import Entry, Kind

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


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer can make this node hold in memory or open at once."""

    connections_per_peer: int = 4
    sessions_per_connection: int = 4
    unauthenticated_connections: int = 32
    # ...of which one address (an IPv6 /64) may hold: one host cannot lock everyone out.
    unauthenticated_per_address: int = 8
    login_timeout: float = 30.0
    hello_timeout: float = 30.0
    # A batch of small files goes to the disk at this many files or bytes...
    batch_files: int = 512
    batch_bytes: int = 4 * 1024 * 1024
    # ...or once it is this old, or the channel has been silent this long, when no whole
    # frame is waiting: a slow link still gets its acknowledgements every fraction of a
    # second, a fast one fills whole batches.
    batch_age: float = 0.2
    batch_idle: float = 0.05
    batches_in_flight: int = 2
    # An upload's chunks go to its file in groups of about this size (one thread hop each).
    upload_group: int = 1024 * 1024
    # Bytes of a peer's data held in memory (read, not yet on disk): per session, and for
    # all sessions of one peer together. Each must hold a batch and the largest frame.
    session_bytes: int = 16 * 1024 * 1024
    peer_bytes: int = 32 * 1024 * 1024
    # Failed logins from one address before each new attempt waits, doubling up to a cap.
    free_failures: int = 5
    max_delay: float = 30.0
    # Unknown keys one connection may offer before it is cut off (sshd's MaxAuthTries).
    auth_attempts: int = 6


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

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Prepare the jails and listen; raises OSError if the port is taken."""
        await self._in_thread(self.space.clean_tmp)
        await self.set_peers(self._peers_to_apply)
        self._listener = await asyncssh.create_server(
            lambda: _Connection(self),
            host,
            port,
            server_host_keys=[self.identity.private_key],
            encoding=None,
            allow_pty=False,
            x11_forwarding=False,
            agent_forwarding=False,
            allow_scp=False,
            encryption_algs=ciphers.preferred(),
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
        """Persist usage every minute and purge expired trash every hour."""
        last_purge = 0.0
        while True:
            await asyncio.sleep(60)
            try:
                if time.monotonic() - last_purge >= 3600:
                    freed = await self._in_thread(self.space.purge)
                    last_purge = time.monotonic()
                    if freed:
                        _LOGGER.info("Purged %d bytes of expired trash", freed)
                await self._in_thread(self.space.persist)
            except OSError:
                _LOGGER.exception("Storage maintenance failed")

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def _in_thread[T](self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

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
        peer = self.peer

        async def replicate(stdin: SSHReader[bytes], stdout: SSHWriter[bytes], _: Any) -> None:
            task = asyncio.current_task()
            if task is not None:
                server._track(task)  # close() waits for the session to end its writes
            try:
                jail = await server.jail_ready(peer)
                budget = ByteBudget(server.limits.session_bytes, server.peer_budget(peer))
                await _ReplicationSession(server, jail, stdin, stdout, budget).run()
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
    """A session that offers exactly two subsystems and nothing else."""

    def __init__(
        self,
        replicate: Callable[[SSHReader[bytes], SSHWriter[bytes], Any], Awaitable[None]],
        sftp: Callable[[asyncssh.SSHServerChannel[bytes]], asyncssh.SFTPServer],
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(cast(Any, replicate), cast(Any, sftp), 3, False)
        self._on_close: Callable[[], None] | None = on_close

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Every session gives its slot back when its channel closes, whatever it was: SFTP,
        # replication, or a refused exec/shell/subsystem request.
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    async def read(self, datatype: DataType, n: int = -1, exact: bool = False) -> bytes:
        """Hand the next bytes of a request to the subsystem (SFTP: once its answers flow).

        asyncssh's SFTP server writes each answer without waiting for the peer to take it,
        and a READ of 30 bytes asks for up to 1 MiB: a peer that sends requests and never
        reads the answers would make the host buffer gigabytes. So an SFTP request is taken
        only when what was written before has drained. (The replication session drains
        after every frame itself.)
        """
        assert self._chan is not None
        if self._chan.get_subsystem() == "sftp":
            await self.drain(datatype)
        return await super().read(datatype, n, exact)

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem in ("sftp", protocol.SUBSYSTEM)

    def pty_requested(self, *_args: Any) -> bool:
        return False


# Requests on paths that are answered in groups (see _ReplicationSession._ops).
_OPS = frozenset({Frame.DELETE, Frame.MKDIR, Frame.UTIME})
_MAX_OPS = 256
type _Op = tuple[int, Callable[..., object], tuple[Any, ...]]

# What one frame held in memory costs beyond its body (the bytes object, a memoryview, a
# batch entry): charged with the body, so that a flood of tiny frames is bounded too.
_FRAME_COST = 512


def _cost(body: bytes) -> int:
    return len(body) + _FRAME_COST


@dataclass(slots=True)
class _Batch:
    items: list[tuple[int, IncomingFile]] = field(default_factory=list)
    size: int = 0  # bytes of file data
    held: int = 0  # bytes of the session's budget its frames hold
    started: float = 0.0  # event loop time of its first file


@dataclass(slots=True)
class _OpenUpload:
    req: int
    upload: Upload
    chunks: list[memoryview] = field(default_factory=list)
    held: int = 0  # budget bytes of the chunks not yet handed to the writer
    writer: asyncio.Task[None] | None = None
    error: BaseException | None = None


class _ReplicationSession:
    """Serves the replication protocol to one authenticated peer on one channel."""

    def __init__(
        self,
        server: NodeServer,
        jail: Jail,
        reader: SSHReader[bytes],
        writer: SSHWriter[bytes],
        budget: ByteBudget,
    ) -> None:
        self._server = server
        self._limits = server.limits
        self._jail = jail
        self._frames = protocol.FrameReader(reader, charge=self._charge)
        self._writer = writer
        self._budget = budget
        self._batch = _Batch()
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self._upload: _OpenUpload | None = None
        self._written = False  # frames were written since the last drain
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        try:
            await self._handshake()
            while True:
                if self._batch.items and not self._frames.ready():
                    await self._wait_or_submit()
                try:
                    kind, body = await self._frames.read_frame()
                except asyncio.IncompleteReadError:
                    break
                await self._dispatch(kind, body)
            await self._flush()
        except ProtocolError as err:
            _LOGGER.warning("%s broke the protocol: %s", self._jail.name, err)
        except TimeoutError, asyncssh.Error, ConnectionError, BrokenPipeError:
            pass
        finally:
            await self._teardown()

    async def _wait_or_submit(self) -> None:
        """No whole frame at hand while a batch waits: let it grow only while data flows.

        The batch goes to the disk once it is ``batch_age`` old, or when the channel has
        brought nothing for ``batch_idle``: on a slow link (or while the peer pauses) its
        files are acknowledged promptly instead of waiting for a full batch.
        """
        frames = self._frames
        # (Past one read's worth, the rest of a big frame is read in one piece.)
        while not frames.ready() and not frames.ended and frames.buffered < protocol.READ_SIZE:
            age_left = self._batch.started + self._limits.batch_age - self._loop.time()
            if age_left <= 0:
                break
            try:
                async with asyncio.timeout(min(age_left, self._limits.batch_idle)):
                    await frames.fill()
            except TimeoutError:
                break
        else:
            return  # a frame (or the end of the stream) is here: the batch may still grow
        await self._submit()

    async def _charge(self, size: int) -> None:
        """Take a frame's bytes from the budget before reading it (FrameReader's hook)."""
        cost = size + _FRAME_COST
        if not self._budget.try_take(cost):
            # Before waiting, everything held must be on its way to the disk: the bytes
            # given back then are what the wait is for (see budget.py).
            await self._submit()
            self._write_chunks()
            await self._budget.take(cost)

    async def _handshake(self) -> None:
        kind, body = await asyncio.wait_for(self._frames.read_frame(), self._limits.hello_timeout)
        self._budget.give(_cost(body))
        if kind is not Frame.HELLO:
            raise ProtocolError("expected HELLO")
        self._writer.write(protocol.welcome(self._welcome()))

    def _welcome(self) -> dict[str, Any]:
        usage = self._jail.usage()
        return {
            "protocol": protocol.VERSION,
            "peer": self._jail.name,
            "quota": usage.quota,
            "used": usage.used,
            "chunk": protocol.CHUNK,
            "batch_bytes": self._limits.batch_bytes,
        }

    async def _teardown(self) -> None:
        # Data not yet handed to the disk is dropped (the client never got an OK for it):
        # give its reservations back. Batches already being written complete.
        _release(self._jail, self._batch)
        self._batch = _Batch()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._upload is not None:
            state = self._upload
            self._upload = None
            state.chunks.clear()  # never written: the partial ends where the disk has it
            # Never cancelled: a write running in a worker thread would go on while
            # abandon() closes its file. The writer ends after the chunks it holds.
            if state.writer is not None:
                await asyncio.gather(asyncio.shield(state.writer), return_exceptions=True)
            await self._thread(state.upload.abandon)
        self._budget.close()  # whatever is still held goes back to the peer's budget

    async def _thread[T](self, func: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(None, func, *args)

    def _send(self, data: bytes) -> None:
        self._writer.write(data)
        self._written = True

    def _send_error(self, req: int, err: BaseException) -> None:
        self._send(_failure(req, err))

    async def _dispatch(self, kind: Frame, body: bytes) -> None:
        if kind is Frame.PUT:
            await self._put(body)
        elif kind is Frame.DATA:
            self._data(body)
        else:
            self._budget.give(_cost(body))  # nothing of these bodies is kept
            if self._upload is not None and kind is not Frame.CLOSE:
                raise ProtocolError(f"{kind.name} while an upload is open")
            handler = self._handlers.get(kind)
            if handler is None and kind not in _OPS:
                raise ProtocolError(f"unexpected {kind.name}")
            await self._flush()
            if handler is None:
                await self._ops(kind, body)
            else:
                await handler(self, body)
        if self._written:
            # Bound what the writer holds: a peer that never reads its answers gets paused.
            self._written = False
            await self._writer.drain()

    # --- the batched path ------------------------------------------------------------------

    async def _put(self, body: bytes) -> None:
        # The path is checked (syntax and disk) by write_batch, in a worker thread.
        request = protocol.parse_put(body)
        try:
            self._jail.quota.reserve(charge(len(request.data)))
        except QuotaExceeded as err:
            self._budget.give(_cost(body))
            self._send_error(request.req, err)
            return
        batch = self._batch
        if not batch.items:
            batch.started = self._loop.time()
        item = IncomingFile(request.path, request.data, request.mtime_ns, request.mode)
        batch.items.append((request.req, item))
        batch.size += len(request.data)
        batch.held += _cost(body)
        if len(batch.items) >= self._limits.batch_files or batch.size >= self._limits.batch_bytes:
            await self._submit()

    async def _submit(self) -> None:
        if not self._batch.items:
            return
        batch, self._batch = self._batch, _Batch()
        try:
            while len(self._in_flight) >= self._limits.batches_in_flight:
                await self._in_flight.popleft()
        except BaseException:
            _release(self._jail, batch)  # never handed to the disk: free its reservations
            raise
        self._in_flight.append(asyncio.create_task(self._write(batch)))

    async def _write(self, batch: _Batch) -> None:
        files = [item for _, item in batch.items]
        results: list[BaseException | None]
        try:
            results = list(await self._thread(self._jail.write_batch, files))
        except Exception as err:  # every file of the batch must be answered
            _LOGGER.exception("Writing a batch for %s failed", self._jail.name)
            results = [err] * len(files)
        finally:
            self._budget.give(batch.held)
        done = [
            req for (req, _), result in zip(batch.items, results, strict=True) if result is None
        ]
        try:
            if done:
                self._send(protocol.ok(*done))
            for (req, _), result in zip(batch.items, results, strict=True):
                if result is not None:
                    self._send_error(req, result)
        except ConnectionError, asyncssh.Error:
            pass  # the peer is gone: it hears nothing, and its next run finds these files

    async def _flush(self) -> None:
        await self._submit()
        while self._in_flight:
            await self._in_flight.popleft()

    # --- large files ---------------------------------------------------------------------

    async def _open(self, body: bytes) -> None:
        request = protocol.parse_open(body)
        try:
            upload = await self._thread(
                self._jail.begin_upload, request.path, request.size, request.mtime_ns, request.mode
            )
        except (MyNasError, OSError) as err:
            self._send_error(request.req, err)
            return
        self._upload = _OpenUpload(request.req, upload)
        self._send(protocol.offset(request.req, upload.offset))

    def _data(self, body: bytes) -> None:
        req, chunk = protocol.parse_data(body)
        state = self._upload
        if state is None or state.req != req:
            raise ProtocolError("DATA for no open upload")
        state.chunks.append(chunk)
        state.held += _cost(body)
        if state.held >= self._limits.upload_group:
            self._write_chunks()

    def _write_chunks(self) -> None:
        """Start writing the open upload's chunks in a worker thread, if it is not already."""
        state = self._upload
        if state is not None and state.chunks and state.writer is None:
            state.writer = asyncio.create_task(self._writing(state))

    async def _writing(self, state: _OpenUpload) -> None:
        """Write the chunks in order, all that came meanwhile in each thread hop."""
        try:
            while state.chunks:
                chunks, held = state.chunks, state.held
                state.chunks, state.held = [], 0
                try:
                    if state.error is None:
                        await self._thread(state.upload.write_many, chunks)
                except (MyNasError, OSError) as err:
                    state.error = err
                finally:
                    self._budget.give(held)
        finally:
            state.writer = None

    async def _close(self, body: bytes) -> None:
        req, how = protocol.parse_close(body)
        state = self._upload
        if state is None or state.req != req:
            raise ProtocolError("CLOSE for no open upload")
        self._write_chunks()
        if state.writer is not None:
            await asyncio.shield(state.writer)  # see _teardown: never cancelled mid-write
        self._upload = None
        upload = state.upload
        try:
            if state.error is not None:
                await self._thread(upload.discard)
                raise state.error
            if how is protocol.Close.FINISH:
                await self._thread(_finish_or_keep, upload)
            elif how is protocol.Close.ABANDON:
                await self._thread(upload.abandon)
            else:
                await self._thread(upload.discard)
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.ok(req))

    # --- single operations -----------------------------------------------------------------

    async def _simple(self, req: int, func: Callable[..., object], *args: Any) -> None:
        try:
            await self._thread(func, *args)
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
        else:
            self._send(protocol.ok(req))

    def _parse_op(self, kind: Frame, body: bytes) -> _Op:
        if kind is Frame.DELETE:
            req, path = protocol.parse_path(body)
            return req, self._jail.delete, (path,)
        req, mtime_ns, path = protocol.parse_time(body)
        if kind is Frame.MKDIR:
            return req, self._jail.make_dir, (path, None if mtime_ns < 0 else mtime_ns)
        return req, self._jail.set_mtime, (path, mtime_ns)

    async def _ops(self, kind: Frame, body: bytes) -> None:
        """DELETE, MKDIR, UTIME: this one and those right behind it, in one thread hop.

        A push ends with a MKDIR per directory and a cleanup sends DELETE after DELETE:
        one hop (and one syncfs, so that a move into the trash is durable before its OK)
        for each group instead of one hop per request. Only frames already read are taken,
        in order, so nothing waits for more to come.
        """
        ops = [self._parse_op(kind, body)]
        broken: ProtocolError | None = None
        while len(ops) < _MAX_OPS and self._frames.peek() in _OPS:
            kind, body = await self._frames.read_frame()  # whole and small: no wait
            self._budget.give(_cost(body))
            try:
                ops.append(self._parse_op(kind, body))
            except ProtocolError as err:
                broken = err  # answer those before it, then end the session
                break
        results = await self._thread(_run_ops, self._jail, ops)
        done = [req for (req, _, _), result in zip(ops, results, strict=True) if result is None]
        if done:
            self._send(protocol.ok(*done))
        for (req, _, _), result in zip(ops, results, strict=True):
            if result is not None:
                self._send_error(req, result)
        if broken is not None:
            raise broken

    async def _sync(self, body: bytes) -> None:
        self._send(protocol.ok(protocol.request_id(body)))

    async def _query(self, body: bytes) -> None:
        req, request = protocol.parse_query(body)
        op = request.get("op")
        if op == "usage":
            usage = self._jail.usage()
            disk = await self._thread(_disk_free, self._jail.root)
            self._send(
                protocol.reply(
                    req,
                    {"used": usage.used, "quota": usage.quota, "disk_free": disk},
                )
            )
        elif op == "retention":
            folder, days = request.get("folder"), request.get("days")
            if not isinstance(folder, str) or not isinstance(days, int):
                raise ProtocolError("retention needs a folder name and a number of days")
            await self._simple(req, self._jail.set_retention, folder, days)
        else:
            raise ProtocolError(f"unknown query {op!r}")

    # --- streams from the host -------------------------------------------------------------

    async def _list(self, body: bytes) -> None:
        req, with_hash, path = protocol.parse_list(body)
        entries = self._jail.list(path) if path else self._jail.list()
        source = _Chunks(entries, with_hash, self._jail)
        try:
            while chunk := await self._thread(source.next_chunk):
                for item, digest in chunk:
                    self._send(protocol.entry(req, item, digest))
                await self._writer.drain()
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.done(req))

    async def _read(self, body: bytes) -> None:
        req, path = protocol.parse_path(body)
        try:
            reader = await self._thread(_TreeReader, self._jail, path)
            while chunk := await self._thread(reader.next_chunk):
                for item, content in chunk:
                    self._send(protocol.entry(req, item))
                    if content is not None:
                        for start in range(0, len(content), protocol.CHUNK):
                            self._send(protocol.data(req, content[start : start + protocol.CHUNK]))
                    elif item.kind is Kind.FILE:
                        await self._stream_large(req, item)
                    await self._writer.drain()
        except (MyNasError, OSError) as err:
            self._send_error(req, err)
            return
        self._send(protocol.done(req))

    async def _stream_large(self, req: int, item: Entry) -> None:
        fd = await self._thread(self._jail.open_read, item.path)
        try:
            remaining = item.size
            position = 0
            while remaining > 0:
                piece = await self._thread(os.pread, fd, min(protocol.CHUNK, remaining), position)
                if not piece:
                    raise MyNasError(f"{item.path!r} shrank while being read")
                self._send(protocol.data(req, piece))
                position += len(piece)
                remaining -= len(piece)
                await self._writer.drain()
        finally:
            os.close(fd)

    _handlers: ClassVar[dict[Frame, Callable[[_ReplicationSession, bytes], Awaitable[None]]]] = {
        Frame.OPEN: _open,
        Frame.CLOSE: _close,
        Frame.SYNC: _sync,
        Frame.QUERY: _query,
        Frame.LIST: _list,
        Frame.READ: _read,
    }


def _run_ops(jail: Jail, ops: list[_Op]) -> list[BaseException | None]:
    """Carry out DELETE/MKDIR/UTIME requests in order; make them durable; one result each."""
    results: list[BaseException | None] = []
    for _, func, args in ops:
        try:
            func(*args)
        except (MyNasError, OSError) as err:
            results.append(err)
        else:
            results.append(None)
    if any(result is None for result in results):
        try:
            jail.sync()  # a move into the trash is a rename: durable before its OK
        except OSError as err:
            results = [err if result is None else result for result in results]
    return results


def _finish_or_keep(upload: Upload) -> None:
    """Finish an upload; if it cannot be (bytes missing, disk error), keep it for a resume.

    A failed finish leaves the upload open: ending it here frees its file descriptor, its
    upload slot and its reservation, which would otherwise stay held until a restart.
    """
    try:
        upload.finish()
    except BaseException:
        upload.abandon()
        raise


def _release(jail: Jail, batch: _Batch) -> None:
    """Give back the quota reservations of a batch that will never be written.

    (Its budget bytes go back when the session's budget is closed.)
    """
    for _, item in batch.items:
        jail.quota.release(charge(len(item.data)))


def _failure(req: int, err: BaseException) -> bytes:
    """Encode the FAIL frame that tells the client what went wrong."""
    if isinstance(err, QuotaExceeded):
        return protocol.fail(
            req, FailCode.QUOTA, str(err), needed=err.needed, available=err.available
        )
    if isinstance(err, PeerDiskFull):
        return protocol.fail(req, FailCode.DISK_FULL, str(err))
    if isinstance(err, PathRefused):
        return protocol.fail(req, FailCode.PATH, str(err))
    if isinstance(err, FileNotFoundError):
        return protocol.fail(req, FailCode.MISSING, "no such file or directory")
    if isinstance(err, OSError):
        return protocol.fail(req, FailCode.IO, err.strerror or str(err))
    return protocol.fail(req, FailCode.IO, str(err))


def _disk_free(path: str | os.PathLike[str]) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class _Chunks:
    """Pulls a listing from a worker thread a few hundred entries (and hashes) at a time."""

    def __init__(self, entries: Iterator[Entry], with_hash: bool, jail: Jail) -> None:
        self._entries = entries
        self._with_hash = with_hash
        self._jail = jail

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        hashed = 0
        for item in self._entries:
            digest = None
            if self._with_hash and item.kind is Kind.FILE:
                digest = self._jail.hash_file(item.path)
                hashed += item.size
            chunk.append((item, digest))
            if len(chunk) >= 512 or hashed >= 32 * 1024 * 1024:
                break
        return chunk


class _TreeReader:
    """Reads a file or a tree for READ: small files whole, in groups, from a worker thread."""

    SMALL = 1024 * 1024

    def __init__(self, jail: Jail, path: bytes) -> None:
        self._jail = jail
        top = jail.stat(path)
        # The tree's own directory comes first, so its mtime can be restored too.
        self._entries = itertools.chain([top], jail.list(path) if top.kind is Kind.DIR else ())

    def next_chunk(self) -> list[tuple[Entry, bytes | None]]:
        chunk: list[tuple[Entry, bytes | None]] = []
        size = 0
        for listed in self._entries:
            item, content = listed, None
            if item.kind is Kind.FILE and item.size <= self.SMALL:
                content = self._read_small(item)
                # The entry announces exactly the bytes that follow, even if the file moved on.
                item = dataclasses.replace(item, size=len(content))
                size += len(content)
            chunk.append((item, content))
            if item.kind is Kind.FILE and content is None:
                break  # a large file: the session streams it before the next chunk
            if len(chunk) >= 256 or size >= 4 * 1024 * 1024:
                break
        return chunk

    def _read_small(self, item: Entry) -> bytes:
        fd = self._jail.open_read(item.path)
        try:
            return os.read(fd, self.SMALL)
        finally:
            os.close(fd)
