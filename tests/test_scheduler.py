"""The scheduler, driven by the clock (``freezer``) against a real peer on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

from freezegun.api import FrozenDateTimeFactory
from homeassistant.core import Event, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
    async_fire_time_changed,
)

from custom_components.mynas.const import DOMAIN, EVENT_SYNC_FINISHED, SCHEDULER_TICK
from custom_components.mynas.engine import identity, storage_root
from custom_components.mynas.engine.node import Reachability
from custom_components.mynas.models import SyncKind, SyncState
from custom_components.mynas.sync_manager import SyncManager

from .conftest import (
    BOB_ID,
    PAIR,
    PHOTOS_ID,
    Bob,
    RunningNode,
    add_folder,
    gated_pushes,
    make_tree,
    setup_entry,
    stored_pair,
)

DOCS_ID = "01FOLDERDOCS00000000000000"
Protect = Callable[..., list[Event]]
Start = Callable[..., Awaitable[list[Event]]]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A small folder to protect."""
    return make_tree(tmp_path / "photos", {"a.jpg": b"a" * 1000, "sub/b.jpg": b"b" * 2000})


@pytest.fixture
async def paris(hass: HomeAssistant) -> None:
    """Daily times are in Home Assistant's time zone: make it one with DST."""
    await hass.config.async_set_time_zone("Europe/Paris")


async def _advance(
    hass: HomeAssistant, freezer: FrozenDateTimeFactory, to: datetime | timedelta
) -> None:
    if isinstance(to, timedelta):
        freezer.tick(to)
    else:
        freezer.move_to(to)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)


def _statuses(events: list[Event]) -> list[str]:
    return [event.data["status"] for event in events]


@pytest.fixture
def protect(hass: HomeAssistant, running_node: RunningNode, photos: Path) -> Protect:
    """Pair with Bob and protect ``photos`` on him; return the sync events from now on."""

    def protect(**folder: Any) -> list[Event]:
        running_node.protect(photos, **folder)
        return async_capture_events(hass, EVENT_SYNC_FINISHED)

    return protect


@pytest.fixture
def start(hass: HomeAssistant, running_node: RunningNode, photos: Path) -> Start:
    """``protect``, then load the node and let its first runs finish."""

    async def start(**folder: Any) -> list[Event]:
        events = async_capture_events(hass, EVENT_SYNC_FINISHED)
        await running_node(photos, **folder)
        return events

    return start


def _manager(entry: MockConfigEntry) -> SyncManager:
    return entry.runtime_data.manager


async def test_never_synced_pair_runs_at_once(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, start: Start
) -> None:
    events = await start()
    assert _statuses(events) == ["success"]
    assert (bob.replica("Photos") / "sub" / "b.jpg").read_bytes() == b"b" * 2000
    status = _manager(node_entry).data.pairs[PAIR]
    assert status.state is SyncState.IDLE
    assert status.last_attempt == status.first_attempt
    assert status.last_success is not None
    assert status.last_success >= status.last_attempt


async def test_daily_schedule_runs_at_its_time(
    hass: HomeAssistant,
    paris: None,
    node_entry: MockConfigEntry,
    freezer: FrozenDateTimeFactory,
    start: Start,
) -> None:
    freezer.move_to("2026-05-04 10:00:00+02:00")
    events = await start(schedule="daily", at="03:00:00")
    assert _statuses(events) == ["success"]  # never synced: at once
    manager = _manager(node_entry)
    assert manager.next_run(PAIR) == dt_util.parse_datetime("2026-05-05 03:00:00+02:00")
    # The day goes by, minute after minute as the scheduler ticks: nothing until 03:00.
    for hour in range(11, 24):
        await _advance(hass, freezer, dt_util.parse_datetime(f"2026-05-04 {hour}:00:00+02:00"))
    await _advance(hass, freezer, dt_util.parse_datetime("2026-05-05 02:59:00+02:00"))
    assert len(events) == 1
    await _advance(hass, freezer, dt_util.parse_datetime("2026-05-05 03:00:00+02:00"))
    assert _statuses(events) == ["success", "success"]
    assert manager.data.pairs[PAIR].last_success == dt_util.parse_datetime(
        "2026-05-05 03:00:00+02:00"
    )
    assert manager.next_run(PAIR) == dt_util.parse_datetime("2026-05-06 03:00:00+02:00")


