"""The connecting side: one SSH connection to a peer, host key pinned, one protocol channel.

The peer is known only by its pinned public key (invariant 1): ``known_hosts`` holds that key
alone and nothing of ``~/.ssh`` or an agent is consulted. A host presenting another key is
refused during the key exchange, before our key or a byte of data is sent, and the key it
presented is kept for the repair flow that asks the user whether to trust it.

The algorithms offered come from ``ciphers``: hybrid post-quantum key exchange first, an
Ed25519 host key, AEAD ciphers only (AES-GCM first where the CPU has AES instructions,
ChaCha20 first elsewhere, or ``MYNAS_CIPHERS`` when set).

A ``PeerLink`` has one method per request of the protocol. Its frames reach the channel
through an ``Outbox`` (coalesced into whole SSH packets); a dispatcher task reads the
host's frames and hands each to ``Answers``, which finds the request it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, ClassVar

import asyncssh

from .. import ciphers, protocol
from ..errors import (
    AuthRefused,
    HostKeyMismatch,
    HostRefused,
    MyNasError,
    PeerUnreachable,
    ProtocolError,
)
from ..identity import Identity, fingerprint, parse_public_key, pinned_login, public_key_line
from ..invite import parse_address
from ..protocol import Close, Frame
from ..tree import Entry, Kind
from .answers import AckCallback, Answers
from .outbox import DRAIN_EVERY, Outbox

if TYPE_CHECKING:
    from .run import PeerTarget

_LOGGER = logging.getLogger(__name__)

CONNECT_TIMEOUT = 20.0
# A large file travels in DATA frames of exactly CHUNK bytes, header included: whole SSH
# packets (CHUNK is a multiple of outbox.PACKET), never a tiny one for a header's overflow.
_PIECE = protocol.CHUNK - protocol.DATA_OVERHEAD


class _PinnedClient(asyncssh.SSHClient):
    """Remembers the host key a peer presented when it is not the pinned one."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Only called for a key that is NOT the pinned one: record it, trust nothing.
        self.presented = key
        return False


class Upload:
    """A large file on its way to the host (``PeerLink.upload``): pieces, then one ending.

    ``offset`` is how much of it the host already holds (a partial kept from an earlier
    run): send the file from there, in pieces of at most ``piece_size`` bytes, then end with
    ``finish`` (it returns once the file is durable under its name), ``abandon`` (the host
    keeps the partial for a resume) or ``discard``.
    """

    __slots__ = ("_link", "_req", "offset")
    piece_size: ClassVar[int] = _PIECE

    def __init__(self, link: PeerLink, req: int, offset: int) -> None:
        self._link = link
        self._req = req
        self.offset = offset

    async def send(self, piece: bytes | memoryview) -> None:
        """Send the next piece (at most ``piece_size`` bytes)."""
        await self._link.send_data(self._req, piece)

    async def finish(self) -> None:
        """End the upload; return once the file is durable under its name."""
        await self._link.close_upload(self._req, Close.FINISH)

    async def abandon(self) -> None:
        """Stop sending; the host keeps what it has for the next run to resume."""
        await self._link.close_upload(self._req, Close.ABANDON)

    async def discard(self) -> None:
        """Stop sending; the host drops what it has (the file changed under the reader)."""
        await self._link.close_upload(self._req, Close.DISCARD)


