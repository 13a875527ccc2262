"""Sensors: the node's disk and hosted space, each peer's figures, each pair's backup."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
import json
import os
from pathlib import Path
import shutil

from freezegun.api import FrozenDateTimeFactory
from homeassistant.const import STATE_UNAVAILABLE, Platform
from homeassistant.core import Event, EventStateChangedData, HomeAssistant, callback
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.helpers.event import async_track_state_change_event
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from syrupy.assertion import SnapshotAssertion

from custom_components.mynas import sensor
from custom_components.mynas.const import (
    CONF_NODE_PUBLIC_KEY,
    CONF_PORT,
    DISK_SCAN_INTERVAL,
    DOMAIN,
    SCHEDULER_TICK,
)
from custom_components.mynas.engine.owner import push as replicator
from custom_components.mynas.engine.owner.index import Index
from custom_components.mynas.engine.owner.run import PeerTarget, Phase, Progress
from custom_components.mynas.models import SyncKind, SyncState

from .conftest import (
    BOB_ID,
    PHOTOS_ID,
    Bob,
    RunningNode,
    add_peer,
    gated_pushes,
    make_tree,
    setup_entry,
    snapshot_entities,
    unmount,
)

INTEGRATION = Path(__file__).parent.parent / "custom_components" / "mynas"
EN = json.loads((INTEGRATION / "translations" / "en.json").read_text())
ICONS = json.loads((INTEGRATION / "icons.json").read_text())

# Polls run as background tasks at a random sub-second offset: step a little past each one.
NEXT_POLL = DISK_SCAN_INTERVAL + timedelta(seconds=1)
SENSORS = ("disk_size", "disk_used", "disk_free", "disk_used_percent")


def _disk(hass: HomeAssistant, key: str) -> str:
    return _state(hass, f"sensor.alice_{key}")


async def test_sensors_show_what_df_shows(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    await setup_entry(hass, node_entry)
    usage = shutil.disk_usage(node_root)
    # The sensors keep bytes natively and show GB; compare the native figures.
    registry = er.async_get(hass)
    for key, expected in (
        ("disk_size", usage.total),
        ("disk_used", usage.used),
        ("disk_free", usage.free),
    ):
        entity_id = f"sensor.alice_{key}"
        assert registry.async_get(entity_id) is not None
        state = hass.states.get(entity_id)
        # In the unit that fits the disk (GB or TB), one decimal.
        assert state.attributes["unit_of_measurement"] == sensor.fitting_unit(expected)
        # disk_free moves as the machine writes; allow 64 MiB of drift between readings.
        assert _size(hass, entity_id) == pytest.approx(expected, abs=7e7)
    percent = float(_disk(hass, "disk_used_percent"))
    assert percent == pytest.approx(100 * usage.used / (usage.used + usage.free), abs=0.2)


async def test_sensors_belong_to_node_device(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    await setup_entry(hass, node_entry)
    devices = dr.async_entries_for_config_entry(dr.async_get(hass), node_entry.entry_id)
    assert len(devices) == 1
    device = devices[0]
    assert device.identifiers == {("mynas", node_entry.entry_id)}
    assert device.name == "Alice"
    entities = er.async_entries_for_device(er.async_get(hass), device.id)
    assert sorted(e.translation_key for e in entities) == sorted(
        [
            "check_reachability",
            "disk_total",
            "disk_used",
            "disk_free",
            "disk_used_percent",
            "hosted_total",
            "reachability",
            "upnp",
        ]
    )
    assert all(
        e.has_entity_name
        for e in er.async_entries_for_config_entry(er.async_get(hass), node_entry.entry_id)
    )


async def test_sensors_unavailable_when_disk_vanishes_then_recover(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    freezer: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await setup_entry(hass, node_entry)
    marker = node_root / ".mynas" / "node.json"
    saved = marker.read_bytes()
    unmount(node_root)
    for _ in range(3):
        freezer.tick(NEXT_POLL)
        async_fire_time_changed(hass)
        await hass.async_block_till_done(wait_background_tasks=True)
    for key in SENSORS:
        assert _disk(hass, key) == STATE_UNAVAILABLE
    # One log line for the outage, not one per poll.
    missing = [r for r in caplog.records if "is missing" in r.getMessage()]
    assert len(missing) == 1
    # The disk comes back: the sensors follow.
    marker.parent.mkdir(parents=True)
    marker.write_bytes(saved)
    freezer.tick(NEXT_POLL)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert float(_disk(hass, "disk_size")) > 0


# --- every sensor of a node with one peer and one folder -------------------------------------


@pytest.fixture
def platforms() -> list[Platform]:
    """Only sensors, so that the snapshot is about them."""
    return [Platform.SENSOR]


@pytest.mark.usefixtures("enable_all_entities")
async def test_snapshot(
    hass: HomeAssistant, synced_node: MockConfigEntry, snapshot: SnapshotAssertion
) -> None:
    snapshot_entities(hass, snapshot, synced_node)


async def test_entities_are_named_translated_and_have_icons(
    hass: HomeAssistant, synced_node: MockConfigEntry
) -> None:
    entities = er.async_entries_for_config_entry(er.async_get(hass), synced_node.entry_id)
    # node (disk, reachability, UPnP), peer (hosted, contact, address), folder × peer
    assert len(entities) == 7 + 7 + 13
    for entity in entities:
        assert entity.has_entity_name, entity.entity_id
        assert entity.translation_key in EN["entity"]["sensor"], entity.entity_id
        assert entity.translation_key in ICONS["entity"]["sensor"], entity.entity_id
    disabled = sorted(e.translation_key for e in entities if e.disabled_by is not None)
    assert disabled == [
        "bytes_left",
        "files_left",
        "last_bytes_sent",
        "last_duration",
        "last_files_sent",
    ]
    assert all(
        e.disabled_by is er.RegistryEntryDisabler.INTEGRATION
        for e in entities
        if e.disabled_by is not None
    )


async def test_devices_node_peer_folder(hass: HomeAssistant, synced_node: MockConfigEntry) -> None:
    devices = dr.async_get(hass)
    entry_id = synced_node.entry_id
    node = devices.async_get_device_by_identifier((DOMAIN, entry_id), entry_id)
    assert node is not None
    assert (node.config_entry_id, node.config_subentry_id) == (entry_id, None)
    by_subentry = {}
    for device in dr.async_entries_for_config_entry(devices, entry_id):
        if device.id != node.id:
            assert device.config_entry_id == entry_id
            by_subentry[device.config_subentry_id] = device
            assert device.via_device_id == node.id
    assert set(by_subentry) == {BOB_ID, PHOTOS_ID}
    assert (by_subentry[BOB_ID].name, by_subentry[BOB_ID].model) == ("Bob", "Peer")
    assert (by_subentry[PHOTOS_ID].name, by_subentry[PHOTOS_ID].model) == (
        "Photos",
        "Protected folder",
    )
    # Each entity sits on the device of its own subentry.
    for entity in er.async_entries_for_config_entry(er.async_get(hass), entry_id):
        device = devices.async_get(entity.device_id)
        assert device is not None
        assert device.config_subentry_id == entity.config_subentry_id


async def test_backup_age_grows_with_time(
    hass: HomeAssistant, synced_node: MockConfigEntry, freezer: FrozenDateTimeFactory
) -> None:
    assert _sensor(hass, "photos_backup_age_on_bob") == "2.0"
    assert _sensor(hass, "photos_last_backup_to_bob") == "2026-05-04T10:00:00+00:00"
    for _ in range(3 * 60):  # three hours, the scheduler ticking every minute
        freezer.tick(SCHEDULER_TICK)
        async_fire_time_changed(hass)
    await hass.async_block_till_done()
    assert _sensor(hass, "photos_backup_age_on_bob") == "5.0"
    assert _sensor(hass, "photos_backup_state_on_bob") == "idle"


async def test_peer_figures(hass: HomeAssistant, synced_node: MockConfigEntry) -> None:
    """Bob answers: last seen now, nothing of ours there yet, 1 GB granted to us."""
    assert _sensor(hass, "bob_last_seen") == "2026-05-04T12:00:00+00:00"
    assert _size(hass, "sensor.bob_space_we_use_there") < 1e6
    assert _sensor(hass, "bob_quota_granted_to_us") == "1.0"  # quotas: whole GB
    # What Bob may use here: next to nothing yet (his empty folders), of the 1 GB we grant.
    assert _size(hass, "sensor.bob_space_used_here") < 1e6
    assert float(_sensor(hass, "bob_quota_used_here")) < 0.1
    assert _sensor(hass, "bob_quota_granted") == "1.0"
    assert _size(hass, "sensor.alice_space_hosted_for_peers") < 1e6


async def test_last_seen_moves_by_the_minute(
    hass: HomeAssistant, synced_node: MockConfigEntry, freezer: FrozenDateTimeFactory
) -> None:
    """A peer that syncs connects many times a second: one state change a minute at most."""
    manager = synced_node.runtime_data.manager
    changes: list[str] = []

    @callback
    def record(event: Event[EventStateChangedData]) -> None:
        if event.data["new_state"] is not None:
            changes.append(event.data["new_state"].state)

    async_track_state_change_event(hass, ["sensor.bob_last_seen"], record)
    for _ in range(30):  # ten seconds of connections, three a second
        freezer.tick(timedelta(seconds=1 / 3))
        manager.contact(BOB_ID, dt_util.utcnow())
        await hass.async_block_till_done()
    assert changes == []
    freezer.tick(timedelta(seconds=51))  # a minute after the last value
    now = dt_util.utcnow()
    manager.contact(BOB_ID, now)
    await hass.async_block_till_done()
    assert changes == [now.isoformat(timespec="seconds")]


async def test_space_there_is_unavailable_while_the_peer_does_not_answer(
    hass: HomeAssistant, synced_node: MockConfigEntry, bob: Bob
) -> None:
    """What Bob told us of his disk no longer holds once he does not answer."""
    manager = synced_node.runtime_data.manager
    assert _sensor(hass, "bob_quota_granted_to_us") == "1.0"
    await bob.stop()
    await manager.probe(BOB_ID)
    await hass.async_block_till_done()
    assert _sensor(hass, "bob_space_we_use_there") == STATE_UNAVAILABLE
    assert _sensor(hass, "bob_quota_granted_to_us") == STATE_UNAVAILABLE
    await bob.start()
    await manager.probe(BOB_ID)
    await hass.async_block_till_done()
    assert _sensor(hass, "bob_quota_granted_to_us") == "1.0"


@pytest.mark.usefixtures("enable_all_entities")
async def test_progress_while_transferring(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, running_node: RunningNode
) -> None:
    """A bandwidth limit makes the transfer last: its state, progress and data left show."""
    size = 6_000_000
    source = make_tree(tmp_path / "video", {"film.mkv": os.urandom(size)})
    running_node.protect(source, name="Video", bwlimit=2)  # 2 MB/s: about 2 s
    seen: list[tuple[str, str, str, str]] = []
    ids = [
        "sensor.video_backup_state_on_bob",
        "sensor.video_backup_progress_to_bob",
        "sensor.video_data_left_for_bob",
        "sensor.video_files_left_for_bob",
    ]

    @callback
    def record(_event: Event[EventStateChangedData]) -> None:
        seen.append(tuple(_state(hass, entity_id) for entity_id in ids))  # type: ignore[arg-type]

    async_track_state_change_event(hass, ids, record)
    await setup_entry(hass, node_entry)  # never synced: it starts at once
    await hass.async_block_till_done(wait_background_tasks=True)
    moving = [row for row in seen if row[0] == "transferring"]
    assert moving, seen
    assert any(row[1] not in ("unknown", "unavailable") for row in moving), seen
    for _, progress, bytes_left, files_left in moving:
        if progress != "unknown":
            assert 0 <= float(progress) <= 100
        if bytes_left != "unknown":
            assert 0 <= float(bytes_left) * 1e6 <= size  # MB: it fitted the nothing left
        if files_left != "unknown":
            assert files_left in ("0", "1")
    # Done: the last run's figures.
    assert seen[-1] == ("idle", "100.0", "0.0", "0")
    assert _sensor(hass, "video_files_sent_to_bob_last_time") == "1"
    # 6 MB read as such, not as "0.01 GB".
    assert _size(hass, "sensor.video_data_sent_to_bob_last_time") == pytest.approx(6e6)
    assert (
        hass.states.get("sensor.video_data_sent_to_bob_last_time").attributes["unit_of_measurement"]
        == "MB"
    )
    assert float(_sensor(hass, "video_last_backup_duration_on_bob")) >= 1
    assert _sensor(hass, "video_last_error_with_bob") == STATE_UNAVAILABLE  # no error to tell


async def test_last_error_and_error_state(
    hass: HomeAssistant,
    bob: Bob,
    running_node: RunningNode,
) -> None:
    await bob.stop()
    await running_node({"a.txt": b"a"}, name="Docs")
    assert _sensor(hass, "docs_backup_state_on_bob") == "error"
    # Said for the household (translated); the engine's words are the details.
    error = hass.states.get("sensor.docs_last_error_with_bob")
    assert error is not None
    assert error.state == "unreachable"
    assert "connection refused" in error.attributes["details"]
    state = hass.states.get("sensor.docs_backup_state_on_bob")
    assert state is not None
    assert {key: state.attributes[key] for key in ("folder", "peer", "last_success")} == {
        "folder": "Docs",
        "peer": "Bob",
        "last_success": None,
    }
    assert _sensor(hass, "docs_last_backup_to_bob") == "unknown"
    assert _sensor(hass, "docs_backup_age_on_bob") == "unknown"
    state = hass.states.get("binary_sensor.bob_connection")
    assert state is not None
    assert state.state == "off"
    assert state.attributes["reachability"] == "unreachable"


async def test_space_bob_uses_here(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
) -> None:
    """Alice hosts for Bob: his push shows in his sensors and the node's total."""
    add_peer(hass, node_entry, bob, quota=2_000_000)
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert _sensor(hass, "bob_space_used_here") == "0.0"
    source = make_tree(tmp_path / "bob-docs", {"tax.pdf": os.urandom(500_000)})
    index = await hass.async_add_executor_job(Index, tmp_path / "bob-index.sqlite")
    alice = PeerTarget(
        "alice",
        (f"127.0.0.1:{node_entry.data[CONF_PORT]}",),
        node_entry.data[CONF_NODE_PUBLIC_KEY],
    )
    try:
        result = await bob.engine.run(replicator.push(bob.identity, alice, "Docs", source, index))
    finally:
        await hass.async_add_executor_job(index.close)
    assert result.files_sent == 1
    freezer.tick(NEXT_POLL)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)
    used = node_entry.runtime_data.node_data.data.hosted[BOB_ID]
    assert used.used >= 500_000
    assert used.quota == 2_000_000
    assert _size(hass, "sensor.bob_space_used_here") == pytest.approx(used.used, abs=1e5)
    assert float(_sensor(hass, "bob_quota_used_here")) == round(100 * used.used / 2_000_000, 1)
    assert _size(hass, "sensor.alice_space_hosted_for_peers") == pytest.approx(used.used, abs=1e5)
    # Bob connected to us: he counts as seen.
    assert _sensor(hass, "bob_last_seen") not in ("unknown", "unavailable")


