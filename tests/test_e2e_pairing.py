"""A real second node (engine only, on 127.0.0.1) is paired, a folder synced through
``mynas.sync``, and the sensors, the event and the files on the other side show it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
import time
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.util import dt as dt_util
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_capture_events

from custom_components.mynas.const import (
    CONF_BWLIMIT,
    CONF_EXCLUDE,
    CONF_INVITE,
    CONF_NAME,
    CONF_PATH,
    CONF_PEERS,
    CONF_QUOTA_GB,
    CONF_RETENTION_DAYS,
    CONF_TIME,
    DOMAIN,
    EVENT_SYNC_FINISHED,
    SCHEDULE_DAILY,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)

from .conftest import (
    Bob,
    RunningNode,
    make_tree,
    plain_leaks,
    setup_entry,
    stored_pair,
)


def _state(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


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
    while result["type"] is FlowResultType.SHOW_PROGRESS:  # the connection test runs
        await hass.async_block_till_done()
        result = await hass.config_entries.subentries.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)
    peer_id = next(
        sub.subentry_id
        for sub in node_entry.subentries.values()
        if sub.subentry_type == SUBENTRY_PEER
    )
    # Protect a folder on Bob.
    source = make_tree(
        tmp_path / "photos",
        {"2024/beach.jpg": os.urandom(200_000), "notes.txt": b"hello"},
    )
    result = await hass.config_entries.subentries.async_init(
        (node_entry.entry_id, SUBENTRY_FOLDER), context={"source": "user"}
    )
    events = async_capture_events(hass, EVENT_SYNC_FINISHED)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        {
            CONF_NAME: "Photos",
            CONF_PATH: str(source),
            CONF_PEERS: [peer_id],
            CONF_RETENTION_DAYS: 30,
            CONF_BWLIMIT: 0,
            CONF_EXCLUDE: "",
        },
    )
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {"next_step_id": SCHEDULE_DAILY}
    )
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_TIME: "03:00"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    # The node restarts with the folder; a pair that never ran runs at once.
    await hass.async_block_till_done(wait_background_tasks=True)
    assert [event.data["status"] for event in events] == ["success"]
    (source / "notes.txt").write_text("hello again")
    response = await hass.services.async_call(
        DOMAIN, "sync", {"folder": "Photos", "wait": True}, blocking=True, return_response=True
    )
    result = response["results"][0]
    assert result["status"] == "success", response
    assert (result["folder"], result["peer"], result["files_sent"]) == ("Photos", "Bob", 1)
    # Set up in the flow, the folder's copy is encrypted: Bob's disk shows no name and no
    # content of it, and it comes back whole with our key.
    assert not bob.replica("Photos").exists()
    beach = (source / "2024" / "beach.jpg").read_bytes()
    leaks = await hass.async_add_executor_job(
        plain_leaks,
        bob.storage,
        ["Photos", "notes", "beach", "2024"],
        [b"hello again", beach[1000:1100]],
    )
    assert leaks == []
    back = tmp_path / "back"
    restored = await node_entry.runtime_data.node.restore("Photos", peer_id, str(back))
    assert restored.failed == 0
    assert (back / "notes.txt").read_text() == "hello again"
    assert (back / "2024" / "beach.jpg").read_bytes() == beach
    assert _state(hass, "sensor.photos_encryption_on_bob") == "encrypted"
    await hass.async_block_till_done(wait_background_tasks=True)
    event = events[-1].data
    assert event["folder"] == "Photos"
    assert event["peer"] == "Bob"
    assert event["kind"] == "sync"
    assert event["entry_id"] == node_entry.entry_id
    assert 0 <= event["duration"] < 60
    assert (event["status"], event["files"], event["error"]) == ("success", 1, None)
    # What went on the wire: the sealed file (a header, its meta block, one tag per chunk).
    assert len("hello again") < event["bytes"] < len("hello again") + 200
    # What the dashboard shows.
    last = dt_util.parse_datetime(_state(hass, "sensor.photos_last_backup_to_bob"))
    assert last is not None
    assert abs((dt_util.utcnow() - last).total_seconds()) < 60
    assert float(_state(hass, "sensor.photos_backup_age_on_bob")) < 0.1
    assert _state(hass, "sensor.photos_backup_state_on_bob") == "idle"
    assert _state(hass, "binary_sensor.photos_backup_to_bob_overdue") == "off"
    assert _state(hass, "binary_sensor.bob_connection") == "on"
    # After a sync the node asks Bob how much of his disk we use.
    assert int(_state(hass, "sensor.bob_space_we_use_there").split(".")[0]) >= 0
    status = node_entry.runtime_data.manager.data.peers[peer_id]
    # Disk blocks, trash included (the old notes.txt): at least what was sent.
    assert status.used_there >= 200_000 + len("hello again")
    assert status.quota_there == 10**9


async def test_home_assistant_loop_never_blocks_during_a_big_sync(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    node_entry: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    running_node: RunningNode,
) -> None:
    """Invariant 6: thousands of small files go through while HA's loop stays responsive."""
    count = 3000
    source = make_tree(
        tmp_path / "many", {f"d{i % 30:02d}/f{i:05d}.bin": os.urandom(2048) for i in range(count)}
    )
    running_node.protect(source, name="Many")
    # Synced a minute ago (as far as the schedule knows): the sync below is the only one.
    now = dt_util.utcnow().isoformat()
    stored_pair(hass_storage, node_entry, {"last_attempt": now, "last_success": now})
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        interval = 0.005
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(interval)
            lags.append(time.perf_counter() - before - interval)

    task = hass.async_create_background_task(ticker(), "loop lag ticker")
    response = await hass.services.async_call(
        DOMAIN, "sync", {"wait": True}, blocking=True, return_response=True
    )
    stop.set()
    await task
    assert response["results"][0]["files_sent"] == count, response
    assert len(list(bob.replica("Many").rglob("*.bin"))) == count
    lags.sort()
    worst, p99 = lags[-1], lags[int(len(lags) * 0.99)]
    print(
        f"HA loop lag during a sync of {count} files, {len(lags)} ticks: "
        f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms"
    )
    # The goal is 0.1 s; a loaded 2-core CI box gets some slack.
    assert worst < 0.25, f"the HA loop stalled for {worst:.3f} s"