class PeerLink:
    """An open replication channel to one peer.

    One method per request of the protocol. Push, restore and verify use ``put``,
    ``upload`` (an ``Upload``), ``delete``, ``mkdir``, ``sync``, ``list``, ``download``...;
    ``open_upload``/``send_data``/``close_upload`` and ``read`` are the same requests frame
    by frame, for tests that drive the host one frame at a time.
    """

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection | None,
        writer: asyncssh.SSHWriter[bytes],
        reader: asyncssh.SSHReader[bytes],
        address: str,
    ) -> None:
        """Wrap an authenticated connection and its protocol channel (use ``connect``).

        ``conn`` None: the channel is a reverse one (``over_channel``), inside a connection
        the peer opened to us; closing the link closes that channel only.
        """
        self.address = address
        self.welcome: dict[str, Any] = {}
        self._conn = conn
        self._writer = writer
        self._reader = reader
        self._next_id = 0
        self._answers = Answers()
        self._outbox = Outbox(writer, self._broken)
        self._closed: BaseException | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        self._writer.write(protocol.hello())
        kind, body = await asyncio.wait_for(protocol.read_frame(self._reader), CONNECT_TIMEOUT)
        if kind is not Frame.WELCOME:
            raise ProtocolError(f"expected WELCOME, got {kind.name}")
        self.welcome = protocol.parse_json(body)
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def close(self) -> None:
        """Close the channel and the connection (queued requests fail, unsent)."""
        self._outbox.clear()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        self._fail_everything(ConnectionAbortedError("connection closed"))
        self._writer.close()
        if self._conn is None:
            await self._writer.channel.wait_closed()
            return
        self._conn.close()
        await self._conn.wait_closed()

    async def __aenter__(self) -> PeerLink:
        """Use as ``async with await connect(...) as link``."""
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Close on leaving the block."""
        await self.close()

    @property
    def local_address(self) -> str | None:
        """Our end of the connection (on a home LAN: this machine's LAN address)."""
        extra = self._conn if self._conn is not None else self._writer.channel
        sockname = extra.get_extra_info("sockname")
        return str(sockname[0]) if sockname else None

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return self._answers.pending

    # --- sending -------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _write(self, data: bytes) -> None:
        """Queue a frame (see ``Outbox.put``); PeerUnreachable once the connection is gone."""
        if self._closed is not None:
            raise _lost(self.address, self._closed)
        self._outbox.put(data)

    async def _send(self, data: bytes) -> None:
        """Queue a frame, waiting for the channel's flow control now and then."""
        self._write(data)
        if self._outbox.unflushed >= DRAIN_EVERY:
            await self.flush()

    async def flush(self) -> None:
        """Push everything queued into the channel, waiting for its flow control."""
        if self._closed is not None:
            raise _lost(self.address, self._closed)
        await self._outbox.drain()

    def _broken(self, cause: BaseException) -> MyNasError:
        """Fail what is pending on a channel that can no longer be written to."""
        self._fail_everything(cause)
        return _lost(self.address, cause)

    async def _ask(self, req: int, data: bytes) -> Any:
        """Send a request and wait for its answer (OK, OFFSET or REPLY; FAIL raises)."""
        self._write(data)  # the answer cannot come before this coroutine waits
        future = self._answers.expect(req)
        try:
            await self.flush()
        except BaseException:
            if not future.done():
                future.cancel()  # a late answer is then dropped
            elif not future.cancelled():
                future.exception()  # raised here instead: never "unretrieved"
            raise
        return await future

    async def _post(self, req: int, data: bytes, on_done: AckCallback) -> None:
        """Send a request whose answer goes to ``on_done``, without waiting for it."""
        self._write(data)  # nothing is registered for a request that never left
        self._answers.notify(req, on_done)
        if self._outbox.unflushed >= DRAIN_EVERY:
            await self.flush()

    async def _request(self, build: Callable[[int], bytes]) -> Any:
        req = self._new_id()
        return await self._ask(req, build(req))

    # --- the protocol's requests ---------------------------------------------------------

    async def put(
        self, path: bytes, mtime_ns: int, mode: int, data: bytes, on_done: AckCallback
    ) -> None:
        """Send a whole small file; ``on_done`` hears whether the host stored it durably."""
        req = self._new_id()
        await self._post(req, protocol.put(req, path, mtime_ns, mode, data), on_done)

    async def upload(self, path: bytes, size: int, mtime_ns: int, mode: int) -> Upload:
        """Start (or resume) a large file; the host's answer says from which offset."""
        req, offset = await self.open_upload(path, size, mtime_ns, mode)
        return Upload(self, req, offset)

    async def open_upload(
        self, path: bytes, size: int, mtime_ns: int, mode: int
    ) -> tuple[int, int]:
        """Start (or resume) a large file; return (request id, offset the host already has)."""
        req = self._new_id()
        offset = await self._ask(req, protocol.open_upload(req, path, size, mtime_ns, mode))
        return req, int(offset)

    async def send_data(self, req: int, chunk: bytes | memoryview) -> None:
        """Send the next piece of an open upload."""
        await self._send(protocol.data(req, chunk))

    async def close_upload(self, req: int, how: protocol.Close) -> None:
        """End an upload; for FINISH, returns once the file is durable under its name."""
        await self._ask(req, protocol.close(req, how))

    async def delete(self, path: bytes, on_done: AckCallback) -> None:
        """Ask the host to move a file or tree into its trash."""
        req = self._new_id()
        await self._post(req, protocol.delete(req, path), on_done)

    async def mkdir(self, path: bytes, mtime_ns: int | None, on_done: AckCallback) -> None:
        """Create a directory (and parents) on the host."""
        req = self._new_id()
        await self._post(req, protocol.mkdir(req, path, mtime_ns), on_done)

    async def utime(self, path: bytes, mtime_ns: int, on_done: AckCallback) -> None:
        """Set a file's or directory's mtime on the host."""
        req = self._new_id()
        await self._post(req, protocol.utime(req, path, mtime_ns), on_done)

    async def sync(self) -> None:
        """Return once every earlier request is answered and durable on the host."""
        await self._request(protocol.sync)

    async def usage(self) -> dict[str, Any]:
        """Return the host's figures for us: used, quota, disk_free."""
        result: dict[str, Any] = await self._request(
            lambda req: protocol.query(req, {"op": "usage"})
        )
        return result

    async def set_retention(self, folder: str, days: int) -> None:
        """Ask the host to keep our trash of ``folder`` for at least ``days`` days."""
        await self._request(
            lambda req: protocol.query(req, {"op": "retention", "folder": folder, "days": days})
        )

    async def exists(self, path: bytes) -> bool:
        """Return whether the host holds anything (a directory or a file) at ``path``.

        One QUERY where the host serves ``stat``; an older host is asked for a listing,
        which it walks whole even though only its first entry is read.
        """
        if self.serves("stat"):
            answer = await self._request(
                lambda req: protocol.query(req, {"op": "stat", "path": path.hex()})
            )
            return answer.get("kind") is not None
        try:
            async with contextlib.aclosing(self.list(path)) as listing:
                async for _ in listing:
                    break
        except HostRefused as err:
            if err.code == protocol.FailCode.MISSING:
                return False
            if err.code != protocol.FailCode.PATH:  # PATH: a file, not a directory
                raise
        return True

    async def folders(self) -> tuple[list[dict[str, Any]], bool]:
        """Return the top-level folders of our space at the host, and whether more exist.

        Each as ``{"name": bytes, "files", "bytes", "changed"}`` (stored sizes; ``changed``
        None when unknown). One QUERY where the host serves ``folders``; an older host's
        listing is summed up here (its mtimes, not when it stored things).
        """
        if self.serves("folders"):
            answer = await self._request(lambda req: protocol.query(req, {"op": "folders"}))
            items = answer.get("folders")
            if not isinstance(items, list):
                raise ProtocolError("a folders answer without folders")
            found = []
            for item in items:
                try:
                    name = bytes.fromhex(item["name"])
                    files, size = int(item["files"]), int(item["bytes"])
                    changed = float(item["changed"])
                except KeyError, TypeError, ValueError:
                    raise ProtocolError("a folder the host described badly") from None
                if not name or b"/" in name:
                    raise ProtocolError("a folder name with a slash in a folders answer")
                found.append({"name": name, "files": files, "bytes": size, "changed": changed})
            return found, bool(answer.get("more"))
        totals: dict[bytes, dict[str, Any]] = {}
        async with contextlib.aclosing(self.list()) as listing:
            async for entry, _ in listing:
                top, slash, _rest = entry.path.partition(b"/")
                if not slash and entry.kind is not Kind.DIR:
                    continue  # a file at the top level is no folder
                held = totals.setdefault(
                    top, {"name": top, "files": 0, "bytes": 0, "changed": None}
                )
                if entry.kind is Kind.FILE:
                    held["files"] += 1
                    held["bytes"] += entry.size
                    when = entry.mtime_ns / 1e9
                    if when > 0 and (held["changed"] is None or when > held["changed"]):
                        held["changed"] = when
        return list(totals.values()), False

    def serves(self, feature: str) -> bool:
        """Whether the host listed ``feature`` (``protocol.FEATURES``) in its WELCOME."""
        features = self.welcome.get("features")
        return isinstance(features, list) and feature in features

    async def announce(self, addresses: Sequence[str]) -> None:
        """Tell the host where we can be reached now (only if it ``serves("announce")``)."""
        await self._request(lambda req: protocol.announce(req, tuple(addresses)))

    async def check(self, addresses: Sequence[str] = ()) -> dict[str, Any]:
        """Ask the host to dial back our announced addresses; its REPLY (``results``...)."""
        result: dict[str, Any] = await self._request(
            lambda req: protocol.check(req, tuple(addresses))
        )
        return result

    async def list(
        self, path: bytes = b"", *, with_hash: bool = False
    ) -> AsyncGenerator[tuple[Entry, bytes | None]]:
        """Yield the host's entries below ``path`` in canonical order (with content hashes).

        Close the generator (``contextlib.aclosing``) when leaving it early.
        """

        def build(req: int) -> bytes:
            return protocol.list_tree(req, path, with_hash=with_hash)

        # Closing this generator closes the stream at once, not whenever it is collected.
        async with contextlib.aclosing(self._stream(build)) as frames:
            async for kind, value in frames:
                if kind is not Frame.ENTRY:
                    raise ProtocolError(f"unexpected {kind.name} in a listing")
                yield value

    async def download(self, path: bytes) -> AsyncGenerator[Entry | memoryview]:
        """Yield a file's or a tree's entries in canonical order, each file's data after it.

        An ``Entry`` starts each file and directory; a file's bytes follow as memoryview
        chunks until its size is reached. Close the generator (``contextlib.aclosing``)
        when leaving it early.
        """
        async with contextlib.aclosing(self.read(path)) as frames:
            async for kind, value in frames:
                yield value[0] if kind is Frame.ENTRY else value

    @property
    def serves_heads(self) -> bool:
        """Whether the host answers HEADS (it says so in WELCOME; older hosts do not)."""
        return self.serves("heads")

    async def heads(self, path: bytes, length: int) -> AsyncGenerator[tuple[Entry, bytes | None]]:
        """Yield the host's entries below ``path``, each file with its first ``length`` bytes.

        Only for a host that ``serves_heads``. Close the generator (``contextlib.aclosing``)
        when leaving it early.
        """
        pending: Entry | None = None
        async with contextlib.aclosing(
            self._stream(lambda req: protocol.heads(req, path, length))
        ) as frames:
            async for kind, value in frames:
                if kind is Frame.DATA:
                    if pending is None:
                        raise ProtocolError("DATA for no file in a HEADS answer")
                    yield pending, bytes(value)
                    pending = None
                    continue
                if pending is not None:
                    raise ProtocolError("a HEADS answer left out a file's first bytes")
                item = value[0]
                if item.kind is Kind.FILE and min(length, item.size):
                    pending = item  # its first bytes follow
                else:
                    yield item, None
        if pending is not None:
            raise ProtocolError("a HEADS answer ended before a file's first bytes")

    def read(self, path: bytes) -> AsyncGenerator[tuple[Frame, Any]]:
        """Yield READ's answer frame by frame: (ENTRY, (Entry, None)) and (DATA, bytes).

        Close the generator (``contextlib.aclosing``) when leaving it early.
        """
        return self._stream(lambda req: protocol.read(req, path))

    async def _stream(self, build: Callable[[int], bytes]) -> AsyncGenerator[tuple[Frame, Any]]:
        req = self._new_id()
        stream = self._answers.open_stream(req)
        finished = True  # until the request is out: nothing will answer it
        try:
            self._write(build(req))
            finished = False
            await self.flush()
            while True:
                if stream.error is not None and stream.queue.empty():
                    finished = True
                    raise stream.error
                kind, value = await stream.queue.get()
                if kind is Frame.DONE:
                    finished = True
                    return
                if kind is Frame.FAIL:
                    finished = True
                    raise value
                yield kind, value
        finally:
            self._answers.close_stream(req, stream, finished=finished)

    # --- receiving -------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            while True:
                kind, body = await protocol.read_frame(self._reader)
                await self._answers.handle(kind, body)
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, asyncssh.Error, OSError) as err:
            self._fail_everything(err)
        except ProtocolError as err:
            _LOGGER.warning("%s broke the protocol: %s", self.address, err)
            self._fail_everything(err)
            self._hang_up()
        except Exception as err:  # never leave requests waiting on a dead dispatcher
            _LOGGER.exception("Reading from %s failed", self.address)
            self._fail_everything(err)
            self._hang_up()

    def _hang_up(self) -> None:
        if self._conn is None:
            self._writer.close()
        else:
            self._conn.close()

    def _fail_everything(self, cause: BaseException) -> None:
        if self._closed is None:
            self._closed = cause
        self._outbox.close()  # the requests its frames carried fail here
        self._answers.fail_all(_lost(self.address, cause))


