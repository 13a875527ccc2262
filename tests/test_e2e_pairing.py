"""A real second node (engine only, on 127.0.0.1) is paired, a folder synced through
``mynas.sync``, and the sensors, the event and the files on the other side show it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
import os
from pathlib import Path

import pytest

from custom_components.mynas.const import (
    CONF_BWLIMIT,
    CONF_EXCLUDE,
    CONF_HOURS,
    CONF_INVITE,
    CONF_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PATH,
    CONF_PEERS,
    CONF_QUOTA_GB,
    CONF_RETENTION_DAYS,
    CONF_SCHEDULE,
    CONF_TIME,
    DOMAIN,
    EVENT_SYNC_FINISHED,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)
from custom_components.mynas.engine import identity, invite
from custom_components.mynas.engine.server import NodeServer, PeerGrant
from custom_components.mynas.engine.storage import HostedSpace
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_capture_events

from .conftest import setup_entry


@dataclass
class Bob:
    server: NodeServer
    storage: Path
    identity: identity.Identity
    code: str


@pytest.fixture
async def bob(tmp_path: Path, node_entry: MockConfigEntry) -> AsyncIterator[Bob]:
    """Bob's node, engine only, already trusting Alice's key (he pasted her code)."""
    key, _ = identity.load_or_create(tmp_path / "bob.key")
    storage = tmp_path / "bob-disk"
    storage.mkdir()
    space = HostedSpace(storage)
    alice_key = node_entry.data[CONF_NODE_PUBLIC_KEY]
    server = NodeServer(key, space, [PeerGrant("alice", alice_key, 10**9)])
    await server.start("127.0.0.1", 0)
    code = invite.encode(invite.Invite("Bob", (f"127.0.0.1:{server.port}",), key.public_line))
    yield Bob(server, storage, key, code)
    await server.close()


async def test_pair_sync_and_see_it(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    await setup_entry(hass, node_entry)
    # Pair: paste Bob's code, grant him 5 GB; he already added us, so the test passes.
    result = await hass.config_entries.subentries.async_init(
        (node_entry.entry_id, SUBENTRY_PEER), context={"source": "user"}
    )
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_INVITE: bob.code}
    )
    assert result["step_id"] == "confirm"
    assert result["description_placeholders"]["fingerprint"] == bob.identity.fingerprint
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_QUOTA_GB: 5}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    peer_id = next(
        sub.subentry_id
        for sub in node_entry.subentries.values()
        if sub.subentry_type == SUBENTRY_PEER
    )
    # Protect a folder on Bob.
    source = tmp_path / "photos"
    (source / "2024").mkdir(parents=True)
    (source / "2024" / "beach.jpg").write_bytes(os.urandom(200_000))
    (source / "notes.txt").write_text("hello")
    result = await hass.config_entries.subentries.async_init(
        (node_entry.entry_id, SUBENTRY_FOLDER), context={"source": "user"}
    )
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        {
            CONF_NAME: "Photos",
            CONF_PATH: str(source),
            CONF_PEERS: [peer_id],
            CONF_SCHEDULE: "daily",
            CONF_TIME: "03:00:00",
            CONF_HOURS: 6,
            CONF_RETENTION_DAYS: 30,
            CONF_BWLIMIT: 0,
            CONF_EXCLUDE: "",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)
    events = async_capture_events(hass, EVENT_SYNC_FINISHED)
    response = await hass.services.async_call(
        DOMAIN, "sync", {"folder": "Photos", "wait": True}, blocking=True, return_response=True
    )
    assert response["results"][0]["status"] == "success", response
    replica = bob.storage / "alice" / "Photos"
    assert (replica / "notes.txt").read_text() == "hello"
    assert (replica / "2024" / "beach.jpg").read_bytes() == (
        source / "2024" / "beach.jpg"
    ).read_bytes()
    await hass.async_block_till_done(wait_background_tasks=True)
    assert events and events[-1].data["status"] == "success"
    state = hass.states.get("sensor.photos_last_backup_to_bob")
    assert state is not None and state.state not in ("unknown", "unavailable"), state