async def test_interval_schedule(
    hass: HomeAssistant,
    freezer: FrozenDateTimeFactory,
    start: Start,
) -> None:
    events = await start(schedule="interval", hours=6)
    assert len(events) == 1
    await _advance(hass, freezer, timedelta(hours=5, minutes=58))
    assert len(events) == 1
    await _advance(hass, freezer, timedelta(minutes=3))
    assert len(events) == 2
    await _advance(hass, freezer, timedelta(hours=6, minutes=1))
    assert _statuses(events) == ["success"] * 3


async def test_retries_with_backoff_while_the_peer_is_down(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
    start: Start,
) -> None:
    # Late morning: the daily 03:00 run must not fall inside the retry window.
    freezer.move_to(dt_util.now().replace(hour=10, minute=0))
    await bob.stop()
    events = await start()
    manager = _manager(node_entry)
    status = manager.data.pairs[PAIR]
    first = status.last_attempt
    assert first is not None
    assert (status.failures, status.state) == (1, SyncState.ERROR)
    assert "connection refused" in (status.last_error or "")
    # Retries come after 5 minutes, then 10, then 20...
    attempts: list[timedelta] = []
    for _ in range(4 * 60):  # four hours, one scheduler tick a minute
        await _advance(hass, freezer, SCHEDULER_TICK)
        if status.last_attempt != first + sum(attempts, timedelta()):
            attempts.append(status.last_attempt - first - sum(attempts, timedelta()))
        if len(attempts) == 5:
            break
    assert [round(a.total_seconds() / 60) for a in attempts] == [5, 10, 20, 40, 80]
    assert status.failures == 6
    assert _statuses(events) == ["failed"] * 6
    assert "connection refused" in events[-1].data["error"]
    # Bob comes back: the next retry succeeds and the schedule resumes.
    await bob.start()
    for _ in range(160):
        await _advance(hass, freezer, SCHEDULER_TICK)
        if status.failures == 0:
            break
    assert (status.failures, status.state, status.last_error) == (0, SyncState.IDLE, None)
    assert _statuses(events)[-1] == "success"
    # One warning for the outage, one line when it is over: not one per retry.
    failed = [r for r in caplog.records if "Sync of Photos to Bob failed" in r.getMessage()]
    assert [r.levelname for r in failed].count("WARNING") == 1
    assert "Sync of Photos to Bob works again" in caplog.text


async def test_never_two_runs_of_a_pair_at_once(
    hass: HomeAssistant, node_entry: MockConfigEntry, protect: Protect
) -> None:
    events = protect()
    with gated_pushes(hass) as (entered, release):
        await setup_entry(hass, node_entry)
        assert await entered.get() == "Photos"
        manager = _manager(node_entry)
        running = manager.start(PAIR, SyncKind.SYNC)
        # Asking again (the button, the service, the next tick) gives the same run.
        assert manager.start(PAIR, SyncKind.SYNC) is running
        await hass.services.async_call(DOMAIN, "sync", {"folder": "Photos"}, blocking=True)
        assert manager.start(PAIR, SyncKind.SYNC) is running
        # A verify waits for the sync to end.
        verify = manager.start(PAIR, SyncKind.VERIFY)
        assert verify is not running
        await asyncio.sleep(0)
        assert manager.data.pairs[PAIR].state is SyncState.SCANNING
        release.set()
        summary = await running
        assert summary["status"] == "success"
        assert (await verify)["status"] == "success"
    await hass.async_block_till_done(wait_background_tasks=True)
    assert [(e.data["kind"], e.data["status"]) for e in events] == [
        ("sync", "success"),
        ("verify", "success"),
    ]
    assert entered.empty()  # one push only