def _lost(address: str, cause: BaseException) -> MyNasError:
    if isinstance(cause, MyNasError):
        return cause
    return PeerUnreachable(address, f"connection lost ({cause or type(cause).__name__})")


async def open_connection(
    identity: Identity,
    address: str,
    peer_key: str | asyncssh.SSHKey,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> asyncssh.SSHClientConnection:
    """Open an SSH connection to the peer at ``address`` whose key must be ``peer_key``.

    Raises HostKeyMismatch (nothing sent), AuthRefused (the peer hasn't added us), or
    PeerUnreachable (also when no connection is up within ``connect_timeout`` seconds).
    """
    pinned = parse_public_key(peer_key) if isinstance(peer_key, str) else peer_key
    host, port = parse_address(address)
    client = _PinnedClient()
    try:
        conn, _ = await asyncio.wait_for(
            asyncssh.create_connection(
                lambda: client,
                host,
                port,
                **pinned_login(pinned, identity),
                encoding=None,
                keepalive_interval=30,
                keepalive_count_max=4,
                kex_algs=ciphers.key_exchange(),
                encryption_algs=ciphers.preferred(),
                mac_algs=ciphers.MAC_ALGS,
                server_host_key_algs=ciphers.HOST_KEY_ALGS,
                signature_algs=ciphers.HOST_KEY_ALGS,
            ),
            connect_timeout,
        )
    except asyncssh.HostKeyNotVerifiable:
        shown = client.presented
        raise HostKeyMismatch(
            address,
            fingerprint(pinned),
            fingerprint(shown) if shown is not None else None,
            public_key_line(shown) if shown is not None else None,
        ) from None
    except asyncssh.PermissionDenied:
        raise AuthRefused(address) from None
    except TimeoutError:
        raise PeerUnreachable(address, "no answer (timed out)") from None
    except socket.gaierror as err:
        raise PeerUnreachable(address, f"unknown host ({err.strerror})") from None
    except ConnectionRefusedError:
        raise PeerUnreachable(address, "connection refused (is the port open?)") from None
    except OSError as err:
        raise PeerUnreachable(address, err.strerror or str(err)) from None
    except asyncssh.Error as err:
        raise PeerUnreachable(address, err.reason or str(err)) from None
    return conn


async def connect(
    identity: Identity,
    address: str,
    peer_key: str | asyncssh.SSHKey,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> PeerLink:
    """Open a replication channel to the peer at ``address`` whose key must be ``peer_key``.

    Raises HostKeyMismatch (nothing sent), AuthRefused (the peer hasn't added us),
    PeerUnreachable (also when no connection is up within ``connect_timeout`` seconds),
    or ProtocolError.
    """
    conn = await open_connection(identity, address, peer_key, connect_timeout=connect_timeout)
    try:
        writer, reader, _ = await conn.open_session(subsystem=protocol.SUBSYSTEM, encoding=None)
        link = PeerLink(conn, writer, reader, address)
        await link._start()
    except (asyncssh.Error, OSError, asyncio.IncompleteReadError, TimeoutError) as err:
        await _abort(conn)
        raise PeerUnreachable(address, f"the peer would not start replication: {err}") from None
    except BaseException:
        await _abort(conn)
        raise
    return link


async def over_channel(
    writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes], address: str
) -> PeerLink:
    """Start a link on a reverse channel, one the peer opened inside its own connection.

    That channel (``protocol.REVERSE_SUBSYSTEM``) belongs to a connection the peer opened to
    us: its key was checked when it logged in, ours when it connected. Raises
    PeerUnreachable if the peer does not answer on it (the channel is then closed).
    """
    link = PeerLink(None, writer, reader, address)
    try:
        await link._start()
    except (asyncssh.Error, OSError, asyncio.IncompleteReadError, TimeoutError) as err:
        writer.close()
        raise PeerUnreachable(address, f"the reverse channel did not answer: {err!r}") from None
    except BaseException:
        writer.close()
        raise
    return link


async def _abort(conn: asyncssh.SSHClientConnection) -> None:
    """Close a connection that never became a link, and wait until it is gone."""
    conn.close()
    with contextlib.suppress(Exception):
        await conn.wait_closed()


async def connect_any(
    identity: Identity,
    addresses: Sequence[str],
    peer_key: str,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    mismatch_ends: int | None = None,
) -> PeerLink:
    """Connect to the first of a peer's addresses that answers.

    A wrong host key or a refused login ends the attempt at once: another address of the
    same peer would not change the verdict, and a mismatch must never be shrugged off.
    Except past the first ``mismatch_ends`` addresses (the typed ones, when the rest were
    learned): there another key means the peer is no longer at that address, nothing more
    (nothing was sent), and the next address is tried.
    """
    if not addresses:
        raise PeerUnreachable("(no address)", "the peer has no address")
    failures: list[PeerUnreachable] = []
    for position, address in enumerate(addresses):
        try:
            return await connect(identity, address, peer_key, connect_timeout=connect_timeout)
        except PeerUnreachable as err:
            failures.append(err)
        except HostKeyMismatch as err:
            if mismatch_ends is None or position < mismatch_ends:
                raise
            failures.append(
                PeerUnreachable(address, f"another host answers there ({err.presented})")
            )
    if len(failures) == 1:
        raise failures[0]
    raise PeerUnreachable(
        ", ".join(addresses), "; ".join(f"{err.address}: {err.reason}" for err in failures)
    )


async def open_link(identity: Identity, target: PeerTarget) -> PeerLink:
    """Open a link to ``target``, through its own ``dial`` when it has one.

    A node's ``dial`` knows learned addresses and reverse channels; without one, the
    target's addresses are tried in order.
    """
    if target.dial is not None:
        return await target.dial()
    return await connect_any(identity, target.addresses, target.public_key)
