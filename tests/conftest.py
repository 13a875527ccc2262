"""Fixtures shared by the Home Assistant tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
import os
from pathlib import Path
import re
import shutil
import tempfile
import threading
from types import MappingProxyType
from typing import Any
from unittest.mock import PropertyMock, patch

from freezegun.api import FrozenDateTimeFactory
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.syrupy import HomeAssistantSnapshotExtension
from syrupy.assertion import SnapshotAssertion

# HA's loader finds the integration through this package (it is not on the plugin's path).
import custom_components  # noqa: F401
from custom_components.mynas import hass_entry
from custom_components.mynas.const import (
    CONF_ADDRESSES,
    CONF_BWLIMIT,
    CONF_ENCRYPTED,
    CONF_EXCLUDE,
    CONF_HOURS,
    CONF_JAIL,
    CONF_KEY_FILE,
    CONF_NAME,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PATH,
    CONF_PEERS,
    CONF_PORT,
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    CONF_RETENTION_DAYS,
    CONF_SCHEDULE,
    CONF_STORAGE_ROOT,
    CONF_TIME,
    CONF_WATCH,
    CONF_WATCH_MINUTES,
    DOMAIN,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)
from custom_components.mynas.engine import identity, invite, natpmp, storage_root, upnp
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.host.space import HostedSpace
from custom_components.mynas.engine.loop_thread import EngineLoop
from custom_components.mynas.engine.owner import push as replicator
from custom_components.mynas.engine.owner.run import PushResult

# Fixed ids keep unique ids, Store keys and snapshots stable from run to run.
ALICE_ENTRY_ID = "01ALICEENTRY0000000000000A"
BOB_ID = "01PEERBOB00000000000000000"
PHOTOS_ID = "01FOLDERPHOTOS000000000000"
# Photos → Bob: the pair (folder, peer) that most tests look at.
PAIR = (PHOTOS_ID, BOB_ID)


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(request: pytest.FixtureRequest) -> None:
    """Let Home Assistant load custom_components/mynas in every test that runs one.

    Tests without Home Assistant (the engine's) get none: no instance started for
    nothing, and no testing config copied into their tmp_path.
    """
    if "hass" in request.fixturenames:
        request.getfixturevalue("enable_custom_integrations")


@pytest.fixture(autouse=True)
def upnp_search_stays_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """No router in these tests: port mapping is off unless a test turns it on (UPnP and
    NAT-PMP have tests of their own against real routers), and a node that has it on
    searches 127.0.0.1 for a UPnP router and asks 127.0.0.1 over NAT-PMP, never the LAN.
    """
    monkeypatch.setattr(hass_entry, "DEFAULT_UPNP", False)
    monkeypatch.setattr(upnp, "DEFAULT_SEARCH_TARGET", ("127.0.0.1", 9))
    monkeypatch.setattr(natpmp, "DEFAULT_GATEWAY", "127.0.0.1")


@pytest.fixture(autouse=True)
def auto_socket_enabled(socket_enabled: None) -> None:
    """A node runs a real SSH server, and tests pair real nodes over 127.0.0.1."""


@pytest.fixture
def hass_config_dir(hass_tmp_config_dir: str) -> str:
    """A config dir per test: nodes write their keys there."""
    return hass_tmp_config_dir


@pytest.fixture
def usb_disk(hass: HomeAssistant) -> Iterator[Path]:
    """A directory on another filesystem than Home Assistant's config dir: our "USB disk".

    /dev/shm is a tmpfs on Linux, so it is a real separate filesystem, not a mock.
    """
    base = Path("/dev/shm")
    assert base.is_dir(), "these tests need /dev/shm (a tmpfs) as a second filesystem"
    assert not storage_root.same_filesystem(base, hass.config.config_dir)
    path = Path(tempfile.mkdtemp(prefix="mynas-usb-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node_root(tmp_path: Path) -> Path:
    """A storage root already claimed by a node (on the test machine's disk)."""
    root = tmp_path / "disk"
    root.mkdir()
    return root


def claim_root_for(hass: HomeAssistant, root: Path, name: str = "Alice") -> tuple[str, Path]:
    """Claim ``root`` for a node named ``name``: its node id, and where its key belongs."""
    marker = storage_root.claim_root(root, name)
    return marker.node_id, Path(hass.config.path(DOMAIN, f"{marker.node_id}.key"))


def add_node_entry(
    hass: HomeAssistant,
    root: Path,
    port: int,
    *,
    name: str = "Alice",
    key_file: Path | None = None,
    **entry: Any,
) -> MockConfigEntry:
    """A node entry whose storage ``root`` carries its marker; its key in the config dir
    unless ``key_file`` says where.
    """
    node_id, own_key_file = claim_root_for(hass, root, name)
    key_file = key_file or own_key_file
    node, _ = identity.load_or_create(key_file)
    config_entry = MockConfigEntry(
        domain=DOMAIN,
        title=name,
        data={
            CONF_NODE_NAME: name,
            CONF_STORAGE_ROOT: str(root),
            CONF_PORT: port,
            CONF_NODE_ID: node_id,
            CONF_KEY_FILE: str(key_file),
            CONF_NODE_PUBLIC_KEY: node.public_line,
        },
        **entry,
    )
    config_entry.add_to_hass(hass)
    return config_entry


@pytest.fixture
def node_entry(hass: HomeAssistant, node_root: Path, unused_tcp_port: int) -> MockConfigEntry:
    """Alice's node entry, its storage root on the test machine's disk."""
    return add_node_entry(
        hass,
        node_root,
        unused_tcp_port,
        entry_id=ALICE_ENTRY_ID,
        unique_id=storage_root.filesystem_identity(node_root),
    )


async def setup_entry(hass: HomeAssistant, entry: MockConfigEntry) -> Any:
    """Set up ``entry`` and wait until Home Assistant is idle."""
    result = await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return result


@pytest.fixture
async def repairs_loaded(hass: HomeAssistant) -> None:
    """The repairs integration, which runs fix flows (and their HTTP API)."""
    assert await async_setup_component(hass, "repairs", {})


def unmount(path: Path) -> None:
    """Make a storage root vanish, as when the USB disk is unplugged."""
    shutil.rmtree(path)
    assert not os.path.exists(path)


@dataclass
class Bob:
    """Bob's node, engine only, serving Alice on 127.0.0.1 from an event loop of its own.

    Its own thread, as in Home Assistant: Bob's encryption and disk work never run on the
    test's (Home Assistant's) loop, so that loop's lag is Alice's alone.
    """

    engine: EngineLoop
    storage: Path
    identity: identity.Identity
    alice_key: str
    quota: int = 10**9
    port: int = 0
    server: NodeServer | None = None

    @property
    def address(self) -> str:
        """Where Alice reaches Bob."""
        return f"127.0.0.1:{self.port}"

    @property
    def code(self) -> str:
        """Bob's invite code."""
        return invite.encode(invite.Invite("Bob", (self.address,), self.identity.public_line))

    def replica(self, folder: str) -> Path:
        """Where Alice's ``folder`` lands on Bob's disk."""
        return self.storage / "alice" / folder

    async def start(self) -> None:
        """Listen (on the same port as before, after a restart)."""
        self.server = await self.engine.run(self._start())

    async def _start(self) -> NodeServer:
        server = NodeServer(
            self.identity,
            HostedSpace(self.storage),
            [PeerGrant("alice", self.alice_key, self.quota)],
        )
        await server.start("127.0.0.1", self.port)
        self.port = server.port
        return server

    async def stop(self) -> None:
        """Go offline."""
        if self.server is not None:
            await self.engine.run(self.server.close())
            self.server = None

    async def restart(
        self, *, key: identity.Identity | None = None, quota: int | None = None
    ) -> None:
        """Come back, possibly with another host key or another quota for Alice."""
        await self.stop()
        self.identity = key or self.identity
        self.quota = self.quota if quota is None else quota
        await self.start()


@pytest.fixture
async def bob(
    hass: HomeAssistant, tmp_path: Path, node_entry: MockConfigEntry
) -> AsyncIterator[Bob]:
    """Bob's node, already trusting Alice's key (he pasted her code), 1 GB granted to her."""
    key, _ = await hass.async_add_executor_job(identity.load_or_create, tmp_path / "bob.key")
    storage = tmp_path / "bob-disk"
    storage.mkdir()
    engine = EngineLoop("bob-engine")
    await hass.async_add_executor_job(engine.start)
    node = Bob(engine, storage, key, node_entry.data[CONF_NODE_PUBLIC_KEY])
    try:
        await node.start()
        yield node
    finally:
        await node.stop()
        await hass.async_add_executor_job(engine.stop)


def pin_peer(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    key: identity.Identity,
    address: str,
    *,
    name: str = "Bob",
    quota: int = 10**9,
    jail: str | None = None,
    **subentry: Any,
) -> ConfigSubentry:
    """Pair ``entry`` with the node of ``key`` at ``address`` without the flow."""
    peer = ConfigSubentry(
        data=MappingProxyType(
            {
                CONF_NAME: name,
                CONF_JAIL: name.lower() if jail is None else jail,
                CONF_ADDRESSES: [address],
                CONF_PUBLIC_KEY: key.public_line,
                CONF_QUOTA: quota,
            }
        ),
        subentry_type=SUBENTRY_PEER,
        title=name,
        unique_id=key.fingerprint,
        **subentry,
    )
    hass.config_entries.async_add_subentry(entry, peer)
    return peer


def add_peer(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    bob: Bob,
    *,
    quota: int = 10**9,
    subentry_id: str = BOB_ID,
    name: str = "Bob",
) -> ConfigSubentry:
    """Pair ``entry`` with Bob without the flow (his key pinned, ``quota`` granted to him)."""
    return pin_peer(
        hass, entry, bob.identity, bob.address, name=name, quota=quota, subentry_id=subentry_id
    )


def add_folder(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    path: Path,
    *,
    name: str = "Photos",
    peers: tuple[str, ...] = (BOB_ID,),
    subentry_id: str = PHOTOS_ID,
    schedule: str = "daily",
    at: str = "03:00:00",
    hours: int = 6,
    bwlimit: float = 0,
    exclude: tuple[str, ...] = (),
    watch_minutes: int | None = None,
    encrypted: bool | None = None,
) -> ConfigSubentry:
    """Protect ``path`` on ``peers`` without the flow (watched if ``watch_minutes``).

    ``encrypted`` None: a folder set up before encryption existed (no such key: plain).
    """
    watch = {CONF_WATCH: True, CONF_WATCH_MINUTES: watch_minutes} if watch_minutes else {}
    kind = {} if encrypted is None else {CONF_ENCRYPTED: encrypted}
    subentry = ConfigSubentry(
        data=MappingProxyType(
            {
                **watch,
                **kind,
                CONF_NAME: name,
                CONF_PATH: str(path),
                CONF_PEERS: list(peers),
                CONF_SCHEDULE: schedule,
                CONF_TIME: at,
                CONF_HOURS: hours,
                CONF_RETENTION_DAYS: 30,
                CONF_BWLIMIT: bwlimit,
                CONF_EXCLUDE: list(exclude),
            }
        ),
        subentry_type=SUBENTRY_FOLDER,
        title=name,
        unique_id=name,
        subentry_id=subentry_id,
    )
    hass.config_entries.async_add_subentry(entry, subentry)
    return subentry


@dataclass
class RunningNode:
    """Alice paired with Bob, protecting a folder on him: ``await running_node(path, ...)``.

    The folder: a path, or the files to write in a new one (tmp_path/photos). The options go
    to ``add_folder`` (name, schedule, encrypted, watch_minutes…).
    """

    hass: HomeAssistant
    entry: MockConfigEntry
    bob: Bob
    tmp_path: Path

    def protect(self, folder: Path | dict[str, bytes], **options: Any) -> Path:
        """Pair with Bob and protect ``folder`` on him, the node not set up yet."""
        if isinstance(folder, dict):
            folder = make_tree(self.tmp_path / "photos", folder)
        add_peer(self.hass, self.entry, self.bob)
        add_folder(self.hass, self.entry, folder, **options)
        return folder

    async def __call__(self, folder: Path | dict[str, bytes], **options: Any) -> Path:
        """``protect``, then set the node up and wait until idle (its first sync done)."""
        folder = self.protect(folder, **options)
        await setup_entry(self.hass, self.entry)
        await self.hass.async_block_till_done(wait_background_tasks=True)
        return folder


@pytest.fixture
def running_node(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> RunningNode:
    """Alice, ready to protect a folder on Bob and start (see ``RunningNode``)."""
    return RunningNode(hass, node_entry, bob, tmp_path)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path: content) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def plain_leaks(disk: Path, names: list[str], contents: list[bytes]) -> list[str]:
    """What of ``names`` (in any path) and ``contents`` (in any file) ``disk`` shows in clear.

    Bob's whole disk: an encrypted replica must show none of them.
    """
    leaks: list[str] = []
    for path in sorted(disk.rglob("*")):
        rel = str(path.relative_to(disk))
        leaks += [f"name {name!r} in {rel}" for name in names if name in rel]
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"content of {rel}" for content in contents if content in data]
    return leaks


def stored_pair(
    hass_storage: dict[str, Any],
    entry: MockConfigEntry,
    pair: dict[str, Any],
    **data: Any,
) -> None:
    """What ``entry``'s Store holds at start: Photos → Bob's ``pair`` record (and ``data``)."""
    hass_storage[f"{DOMAIN}.{entry.entry_id}"] = {
        "version": 1,
        "key": f"{DOMAIN}.{entry.entry_id}",
        "data": {"pairs": {f"{PHOTOS_ID}|{BOB_ID}": pair}, **data},
    }


# The moment the "synced node" fixtures freeze: a Monday at noon (UTC); the last sync ran
# at 10:00 UTC, 03:00 in Home Assistant's test time zone (US/Pacific), as scheduled.
NOW = "2026-05-04 12:00:00+00:00"
DISK = storage_root.DiskUsage(total=500 * 10**9, used=123 * 10**9, free=377 * 10**9)


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    """Snapshots through Home Assistant's extension (registry ids as ANY, states as dicts)."""
    return snapshot.use_extension(HomeAssistantSnapshotExtension)


@pytest.fixture
def platforms() -> list[Platform] | None:
    """The platforms to set up (a test module narrows them to snapshot one)."""
    return None


@pytest.fixture
def enable_all_entities() -> Iterator[None]:
    """Create disabled-by-default entities enabled, to snapshot them too."""
    with patch(
        "homeassistant.helpers.entity.Entity.entity_registry_enabled_default",
        new_callable=PropertyMock,
        return_value=True,
    ):
        yield


@pytest.fixture
async def synced_node(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    node_entry: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    platforms: list[Platform] | None,
) -> AsyncIterator[MockConfigEntry]:
    """Alice, paired with Bob, protecting Photos on him, last synced two hours ago.

    Time is frozen and the disk figures fixed, so every state is the same on every run;
    nothing is due, so nothing runs unless the test asks.
    """
    freezer.move_to(NOW)
    now = dt_util.utcnow()
    photos = make_tree(tmp_path / "photos", {"a.jpg": b"a" * 1000, "sub/b.jpg": b"b" * 2000})
    add_peer(hass, node_entry, bob)
    add_folder(hass, node_entry, photos)
    synced = (now - timedelta(hours=2)).isoformat()
    stored_pair(
        hass_storage,
        node_entry,
        {
            "last_success": synced,
            "last_attempt": synced,
            "first_attempt": (now - timedelta(days=30)).isoformat(),
            "failures": 0,
            "last_files_sent": 2,
            "last_bytes_sent": 3000,
            "last_duration": 1.5,
        },
    )
    with (
        patch("custom_components.mynas.engine.storage_root.disk_usage", return_value=DISK),
        patch(
            "custom_components.mynas.hass_entry.PLATFORMS",
            platforms or list(hass_entry.PLATFORMS),
        ),
    ):
        await setup_entry(hass, node_entry)
        await hass.async_block_till_done(wait_background_tasks=True)
        yield node_entry
        # Unload with the same platforms.
        await hass.config_entries.async_unload(node_entry.entry_id)


def _any_port(data: Any, path: Any) -> Any:
    """A loopback address's port (Bob listens where the system says) as <port>."""
    if type(data) is not str:  # not a StrEnum key: those keep their own form
        return data
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", data)


def snapshot_entities(
    hass: HomeAssistant, snapshot: SnapshotAssertion, entry: MockConfigEntry
) -> None:
    """Snapshot every registry entry of ``entry`` and its state (as core's snapshot_platform)."""
    registry = er.async_get(hass)
    entities = sorted(
        er.async_entries_for_config_entry(registry, entry.entry_id), key=lambda e: e.entity_id
    )
    assert entities
    for entity in entities:
        assert entity == snapshot(name=f"{entity.entity_id}-entry")
        assert entity.disabled_by is None, "enable every entity to snapshot its state"
        state = hass.states.get(entity.entity_id)
        assert state, f"no state for {entity.entity_id}"
        assert state == snapshot(name=f"{entity.entity_id}-state", matcher=_any_port)


class Gate:
    """A gate that coroutines on any loop wait at (cancellably) until a thread opens it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def set(self) -> None:
        """Open the gate for everyone waiting and to come."""
        with self._lock:
            self._open = True
            waiting, self._waiting = self._waiting, []
        for loop, event in waiting:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> None:
        """Wait until the gate opens."""
        event = asyncio.Event()
        with self._lock:
            if self._open:
                return
            waiter = (asyncio.get_running_loop(), event)
            self._waiting.append(waiter)
        try:
            await event.wait()
        finally:
            with self._lock:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)


@contextmanager
def gated_pushes(hass: HomeAssistant) -> Iterator[tuple[asyncio.Queue[str], Gate]]:
    """Hold every push inside the engine (the peer's lock taken) until the gate opens.

    Yields a queue that receives each folder's name as its push starts, and the gate.
    """
    real = replicator.push
    entered: asyncio.Queue[str] = asyncio.Queue()
    release = Gate()

    async def push(*args: Any, **kwargs: Any) -> PushResult:
        hass.loop.call_soon_threadsafe(entered.put_nowait, args[2])
        await release.wait()
        return await real(*args, **kwargs)

    with patch("custom_components.mynas.engine.node.push_folder", push):
        try:
            yield entered, release
        finally:
            release.set()