async def test_one_transfer_per_peer_at_a_time(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, protect: Protect
) -> None:
    """Two folders to Bob: the second waits for the first, without looking busy."""
    docs = make_tree(tmp_path / "docs", {"letter.txt": b"dear bob"})
    add_folder(hass, node_entry, docs, name="Docs", subentry_id=DOCS_ID)
    events = protect()
    with gated_pushes(hass) as (entered, release):
        await setup_entry(hass, node_entry)
        first = await entered.get()
        await hass.async_block_till_done()
        manager = _manager(node_entry)
        states = {
            name: manager.data.pairs[(fid, BOB_ID)].state
            for name, fid in (("Photos", PHOTOS_ID), ("Docs", DOCS_ID))
        }
        second = "Docs" if first == "Photos" else "Photos"
        assert states == {first: SyncState.SCANNING, second: SyncState.IDLE}
        assert entered.empty()
        assert manager.running((DOCS_ID, BOB_ID))
        assert manager.running(PAIR)
        release.set()
        assert await entered.get() == second
    await hass.async_block_till_done(wait_background_tasks=True)
    assert [e.data["folder"] for e in events] == [first, second]
    assert _statuses(events) == ["success", "success"]


async def test_state_survives_a_restart(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    node_entry: MockConfigEntry,
    start: Start,
) -> None:
    await start()
    before = _manager(node_entry).data.pairs[PAIR]
    assert before.last_success is not None
    assert await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    stored = hass_storage[f"{DOMAIN}.{node_entry.entry_id}"]["data"]
    assert stored["pairs"][f"{PHOTOS_ID}|{BOB_ID}"]["last_success"] == (
        before.last_success.isoformat()
    )
    after = _manager(node_entry).data.pairs[PAIR]
    # Synced just now: the reload did not run it again.
    assert after.last_success == before.last_success
    assert after.last_files_sent == before.last_files_sent == 2
    assert _manager(node_entry).data.peers[BOB_ID].last_seen is not None


async def test_restored_failures_keep_the_backoff(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    node_entry: MockConfigEntry,
    freezer: FrozenDateTimeFactory,
    start: Start,
) -> None:
    """Failures survive a restart: the pair shows its error and retries on schedule."""
    freezer.move_to(dt_util.now().replace(hour=10, minute=0))  # far from the daily 03:00
    now = dt_util.utcnow()
    stored_pair(
        hass_storage,
        node_entry,
        {
            "last_attempt": (now - timedelta(minutes=1)).isoformat(),
            "first_attempt": (now - timedelta(hours=2)).isoformat(),
            "failures": 3,
            "last_error": "cannot reach 127.0.0.1:1: connection refused",
        },
        peers={BOB_ID: {"last_seen": (now - timedelta(days=1)).isoformat()}},
    )
    events = await start()
    status = _manager(node_entry).data.pairs[PAIR]
    assert (status.state, status.failures) == (SyncState.ERROR, 3)
    assert events == []  # the retry is due 20 minutes after the last attempt
    await _advance(hass, freezer, timedelta(minutes=19, seconds=30))
    assert _statuses(events) == ["success"]
    assert status.first_attempt == now - timedelta(hours=2)


