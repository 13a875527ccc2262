"""Home Assistant's own backups kept at a friend: the backup platform against a real Bob.

Bob is a real engine server on 127.0.0.1 (``conftest.Bob``); Alice is a real node in Home
Assistant with Home Assistant's ``backup`` integration loaded. Backups go through HA's own
backup manager, its websocket commands and its download view, and the bytes are checked on
Bob's disk, in Alice's area there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import json
import os
from pathlib import Path
import random
from types import MappingProxyType
from typing import Any

from homeassistant.components.backup import (
    AgentBackup,
    BackupAgent,
    BackupAgentError,
    BackupNotFound,
)
from homeassistant.components.backup.agent import BackupAgentUnreachableError
from homeassistant.components.backup.const import DATA_MANAGER
from homeassistant.config_entries import ConfigEntryState, ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.typing import (
    ClientSessionGenerator,
    WebSocketGenerator,
)

from custom_components.mynas.backup import MyNasBackupAgent
from custom_components.mynas.const import (
    CONF_ADDRESSES,
    CONF_JAIL,
    CONF_KEY_FILE,
    CONF_NAME,
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    DOMAIN,
    SUBENTRY_PEER,
)
from custom_components.mynas.engine import (
    AuthRefused,
    HostKeyMismatch,
    MyNasError,
    PeerConfig,
    PeerDiskFull,
    SealedFileError,
    identity,
)
from custom_components.mynas.engine.owner import sealed
from custom_components.mynas.engine.owner.backup_area import SealedArea
from custom_components.mynas.engine.owner.keys import DataKeys
from custom_components.mynas.models import DATA_BACKUP_AGENT_LISTENERS

from .conftest import ALICE_ENTRY_ID, BOB_ID, Bob, add_peer, setup_entry

AGENT_ID = f"{DOMAIN}.{ALICE_ENTRY_ID}_{BOB_ID}"
CAROL_ID = "01PEERCAROL000000000000000"


def _backup(backup_id: str = "abc123", size: int = 0) -> AgentBackup:
    return AgentBackup(
        addons=[],
        backup_id=backup_id,
        database_included=True,
        date="2026-05-04T12:00:00.000000+00:00",
        extra_metadata={"instance_id": "alice", "with_automatic_settings": False},
        folders=[],
        homeassistant_included=True,
        homeassistant_version="2026.10.4",
        name="Alice before the fire",
        protected=False,
        size=size,
    )


class _Stream:
    """HA's ``open_stream``: the archive in chunks of 1 MiB (what its file reader yields)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened = 0

    async def __call__(self) -> AsyncIterator[bytes]:
        self.opened += 1
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 1 << 20):
            yield self.data[start : start + (1 << 20)]


class _Progress:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, *, bytes_uploaded: int, **kwargs: Any) -> None:
        self.seen.append(bytes_uploaded)


class _AtBob:
    """Alice's backup area as it is on Bob's disk (sealed), read with Alice's own key."""

    def __init__(self, hass: HomeAssistant, bob: Bob) -> None:
        entry = hass.config_entries.async_entries(DOMAIN)[0]
        keys = DataKeys.of(identity.load(entry.data[CONF_KEY_FILE]))
        self.contents = keys.contents
        self.area = SealedArea(keys)
        self.jail = bob.storage / "alice"
        self.trash = bob.storage / ".mynas" / "trash" / "alice"

    def path(self, name: str) -> Path:
        return self.jail / os.fsdecode(self.area.stored(name.encode()))

    def open(self, name: str, data: bytes | None = None) -> bytes:
        stored = self.path(name).read_bytes() if data is None else data
        return sealed.open_sealed(self.contents, self.area.jail_path(name.encode()), stored)[1]

    def write(self, name: str, plain: bytes) -> None:
        sealer = self.area.sealer(name.encode(), len(plain))
        self.path(name).write_bytes(sealer.head + sealer.update(plain))

    def trashed(self, name: str) -> list[bytes]:
        stored = os.fsdecode(self.area.stored(name.encode()))
        return [self.open(name, path.read_bytes()) for path in self.trash.glob(f"*/{stored}")]


def _agent(hass: HomeAssistant, agent_id: str = AGENT_ID) -> BackupAgent:
    return hass.data[DATA_MANAGER].backup_agents[agent_id]


