"""Fixtures for engine tests that need a live node: identities, storage, a NodeServer.

Engine tests use real loopback sockets (always ``127.0.0.1``): the Home Assistant pytest
plugin blocks sockets unless a test requests ``socket_enabled``, so every engine test does.
Every server started here is closed at teardown, and with it every connection it holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
import os
from pathlib import Path
import shutil
import tempfile
import time
from typing import Any, Protocol, TypedDict, Unpack

import asyncssh
import pytest

from custom_components.mynas.engine import identity
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.host.space import HostedSpace
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner.run import PeerTarget

from .netns_support import Namespaces, namespaces

MIB = 1 << 20
DEFAULT_QUOTA = 16 * MIB


async def wait_until(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = 15.0
) -> None:
    """Poll a condition that no event announces (the disk, a counter in another task)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def _engine_sockets(socket_enabled: None) -> None:
    """Allow loopback sockets in every engine test."""


@pytest.fixture
def netns(monkeypatch: pytest.MonkeyPatch) -> Iterator[Namespaces]:
    """Network namespaces for this test (root), removed at its end (``netns_support``)."""
    yield from namespaces(monkeypatch)


def _key_path(tmp_path: Path, name: str) -> Path:
    return tmp_path / "keys" / name / "id_ed25519"


def _identity(tmp_path: Path, name: str) -> Identity:
    node, _ = identity.load_or_create(_key_path(tmp_path, name))
    return node


@pytest.fixture
def key_file(tmp_path: Path) -> Callable[[str], Path]:
    """The private key file of a named identity ("host", "alice"...): OpenSSH format, 0600."""
    return lambda name: _key_path(tmp_path, name)


def _identity_fixture(name: str, about: str) -> Any:
    """A fixture ``<name>_id``: the named identity, created on first use in this test."""

    def named(tmp_path: Path) -> Identity:
        return _identity(tmp_path, name)

    named.__doc__ = about
    return pytest.fixture(name=f"{name}_id")(named)


host_id = _identity_fixture("host", "The identity of the node under test (the host).")
alice_id = _identity_fixture("alice", "A peer's identity (a friend's node): \"alice\".")
bob_id = _identity_fixture("bob", 'Another peer\'s identity: "bob".')
mallory_id = _identity_fixture("mallory", "A key that no node has added.")


@pytest.fixture
def chosen_kex(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The key exchange each side of each connection in the test chose, in order."""
    chosen: list[bytes] = []
    real_get_kex = asyncssh.connection.get_kex

    def spy(conn: Any, alg: bytes) -> Any:
        chosen.append(alg)
        return real_get_kex(conn, alg)

    monkeypatch.setattr(asyncssh.connection, "get_kex", spy)
    return chosen


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    """The host's storage root (empty)."""
    path = tmp_path / "storage"
    path.mkdir()
    return path


class ServerOptions(TypedDict, total=False):
    """What a test may change about the server it starts (the rest: the fixtures' defaults)."""

    limits: Limits | None
    storage: Path
    identity: Identity
    on_event: Callable[[str, dict[str, Any]], None] | None
    trash_days: int


class ServerFactory(Protocol):
    """Starts a NodeServer on 127.0.0.1, port 0; the fixture closes it at teardown."""

    def __call__(
        self, peers: Iterable[PeerGrant] | None = None, **options: Unpack[ServerOptions]
    ) -> Awaitable[NodeServer]: ...


@pytest.fixture
async def make_server(
    host_id: Identity, alice_id: Identity, bob_id: Identity, storage_dir: Path
) -> AsyncIterator[ServerFactory]:
    """A factory of live servers (default: alice and bob, DEFAULT_QUOTA each)."""
    started: list[NodeServer] = []

    async def make(
        peers: Iterable[PeerGrant] | None = None, **options: Unpack[ServerOptions]
    ) -> NodeServer:
        grants = (
            list(peers)
            if peers is not None
            else [
                PeerGrant("alice", alice_id.public_line, DEFAULT_QUOTA),
                PeerGrant("bob", bob_id.public_line, DEFAULT_QUOTA),
            ]
        )
        space = HostedSpace(
            options.get("storage", storage_dir), trash_days=options.get("trash_days", 30)
        )
        server = NodeServer(
            options.get("identity", host_id),
            space,
            grants,
            limits=options.get("limits"),
            on_event=options.get("on_event"),
        )
        started.append(server)
        await server.start("127.0.0.1", 0)
        for grant in grants:
            await server.jail_ready(grant.name)
        return server

    yield make
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> NodeServer:
    """A live host serving alice and bob (DEFAULT_QUOTA each), usage recounted."""
    return await make_server()


def address(server: NodeServer) -> str:
    """The address a client connects to."""
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory on /dev/shm (tmpfs) when there is one, else in tmp_path.

    For big or many-file trees: the test disk is sometimes very slow to create files.
    """
    base = Path("/dev/shm")
    if not base.is_dir() or not os.access(base, os.W_OK):
        path = tmp_path / "fast"
        path.mkdir()
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="mynas-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def peer_target(server: NodeServer, name: str = "host") -> PeerTarget:
    """How a peer's node reaches ``server``: its address and pinned host key."""
    return PeerTarget(name, (address(server),), server.identity.public_line)
