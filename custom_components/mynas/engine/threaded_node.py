"""A node on the engine's own event loop, driven from any other loop: the one thread hop.

A ``Node`` lives on the engine's loop (its server, its links and its locks are there), and
the host application's loop must never do that work: Home Assistant's loop lag stays at a
few milliseconds only if SSH and encryption run elsewhere. ``ThreadedNode`` owns both the
node and that loop's thread. It starts and stops them together; each of its coroutines,
awaited from the host's loop, runs the node's method of the same name on the engine loop;
``relay`` carries callbacks the other way, back onto the host's loop. Streams cross too: a
backup's bytes go up from an iterator on the host's loop (``upload_backup``, a bounded
queue between the two loops) and come down as an iterator there (``download_backup``, one
hop per chunk), never a whole archive in memory. Stopping cancels what still runs on the
engine loop, closes the downloads still open, and waits for it to unwind before the node
closes (a cancelled push still writes the files already acknowledged to the index).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Sequence
import contextlib
import copy
from dataclasses import dataclass, replace
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Unpack
import weakref

from . import node as node_module
from .loop_thread import EngineLoop
from .node import Node, NodeOptions, PeerConfig, ProbeResult
from .owner.run import PeerTarget

if TYPE_CHECKING:
    from .identity import Identity
    from .owner.backup_area import NewBackup, OpenStream, StoredBackup
    from .owner.index import Index

# Stopping waits this long (seconds) for each step: what still runs to unwind, the node to close.
STOP_TIMEOUT = 30.0
# Chunks of an upload's stream read ahead on the host's loop, waiting for the engine's.
INBOUND_CHUNKS = 8

type EventHandler = Callable[[str, dict[str, Any]], None]


def _awaited[**P, T](
    method: Callable[Concatenate[Node, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[ThreadedNode, P], Coroutine[Any, Any, T]]:
    """A coroutine of ThreadedNode that awaits the node's ``method`` on the engine loop."""
    name = method.__name__

    async def hop(self: ThreadedNode, /, *args: P.args, **kwargs: P.kwargs) -> T:
        # Looked up at each call: the node's own method runs (or one a test patched in).
        work: Coroutine[Any, Any, T] = getattr(self._node, name)(*args, **kwargs)
        return await self.run(work)

    hop.__name__ = name
    hop.__qualname__ = f"ThreadedNode.{name}"
    hop.__doc__ = f"``Node.{name}`` on the engine loop: {method.__doc__}"
    return hop