async def test_no_run_while_the_disk_is_missing(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    bob: Bob,
    photos: Path,
    freezer: FrozenDateTimeFactory,
    start: Start,
) -> None:
    """Unplugged or swapped: no run sends anything, and none counts against the pair."""
    events = await start(schedule="interval", hours=1)
    assert len(events) == 1
    marker = node_root / ".mynas" / "node.json"
    saved = marker.read_bytes()
    marker.unlink()
    (photos / "new.jpg").write_bytes(b"new")
    # The sync is due: whether the coordinator or the run notices first, nothing is sent.
    await _advance(hass, freezer, timedelta(hours=2))
    manager = _manager(node_entry)
    assert not manager.storage_ok
    assert all(e.data["status"] == "failed" for e in events[1:])
    assert all("no MyNAS marker" in e.data["error"] for e in events[1:])
    assert not (bob.replica("Photos") / "new.jpg").exists()
    assert manager.data.pairs[PAIR].failures == 0
    with pytest.raises(HomeAssistantError) as err:
        await hass.services.async_call(DOMAIN, "sync", {}, blocking=True)
    assert err.value.translation_key == "storage_unavailable"
    await _advance(hass, freezer, timedelta(hours=2))
    assert len(events) <= 2  # paused: no retries meanwhile
    # The disk is back: the coordinator sees it, the scheduler resumes.
    marker.write_bytes(saved)
    await _advance(hass, freezer, timedelta(minutes=1, seconds=1))
    await _advance(hass, freezer, timedelta(minutes=1))
    assert manager.storage_ok
    assert events[-1].data["status"] == "success"
    assert (bob.replica("Photos") / "new.jpg").read_bytes() == b"new"


async def test_a_run_checks_the_disk_first(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    start: Start,
) -> None:
    """Started before the coordinator noticed, a run still refuses a foreign disk."""
    await start()
    storage_root.write_marker(node_root, storage_root.Marker("other", "Eve"))
    summary = await _manager(node_entry).start(PAIR, SyncKind.SYNC)
    assert summary["status"] == "failed"
    assert "belongs to another MyNAS node" in summary["error"]
    assert not _manager(node_entry).storage_ok


async def test_the_tick_leaves_a_running_pair_alone(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    freezer: FrozenDateTimeFactory,
    protect: Protect,
) -> None:
    events = protect(schedule="interval", hours=1)
    with gated_pushes(hass) as (entered, release):
        await setup_entry(hass, node_entry)
        await entered.get()
        # Hours pass while the (slow) first sync runs: the scheduler starts no second one.
        for _ in range(3):
            freezer.tick(timedelta(hours=1))
            async_fire_time_changed(hass)
            await hass.async_block_till_done()
        assert entered.empty()
        release.set()
        await hass.async_block_till_done(wait_background_tasks=True)
    assert _statuses(events) == ["success"]


async def test_an_unexpected_engine_error_ends_the_run_cleanly(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    caplog: pytest.LogCaptureFixture,
    protect: Protect,
) -> None:
    events = protect()
    with patch(
        "custom_components.mynas.engine.node.push_folder",
        side_effect=RuntimeError("index on fire"),
    ):
        await setup_entry(hass, node_entry)
        await hass.async_block_till_done(wait_background_tasks=True)
    status = _manager(node_entry).data.pairs[PAIR]
    # Not stuck "scanning": an error state, a failure counted, a retry planned.
    assert (status.state, status.failures, status.last_error) == (
        SyncState.ERROR,
        1,
        "index on fire",
    )
    assert [(e.data["status"], e.data["error"]) for e in events] == [("failed", "index on fire")]
    assert "Unexpected error in sync of Photos to Bob" in caplog.text


async def test_a_peer_that_has_not_added_us_yet(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path, start: Start
) -> None:
    """Bob answers with his key but does not know ours: "waiting", not "unreachable"."""
    stranger, _ = await hass.async_add_executor_job(identity.load_or_create, tmp_path / "other.key")
    bob.alice_key = stranger.public_line
    await bob.restart()
    await start()
    manager = _manager(node_entry)
    assert manager.data.peers[BOB_ID].reachability is Reachability.WAITING
    assert "has not added this node yet" in (manager.data.pairs[PAIR].last_error or "")
    # The sync says so too.
    summary = await manager.start(PAIR, SyncKind.SYNC)
    assert "refused our key" in summary["error"]
    assert manager.data.peers[BOB_ID].reachability is Reachability.WAITING
