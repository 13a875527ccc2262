"""One-sided pairs: a node that cannot accept connections keeps one open to its peer.

Behind carrier-grade NAT (or a router nobody can configure) a node can still connect out.
So it does, to each peer, and keeps that connection up (reconnecting with back-off). On it
it opens a few idle channels of the reverse subsystem (``protocol.REVERSE_SUBSYSTEM``); the
peer's server holds them (``NodeServer.take_reverse``), and when the peer wants to push,
verify or restore, it speaks first on one of them and we *serve* the replication protocol
there, in its jail, exactly as if it had connected to us (``NodeServer.serve``).

Why channels inside our connection, rather than SSH port forwarding or SSH inside SSH:

- both keys are pinned as always: we connected with the peer's host key pinned, and it let
  us in by our pinned key; a channel of that connection can only be between the two of us;
- no listener appears anywhere (remote forwarding would open a port on the peer's machine,
  and forwarding is refused by our server: invariant 2), nothing is encrypted twice;
- the peer's side is an ordinary ``PeerLink`` (``client.over_channel``): push, restore and
  verify run over it unchanged.

When a channel is taken we open another one at once, so the peer always finds one idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
import contextlib
from dataclasses import KW_ONLY, dataclass, field
import logging

import asyncssh

from . import protocol
from .errors import HostKeyMismatch, MyNasError
from .identity import Identity
from .owner import client

_LOGGER = logging.getLogger(__name__)

# Idle channels kept open on the connection (the peer's server holds up to
# ``Limits.reverse_slots_per_peer``).
IDLE_CHANNELS = 2
# Reconnecting waits this long after a failure, doubling up to the cap (seconds).
FIRST_DELAY = 1.0
MAX_DELAY = 300.0
# A connection that stayed up this long (seconds) was a good one: back-off starts over.
STABLE = 60.0

type Serve = Callable[[protocol.BufferedReader, asyncssh.SSHWriter[bytes]], Awaitable[None]]


class Prefixed:
    """A channel's reader with the bytes already read from it put back in front."""

    def __init__(self, first: bytes, reader: asyncssh.SSHReader[bytes]) -> None:
        self._first = first
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        """Return what was put back first, then what the channel brings."""
        if self._first:
            if n < 0 or n >= len(self._first):
                data, self._first = self._first, b""
            else:
                data, self._first = self._first[:n], self._first[n:]
            return data
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes (IncompleteReadError at the end of the channel)."""
        data = await self.read(n) if self._first else b""
        if len(data) == n:
            return data
        try:
            return data + await self._reader.readexactly(n - len(data))
        except asyncio.IncompleteReadError as err:
            raise asyncio.IncompleteReadError(data + err.partial, n) from None


@dataclass(eq=False)
class ReverseKeeper:
    """Keeps our connection to one peer up, with idle reverse channels on it.

    The peer ``name``: ``addresses()`` gives its addresses in dial order, the first
    ``typed`` of them typed by the user, and ``public_key`` is its key. ``serve(address)``
    returns what serves the protocol on a taken channel of a connection to ``address``.
    """

    identity: Identity
    name: str
    addresses: Callable[[], Sequence[str]]
    public_key: str
    serve: Callable[[str], Serve]
    _: KW_ONLY
    typed: int = 0
    connect_timeout: float = client.CONNECT_TIMEOUT
    first_delay: float = FIRST_DELAY
    max_delay: float = MAX_DELAY
    connected_to: str | None = field(default=None, init=False)
    failures: int = field(default=0, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _sessions: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def start(self) -> None:
        """Begin keeping the connection (a task of its own)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mynas-reverse-{self.name}")

    async def stop(self) -> None:
        """Close the connection; sessions under way end with it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        sessions = list(self._sessions)
        for session in sessions:
            session.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.first_delay
        while True:
            try:
                conn = await self._connect()
            except MyNasError as err:
                self.failures += 1
                _LOGGER.info("Cannot keep a connection to %s (retry in %.0f s): %s",
                             self.name, delay, err)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(self.max_delay, delay * 2)
                continue
            held_from = loop.time()
            try:
                await self._hold(conn)
            finally:
                self.connected_to = None
                conn.close()
                with contextlib.suppress(Exception):
                    await conn.wait_closed()
            # It went away. Soon after it came (a peer that will not hold our channels, a
            # flaky link): wait longer each time; after a good while up: start over.
            if loop.time() - held_from >= STABLE:
                delay = self.first_delay
            await asyncio.sleep(delay)
            delay = min(self.max_delay, delay * 2)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        failures: list[str] = []
        for position, address in enumerate(self.addresses()):
            try:
                conn = await client.open_connection(
                    self.identity,
                    address,
                    self.public_key,
                    connect_timeout=self.connect_timeout,
                )
            except HostKeyMismatch as err:
                if position < self.typed:
                    raise  # at a typed address: a key change the user must look at
                failures.append(f"{address}: another host answers there")
                del err
            except MyNasError as err:
                failures.append(str(err))
            else:
                self.connected_to = address
                return conn
        raise _Nowhere("; ".join(failures) or "no address")

    async def _hold(self, conn: asyncssh.SSHClientConnection) -> None:
        """Keep IDLE_CHANNELS channels waiting on ``conn`` until it closes."""
        address = self.connected_to or "?"
        idle = asyncio.Semaphore(0)
        for _ in range(IDLE_CHANNELS):
            idle.release()
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while not closed.done():
                acquire = asyncio.ensure_future(idle.acquire())
                await asyncio.wait([acquire, closed], return_when=asyncio.FIRST_COMPLETED)
                if not acquire.done():
                    acquire.cancel()
                    break
                try:
                    writer, reader, _ = await conn.open_session(
                        subsystem=protocol.REVERSE_SUBSYSTEM, encoding=None
                    )
                except (asyncssh.Error, OSError) as err:
                    _LOGGER.info("%s would not hold a reverse channel: %s", self.name, err)
                    break
                session = asyncio.create_task(self._wait_and_serve(address, reader, writer, idle))
                self._sessions.add(session)
                session.add_done_callback(self._sessions.discard)
        finally:
            closed.cancel()

    async def _wait_and_serve(
        self,
        address: str,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        idle: asyncio.Semaphore,
    ) -> None:
        """Wait on an idle channel until the peer speaks, then serve it there."""
        try:
            first = await reader.read(protocol.READ_SIZE)
            idle.release()  # taken (or closed): open another one
            if first:
                await self.serve(address)(Prefixed(first, reader), writer)
        except asyncssh.Error, OSError, ConnectionError:
            pass
        finally:
            writer.close()


class _Nowhere(MyNasError):
    """No address of the peer took our connection."""
