"""A node on the engine's own event loop, driven from any other loop: the one thread hop.

A ``Node`` lives on the engine's loop (its server, its links and its locks are there), and
the host application's loop must never do that work: Home Assistant's loop lag stays at a
few milliseconds only if SSH and encryption run elsewhere. ``ThreadedNode`` owns both the
node and that loop's thread. It starts and stops them together; each of its coroutines,
awaited from the host's loop, runs the node's method of the same name on the engine loop;
``relay`` carries callbacks the other way, back onto the host's loop. Stopping cancels what
still runs on the engine loop and waits for it to unwind before the node closes (a
cancelled push still writes the files already acknowledged to the index).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
import copy
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate

from . import node as node_module
from .loop_thread import EngineLoop
from .node import Node, PeerConfig, ProbeResult
from .owner.run import PeerTarget

if TYPE_CHECKING:
    from .identity import Identity
    from .owner.index import Index

# Stopping waits this long (seconds) for each step: what still runs to unwind, the node to close.
STOP_TIMEOUT = 30.0

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
        *,
        trash_days: int = 30,
    ) -> None:
        """Prepare the node on ``storage_root`` and its thread (nothing runs until ``start``)."""
        self.engine = EngineLoop()
        self._node = Node(identity, storage_root, trash_days=trash_days, on_event=self._on_event)
        self._events: EventHandler | None = None
        # What runs on the engine loop on our behalf (touched on that loop only).
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def storage_root(self) -> Path:
        """The node's storage root."""
        return self._node.storage_root

    @property
    def peers(self) -> dict[str, PeerConfig]:
        """The node's peers, by id (replaced as a whole by the engine, safe to read here)."""
        return self._node.peers

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
    ) -> None:
        """Start the engine's thread and, on it, the node (index, hosted space, server).

        ``on_event(kind, details)`` receives the server's events on the calling loop.
        Raises OSError if the port is taken; whatever fails, the thread is stopped again.
        """
        loop = asyncio.get_running_loop()
        self._events = self.relay(on_event) if on_event is not None else None
        await loop.run_in_executor(None, self.engine.start)
        try:
            await self.run(self._node.start(host, port, peers))
        except BaseException:
            await loop.run_in_executor(None, self.engine.stop)
            raise

    async def stop(self) -> None:
        """Cancel what runs on the engine loop and let it unwind; close the node; end the thread.

        Idempotent. Each of the two waits takes ``STOP_TIMEOUT`` seconds at most.
        """
        if not self.engine.running:
            return
        try:
            await asyncio.wait_for(self.engine.run(self._drain()), STOP_TIMEOUT)
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

    push = _awaited(Node.push)
    convert = _awaited(Node.convert)
    verify = _awaited(Node.verify)
    restore = _awaited(Node.restore)
    probe = _awaited(Node.probe)
    remove_peer_data = _awaited(Node.remove_peer_data)
    known_pairs = _awaited(Node.known_pairs)
    forget_pairs = _awaited(Node.forget_pairs)
    hosted = _called(Node.hosted)
    snapshot = _called(Node.snapshot)

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

    async def _drain(self) -> None:
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            if not task.cancelling():  # a cancelled run unwinds: don't cut its cleanup short
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