def _sensor(hass: HomeAssistant, key: str) -> str:
    return _state(hass, f"sensor.{key}")


UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _size(hass: HomeAssistant, entity_id: str) -> float:
    """A data-size sensor's state, in bytes, whatever unit it is shown in."""
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return float(state.state) * UNITS[state.attributes["unit_of_measurement"]]


def _state(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


@pytest.mark.usefixtures("enable_all_entities")
async def test_state_progress_and_left_follow_the_engine(
    hass: HomeAssistant, synced_node: MockConfigEntry, freezer: FrozenDateTimeFactory
) -> None:
    """Each state of the enum, as the engine's progress reports come in (throttled)."""
    manager = synced_node.runtime_data.manager
    pair = manager.pairs[0]
    sync = manager._progress_sink(pair, verifying=False)
    verify = manager._progress_sink(pair, verifying=True)

    async def report(sink: Callable[[Progress], None], progress: Progress) -> tuple[str, ...]:
        sink(progress)
        freezer.tick(2)  # past the entities' throttle
        async_fire_time_changed(hass)
        await hass.async_block_till_done()
        return tuple(
            _sensor(hass, f"photos_{key}")
            for key in (
                "backup_state_on_bob",
                "backup_progress_to_bob",
                "files_left_for_bob",
                "data_left_for_bob",
            )
        )

    with gated_pushes(hass) as (entered, release):
        run = manager.start(pair, SyncKind.SYNC)
        await entered.get()  # the peer is ours: the run has started
        await hass.async_block_till_done()
        assert _sensor(hass, "photos_backup_state_on_bob") == "scanning"
        assert await report(sync, Progress(Phase.CONNECTING)) == (
            "scanning",
            "unknown",
            "0",
            "0.0",
        )
        # Data moves while the scan goes on: a transfer, its end not known yet.
        moving = Progress(
            Phase.SCANNING, files_done=1, files_total=4, bytes_done=1000, bytes_total=4000
        )
        assert await report(sync, moving) == ("transferring", "unknown", "3", "0.003")  # MB
        known = Progress(
            Phase.TRANSFERRING,
            files_done=2,
            files_total=4,
            bytes_done=3000,
            bytes_total=4000,
            scan_complete=True,
        )
        assert await report(sync, known) == ("transferring", "75.0", "2", "0.001")
        # "Done" comes with the run's result, not from a report.
        assert (await report(sync, Progress(Phase.DONE)))[0] == "transferring"
        assert (await report(verify, Progress(Phase.VERIFYING)))[0] == "verifying"
        # Two reports within the throttle: one update, still pending when the run ends.
        sync(known)
        sync(known)
        await hass.async_block_till_done()
        release.set()
        assert (await run)["status"] == "success"
    await hass.async_block_till_done()
    assert _sensor(hass, "photos_backup_state_on_bob") == "idle"
    # Complete: everything is there. A report that comes after the end changes nothing.
    assert await report(sync, known) == ("idle", "100.0", "0", "0.0")


async def test_progress_pending_when_the_node_stops(
    hass: HomeAssistant, synced_node: MockConfigEntry
) -> None:
    """A throttled update still pending when the node stops is dropped with it."""
    manager = synced_node.runtime_data.manager
    pair = manager.pairs[0]
    sync = manager._progress_sink(pair, verifying=False)
    with gated_pushes(hass) as (entered, _release):
        manager.start(pair, SyncKind.SYNC)
        await entered.get()
        for _ in range(3):
            sync(Progress(Phase.TRANSFERRING, files_done=1, files_total=2, bytes_done=10))
        await hass.async_block_till_done()
        assert await hass.config_entries.async_unload(synced_node.entry_id)
    assert manager.data.pairs[pair].state is SyncState.IDLE