@pytest.fixture
async def backup_node(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> MockConfigEntry:
    """Alice paired with Bob, and Home Assistant's backup integration loaded."""
    add_peer(hass, node_entry, bob)
    assert await async_setup_component(hass, "backup", {})
    await setup_entry(hass, node_entry)
    assert node_entry.state is ConfigEntryState.LOADED
    return node_entry


async def _upload(hass: HomeAssistant, data: bytes, backup_id: str = "abc123") -> _Progress:
    progress = _Progress()
    await _agent(hass).async_upload_backup(
        open_stream=_Stream(data), backup=_backup(backup_id, len(data)), on_progress=progress
    )
    return progress


async def test_each_peer_is_a_backup_location(
    hass: HomeAssistant,
    backup_node: MockConfigEntry,
    bob: Bob,
    hass_ws_client: WebSocketGenerator,
) -> None:
    client = await hass_ws_client(hass)

    async def agents() -> list[dict[str, Any]]:
        await client.send_json_auto_id({"type": "backup/agents/info"})
        reply = await client.receive_json()
        assert reply["success"]
        return [agent for agent in reply["result"]["agents"] if agent["agent_id"] != "backup.local"]

    assert await agents() == [{"agent_id": AGENT_ID, "name": "Bob"}]
    # A second friend: the entry reloads, its listeners hear of it, two locations.
    carol = ConfigSubentry(
        data=MappingProxyType(
            {
                CONF_NAME: "Carol",
                CONF_JAIL: "carol",
                CONF_ADDRESSES: ["127.0.0.1:1"],
                CONF_PUBLIC_KEY: bob.identity.public_line.replace("AAAA", "AAAB", 1),
                CONF_QUOTA: 10**9,
            }
        ),
        subentry_type=SUBENTRY_PEER,
        title="Carol",
        unique_id="carol",
        subentry_id=CAROL_ID,
    )
    hass.config_entries.async_add_subentry(backup_node, carol)
    await hass.async_block_till_done()
    assert sorted(a["name"] for a in await agents()) == ["Bob", "Carol"]
    # The node unloaded: no location; loaded again: back.
    await hass.config_entries.async_unload(backup_node.entry_id)
    await hass.async_block_till_done()
    assert await agents() == []
    await hass.config_entries.async_setup(backup_node.entry_id)
    await hass.async_block_till_done()
    assert len(await agents()) == 2


async def test_upload_list_download_delete(
    hass: HomeAssistant,
    backup_node: MockConfigEntry,
    bob: Bob,
    hass_ws_client: WebSocketGenerator,
    hass_client: ClientSessionGenerator,
) -> None:
    data = random.Random(13).randbytes(5 * (1 << 20) + 777)
    progress = await _upload(hass, data)
    # The bytes are on Bob's disk, inside Alice's space there, with HA's metadata beside.
    at_bob = _AtBob(hass, bob)
    assert at_bob.path("abc123.tar").read_bytes() != data  # sealed there
    assert at_bob.open("abc123.tar") == data
    record = json.loads(at_bob.open("abc123.json"))
    assert record["metadata"] == _backup("abc123", len(data)).as_dict()
    assert progress.seen[-1] == len(data)
    assert progress.seen == sorted(progress.seen)

    client = await hass_ws_client(hass)
    await client.send_json_auto_id({"type": "backup/info"})
    info = (await client.receive_json())["result"]
    assert info["agent_errors"] == {}
    [listed] = info["backups"]
    assert listed["backup_id"] == "abc123"
    assert listed["name"] == "Alice before the fire"
    assert listed["agents"][AGENT_ID]["size"] == len(data)
    assert await _agent(hass).async_get_backup("abc123") == _backup("abc123", len(data))

    http = await hass_client()
    response = await http.get(f"/api/backup/download/abc123?agent_id={AGENT_ID}")
    assert response.status == 200
    assert await response.read() == data

    await client.send_json_auto_id({"type": "backup/delete", "backup_id": "abc123"})
    reply = await client.receive_json()
    assert reply["success"]
    assert reply["result"] == {"agent_errors": {}}
    assert not at_bob.path("abc123.tar").exists()
    assert at_bob.trashed("abc123.tar") == [data]
    with pytest.raises(BackupNotFound):
        await _agent(hass).async_get_backup("abc123")
    response = await http.get(f"/api/backup/download/abc123?agent_id={AGENT_ID}")
    assert response.status == 404


async def test_a_backup_made_by_home_assistant_goes_to_bob(
    hass: HomeAssistant,
    backup_node: MockConfigEntry,
    bob: Bob,
    hass_ws_client: WebSocketGenerator,
    hass_client: ClientSessionGenerator,
) -> None:
    """``backup/generate`` with the MyNAS location: HA's real archive lands on Bob's disk."""
    client = await hass_ws_client(hass)
    await client.send_json_auto_id(
        {
            "type": "backup/generate",
            "agent_ids": [AGENT_ID],
            "include_homeassistant": True,
            "include_database": False,
            "name": "Made by HA",
        }
    )
    reply = await client.receive_json()
    assert reply["success"], reply
    await hass.async_block_till_done(wait_background_tasks=True)
    await client.send_json_auto_id({"type": "backup/info"})
    info = (await client.receive_json())["result"]
    assert info["agent_errors"] == {}
    [made] = [b for b in info["backups"] if b["name"] == "Made by HA"]
    assert list(made["agents"]) == [AGENT_ID]
    stored = _AtBob(hass, bob).open(f"{made['backup_id']}.tar")
    assert made["agents"][AGENT_ID]["size"] == len(stored)
    http = await hass_client()
    response = await http.get(f"/api/backup/download/{made['backup_id']}?agent_id={AGENT_ID}")
    assert await response.read() == stored


async def test_a_full_quota_says_so_before_reading_the_backup(
    hass: HomeAssistant, backup_node: MockConfigEntry, bob: Bob
) -> None:
    await bob.restart(quota=2 * (1 << 20))
    stream = _Stream(b"q" * (3 << 20))
    with pytest.raises(BackupAgentError) as err:
        await _agent(hass).async_upload_backup(
            open_stream=stream, backup=_backup("big", 3 << 20), on_progress=_Progress()
        )
    assert not isinstance(err.value, BackupAgentUnreachableError)
    assert "Bob has no room left for this backup" in str(err.value)
    assert "needed" in str(err.value)
    assert stream.opened == 0
    assert await _agent(hass).async_list_backups() == []


async def test_a_peer_down(
    hass: HomeAssistant,
    backup_node: MockConfigEntry,
    bob: Bob,
    hass_ws_client: WebSocketGenerator,
) -> None:
    await _upload(hass, b"kept safe")
    await bob.stop()
    agent = _agent(hass)
    with pytest.raises(BackupAgentUnreachableError):
        await agent.async_list_backups()
    with pytest.raises(BackupAgentUnreachableError):
        await _upload(hass, b"more")
    with pytest.raises(BackupAgentUnreachableError):
        await agent.async_download_backup("abc123")
    with pytest.raises(BackupAgentUnreachableError):
        await agent.async_delete_backup("abc123")
    client = await hass_ws_client(hass)
    await client.send_json_auto_id({"type": "backup/info"})
    info = (await client.receive_json())["result"]
    assert info["agent_errors"] == {AGENT_ID: "The backup agent is unreachable."}
    # Back online: the backup is still there.
    await bob.start()
    assert [b.backup_id for b in await agent.async_list_backups()] == ["abc123"]


async def test_a_peer_lost_in_the_middle_of_a_download(
    hass: HomeAssistant, backup_node: MockConfigEntry, bob: Bob
) -> None:
    # More than the client buffers ahead of its reader (256 frames of 256 KiB, plus the SSH
    # window): Bob cannot have sent it all before he stops.
    data = b"z" * (96 << 20)
    await _upload(hass, data)
    chunks = await _agent(hass).async_download_backup("abc123")
    received = len(await anext(aiter(chunks)))
    await bob.stop()

    async def rest() -> None:
        nonlocal received
        async for chunk in chunks:
            received += len(chunk)

    with pytest.raises(BackupAgentUnreachableError):
        await rest()
    assert received < len(data)


async def test_missing_backups(hass: HomeAssistant, backup_node: MockConfigEntry) -> None:
    agent = _agent(hass)
    assert await agent.async_list_backups() == []
    for call in (agent.async_get_backup, agent.async_download_backup, agent.async_delete_backup):
        with pytest.raises(BackupNotFound):
            await call("nothing")
        with pytest.raises(BackupNotFound):
            await call("../not-an-id")


async def test_metadata_that_is_not_home_assistant_s_is_skipped(
    hass: HomeAssistant,
    backup_node: MockConfigEntry,
    bob: Bob,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _upload(hass, b"good")
    record = {"format": 1, "backup_id": "odd", "size": 3, "metadata": {"backup_id": "odd"}}
    at_bob = _AtBob(hass, bob)
    at_bob.write("odd.json", json.dumps(record).encode())
    at_bob.write("odd.tar", b"odd")
    agent = _agent(hass)
    assert [b.backup_id for b in await agent.async_list_backups()] == ["abc123"]
    assert "Ignoring backup odd kept at Bob" in caplog.text
    with pytest.raises(BackupNotFound):
        await agent.async_get_backup("odd")


async def test_a_bad_backup_id_cannot_be_uploaded(
    hass: HomeAssistant, backup_node: MockConfigEntry
) -> None:
    with pytest.raises(BackupAgentError, match="cannot be kept at Bob"):
        await _agent(hass).async_upload_backup(
            open_stream=_Stream(b"x"), backup=_backup("../x", 1), on_progress=_Progress()
        )


async def test_an_agent_of_a_node_that_stopped(
    hass: HomeAssistant, backup_node: MockConfigEntry
) -> None:
    agent = _agent(hass)
    await hass.config_entries.async_unload(backup_node.entry_id)
    await hass.async_block_till_done()
    with pytest.raises(BackupAgentUnreachableError):
        await agent.async_list_backups()


async def test_a_wrong_key_and_a_friend_who_has_not_added_us(
    hass: HomeAssistant, backup_node: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    other, _ = await hass.async_add_executor_job(identity.load_or_create, tmp_path / "other.key")
    original = bob.identity
    await bob.restart(key=other)
    with pytest.raises(BackupAgentError, match="presented another key"):
        await _agent(hass).async_list_backups()
    bob.identity = original
    bob.alice_key = other.public_line  # Bob now trusts someone else, not Alice
    await bob.restart()
    with pytest.raises(BackupAgentError, match="has not added this node"):
        await _agent(hass).async_list_backups()


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (PeerDiskFull("no space left"), "The disk of Bob is full"),
        (AuthRefused("bob"), "Bob has not added this node"),
        (HostKeyMismatch("bob", "SHA256:a", "SHA256:b"), "Bob presented another key"),
        (MyNasError("something odd"), "Keeping the backup at Bob failed: something odd"),
        (SealedFileError(b".ha-backups/x.tar", "chunk 3 altered"), "fails authentication"),
    ],
)
async def test_every_engine_error_reads_as_a_backup_error(
    hass: HomeAssistant, backup_node: MockConfigEntry, error: Exception, text: str
) -> None:
    peer = PeerConfig("p", "Bob", "bob", ("127.0.0.1:1",), "key", 0)
    agent = MyNasBackupAgent(backup_node, peer)
    with pytest.raises(BackupAgentError) as err, agent._translated("x"):
        raise error
    assert text in str(err.value)


async def test_listeners_are_registered_and_removed(
    hass: HomeAssistant, backup_node: MockConfigEntry
) -> None:
    from custom_components.mynas import backup as platform  # noqa: PLC0415

    assert len(hass.data[DATA_BACKUP_AGENT_LISTENERS]) == 1  # the backup manager's
    remove = platform.async_register_backup_agents_listener(hass, listener=lambda: None)
    assert len(hass.data[DATA_BACKUP_AGENT_LISTENERS]) == 2
    remove()
    assert len(hass.data[DATA_BACKUP_AGENT_LISTENERS]) == 1
    saved = hass.data.pop(DATA_BACKUP_AGENT_LISTENERS)
    try:
        remove = platform.async_register_backup_agents_listener(hass, listener=lambda: None)
        remove()
        assert DATA_BACKUP_AGENT_LISTENERS not in hass.data
    finally:
        hass.data[DATA_BACKUP_AGENT_LISTENERS] = saved


async def test_a_backup_altered_on_bob_s_disk_is_not_given_back(
    hass: HomeAssistant, backup_node: MockConfigEntry, bob: Bob
) -> None:
    data = random.Random(5).randbytes(3 << 20)
    await _upload(hass, data)
    at_bob = _AtBob(hass, bob)
    stored = bytearray(at_bob.path("abc123.tar").read_bytes())
    stored[-100] ^= 0x40
    at_bob.path("abc123.tar").write_bytes(bytes(stored))
    chunks = await _agent(hass).async_download_backup("abc123")
    received: list[bytes] = []

    async def read_all() -> None:
        async for chunk in chunks:
            received.append(chunk)

    with pytest.raises(BackupAgentError, match="fails authentication"):
        await read_all()
    assert len(b"".join(received)) < len(data)