def _called[**P, T](
    method: Callable[Concatenate[Node, P], T],
) -> Callable[Concatenate[ThreadedNode, P], Coroutine[Any, Any, T]]:
    """A coroutine of ThreadedNode that calls the node's plain ``method`` on the engine loop.

    Such methods read state that only the engine loop may touch (the server's jails).
    """
    name = method.__name__

    async def on_engine(node: Node, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = getattr(node, name)(*args, **kwargs)
        return result

    async def hop(self: ThreadedNode, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.run(on_engine(self._node, *args, **kwargs))

    hop.__name__ = name
    hop.__qualname__ = f"ThreadedNode.{name}"
    hop.__doc__ = f"``Node.{name}`` on the engine loop: {method.__doc__}"
    return hop


class ThreadedNode:
    """A node and the engine thread it runs on: ``start``, await its coroutines, ``stop``.

    Every coroutine here may be awaited from any event loop but the engine's own.
    Cancelling the caller cancels the work on the engine loop too.
    """

    def __init__(
        self,
        identity: Identity,
        storage_root: str | os.PathLike[str],
        **options: Unpack[NodeOptions],
    ) -> None:
        """Prepare the node on ``storage_root`` and its thread (nothing runs until ``start``)."""
        self.engine = EngineLoop()
        self._node = Node(identity, storage_root, on_event=self._on_event, **options)
        self._events: EventHandler | None = None
        # What runs on the engine loop on our behalf (touched on that loop only).
        self._tasks: set[asyncio.Task[Any]] = set()
        # Downloads handed out and not finished (touched on the host's loop only).
        self._sources: weakref.WeakSet[AsyncGenerator[bytes]] = weakref.WeakSet()

    @property
    def storage_root(self) -> Path:
        """The node's storage root."""
        return self._node.storage_root

    @property
    def peers(self) -> dict[str, PeerConfig]:
        """The node's peers, by id (replaced as a whole by the engine, safe to read here)."""
        return self._node.peers

    @property
    def own_addresses(self) -> tuple[str, ...]:
        """Our addresses as announced (replaced as a whole by the engine, safe to read here)."""
        return self._node.own_addresses

    @property
    def index(self) -> Index:
        """The node's index (after ``start``); blocking, thread-safe: use it off any loop."""
        return self._node.index

    async def start(
        self,
        host: str,
        port: int,
        peers: Iterable[PeerConfig],
        *,
        on_event: EventHandler | None = None,
        addresses: Sequence[str] = (),
    ) -> None:
        """Start the engine's thread and, on it, the node (index, hosted space, server).

        ``on_event(kind, details)`` receives the server's events on the calling loop.
        Raises OSError if the port is taken; whatever fails, the thread is stopped again.
        """
        loop = asyncio.get_running_loop()
        self._events = self.relay(on_event) if on_event is not None else None
        await loop.run_in_executor(None, self.engine.start)
        try:
            await self.run(self._node.start(host, port, peers, addresses=addresses))
        except BaseException:
            await loop.run_in_executor(None, self.engine.stop)
            raise

    async def stop(self) -> None:
        """Cancel what runs on the engine loop and let it unwind; close the node; end the thread.

        Idempotent. Each of the two waits takes ``STOP_TIMEOUT`` seconds at most.
        """
        if not self.engine.running:
            return
        sources = list(self._sources)
        self._sources.clear()
        try:
            await asyncio.wait_for(self.engine.run(self._drain(sources)), STOP_TIMEOUT)
            await asyncio.wait_for(self.engine.run(self._node.stop()), STOP_TIMEOUT)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    async def run[T](self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the engine loop and await it here; ``stop`` cancels it and waits."""
        return await self.engine.run(self._tracked(work))

    def relay[**P](self, callback: Callable[P, None]) -> Callable[P, None]:
        """Return ``callback`` made for the engine to call: it then runs on the calling loop.

        Call ``relay`` on the loop that should run ``callback``. The engine may update what
        it passes in place (a run's progress) while the callback waits for its turn, so
        each argument is copied, one level deep, on the engine's thread as it calls.
        """
        loop = asyncio.get_running_loop()

        def from_engine(*args: P.args, **kwargs: P.kwargs) -> None:
            copied = [copy.copy(arg) for arg in args]
            later = functools.partial(callback, *copied, **kwargs)  # type: ignore[arg-type]
            loop.call_soon_threadsafe(later)

        return from_engine

    async def probe_unpaired(self, addresses: Iterable[str], public_key: str) -> ProbeResult:
        """Test the connection to a node not paired (yet): its addresses and expected key."""
        target = PeerTarget("test", tuple(addresses), public_key)
        return await self.run(node_module.probe(self._node.identity, target))

    async def upload_backup(
        self, peer_id: str, backup: NewBackup, *, progress: Callable[[int], None] | None = None
    ) -> StoredBackup:
        """``Node.upload_backup`` with ``open_stream`` and ``progress`` on the calling loop.

        The stream is opened once the peer has accepted the archive (its quota reserved),
        and read ahead by at most ``INBOUND_CHUNKS`` chunks; an error it raises is raised
        here as it is. ``progress(bytes sent)`` runs on the calling loop.
        """
        inbound = _Inbound(self.engine.loop, backup.open_stream)
        feeder = asyncio.create_task(inbound.feed())
        try:
            return await self.run(
                self._node.upload_backup(
                    peer_id,
                    replace(backup, open_stream=inbound.open),
                    progress=None if progress is None else self.relay(progress),
                )
            )
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def download_backup(self, peer_id: str, backup_id: str) -> AsyncGenerator[bytes]:
        """Connect and start ``Node.download_backup``; return its bytes as an iterator here.

        Errors before the first byte (the peer down, no such backup) are raised here; later
        ones by the iterator. Iterate it to the end or close it (``aclose``): that ends the
        connection (``stop`` closes what is still open).
        """
        source = await self.run(_started(self._node, peer_id, backup_id))
        try:
            first = await self.run(_step(source))
        except BaseException:
            await self._close_source(source)
            raise
        self._sources.add(source)
        return self._relay_stream(source, first)

    async def _relay_stream(
        self, source: AsyncGenerator[bytes], first: bytes | None
    ) -> AsyncGenerator[bytes]:
        try:
            item = first
            while item is not None:
                yield item
                item = await self.run(_step(source))
        finally:
            await self._close_source(source)

    async def _close_source(self, source: AsyncGenerator[bytes]) -> None:
        self._sources.discard(source)
        if self.engine.running:
            await self.engine.run(_close(source))

    push = _awaited(Node.push)
    convert = _awaited(Node.convert)
    verify = _awaited(Node.verify)
    restore = _awaited(Node.restore)
    probe = _awaited(Node.probe)
    check_folder = _awaited(Node.check_folder)
    remove_peer_data = _awaited(Node.remove_peer_data)
    known_pairs = _awaited(Node.known_pairs)
    forget_pairs = _awaited(Node.forget_pairs)
    list_backups = _awaited(Node.list_backups)
    list_folders = _awaited(Node.list_folders)
    hosted_trash = _awaited(Node.hosted_trash)
    get_backup = _awaited(Node.get_backup)
    delete_backup = _awaited(Node.delete_backup)
    set_peers = _awaited(Node.set_peers)
    set_addresses = _awaited(Node.set_addresses)
    set_found_addresses = _awaited(Node.set_found_addresses)
    refresh_addresses = _awaited(Node.refresh_addresses)
    announce = _awaited(Node.announce)
    check_reachability = _awaited(Node.check_reachability)
    set_inbound = _awaited(Node.set_inbound)
    kept_connections = _called(Node.kept_connections)
    upnp_state = _called(Node.upnp_state)
    hosted = _called(Node.hosted)
    snapshot = _called(Node.snapshot)
    peer_addresses = _called(Node.peer_addresses)

    def _on_event(self, kind: str, details: dict[str, Any]) -> None:  # on the engine's thread
        if self._events is not None:
            self._events(kind, details)

    async def _tracked[T](self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await work
        finally:
            self._tasks.discard(task)

    async def _drain(self, sources: list[AsyncGenerator[bytes]]) -> None:
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            if not task.cancelling():  # a cancelled run unwinds: don't cut its cleanup short
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in sources:  # downloads left open: their connections end here
            await _close(source)


async def _started(node: Node, peer_id: str, backup_id: str) -> AsyncGenerator[bytes]:
    """``node.download_backup`` made on the engine loop (where the peer's addresses live)."""
    return node.download_backup(peer_id, backup_id)


async def _step(source: AsyncGenerator[bytes]) -> bytes | None:
    """The next chunk of ``source``, or None at its end (on the engine loop)."""
    try:
        return await anext(source)
    except StopAsyncIteration:
        return None


async def _close(source: AsyncGenerator[bytes]) -> None:
    """Close ``source`` on the engine loop (its connection with it); errors are its own."""
    with contextlib.suppress(Exception):
        await source.aclose()


@dataclass(frozen=True, slots=True)
class _Failed:
    """The stream on the host's loop raised ``error``."""

    error: BaseException


class _End:
    """The stream on the host's loop ended."""


class _Inbound:
    """An upload's stream, read on the host's loop and handed to the engine's (bounded).

    ``feed`` runs on the host's loop and waits until the engine calls ``open``; the queue
    between them is used on the engine loop only (every put hops there).
    """

    def __init__(self, engine: asyncio.AbstractEventLoop, open_stream: OpenStream) -> None:
        self._engine = engine
        self._open_stream = open_stream
        self._host = asyncio.get_running_loop()
        self._go = asyncio.Event()
        self._queue: asyncio.Queue[bytes | _Failed | _End] = asyncio.Queue(INBOUND_CHUNKS)

    async def feed(self) -> None:
        """Open the stream once asked, and pass its chunks on (on the host's loop)."""
        await self._go.wait()
        try:
            stream = await self._open_stream()
            async for chunk in stream:
                await self._put(chunk)
        except Exception as err:  # raised on the engine's side, as it is
            await self._put(_Failed(err))
            return
        await self._put(_End())

    async def _put(self, item: bytes | _Failed | _End) -> None:
        put = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._engine)
        await asyncio.wrap_future(put)

    async def open(self) -> AsyncIterator[bytes]:
        """Start the feed; return the stream's chunks as they come (on the engine loop)."""
        self._host.call_soon_threadsafe(self._go.set)
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[bytes]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
