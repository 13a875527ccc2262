"""Back up after changes: a protected folder watched with watchdog (real inotify, real files).

A file written into a watched folder starts a sync once the folder has been quiet for the
debounce; our own sync reading the folder does not start another; syncs started by changes
are never closer than the folder's interval; a folder whose disk goes away is unwatched and
watched again when it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
import subprocess
import time
from typing import Any

from freezegun.api import FrozenDateTimeFactory
from homeassistant.core import Event, HomeAssistant
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed

from custom_components.mynas.const import EVENT_SYNC_FINISHED, SCHEDULER_TICK
from custom_components.mynas.folder_watch import QUIET, _State, due
from custom_components.mynas.models import SyncKind, folder_setup

from .conftest import NOW, PHOTOS_ID, Bob, RunningNode, add_folder, make_tree, setup_entry

INTERVAL = timedelta(minutes=15)
T0 = datetime(2026, 5, 4, 12, 0, tzinfo=dt_util.UTC)


def test_due_waits_for_quiet_but_not_forever() -> None:
    """Quiet for QUIET after the last change, at most INTERVAL after the first."""
    assert due(_State(), INTERVAL) is None
    state = _State(first_change=T0, last_change=T0)
    assert due(state, INTERVAL) == T0 + QUIET
    # A burst: each change pushes it back...
    state.last_change = T0 + timedelta(minutes=3)
    assert due(state, INTERVAL) == T0 + timedelta(minutes=3) + QUIET
    # ...but a folder written to without pause is synced INTERVAL after its first change.
    state.last_change = T0 + timedelta(minutes=14, seconds=50)
    assert due(state, INTERVAL) == T0 + INTERVAL


def test_due_never_sooner_than_the_interval_after_the_last_sync() -> None:
    state = _State(first_change=T0, last_change=T0, last_sync=T0 - timedelta(minutes=2))
    assert due(state, INTERVAL) == T0 + timedelta(minutes=13)
    state.last_sync = T0 - timedelta(hours=1)
    assert due(state, INTERVAL) == T0 + QUIET
    # An interval shorter than the debounce: the debounce still holds.
    assert due(_State(first_change=T0, last_change=T0), timedelta(seconds=5)) == T0 + QUIET


def test_a_folder_from_before_the_option_is_not_watched(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    old = add_folder(hass, node_entry, tmp_path, subentry_id="old")
    assert folder_setup(old).watch_interval is None
    new = add_folder(hass, node_entry, tmp_path, name="New", subentry_id="new", watch_minutes=5)
    assert folder_setup(new).watch_interval == timedelta(minutes=5)


async def _advance(hass: HomeAssistant, freezer: FrozenDateTimeFactory, delta: timedelta) -> None:
    freezer.tick(delta)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)


async def _until(hass: HomeAssistant, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (real time: the clock is frozen) for the observer's thread to tell the loop."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await hass.async_add_executor_job(time.sleep, 0.02)
    raise AssertionError("the watcher heard nothing")


@pytest.fixture
async def watched(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    running_node: RunningNode,
) -> list[dict[str, Any]]:
    """Alice protects a watched Photos on Bob; its first sync done. Returns the syncs seen."""
    freezer.move_to(NOW)
    photos = make_tree(tmp_path / "photos", {"a.jpg": b"a" * 1000})
    running_node.protect(photos, watch_minutes=15)
    syncs: list[dict[str, Any]] = []

    def heard(event: Event) -> None:
        syncs.append(dict(event.data))

    hass.bus.async_listen(EVENT_SYNC_FINISHED, heard)
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    watcher = node_entry.runtime_data.manager.watcher
    await _until(hass, lambda: PHOTOS_ID in watcher.watching)
    assert [sync["status"] for sync in syncs] == ["success"]  # the first one, at once
    return syncs


async def test_a_file_written_is_synced_after_the_debounce(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    watched: list[dict[str, Any]],
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
) -> None:
    manager = node_entry.runtime_data.manager
    state = manager.watcher._states[PHOTOS_ID]
    # Our own first sync read every file: no change noted.
    assert state.first_change is None
    (tmp_path / "photos" / "new.jpg").write_bytes(b"n" * 5000)
    await _until(hass, lambda: state.last_change is not None)
    # Not yet: the folder must stay quiet for the debounce first.
    await _advance(hass, freezer, QUIET - timedelta(seconds=5))
    assert len(watched) == 1
    await _advance(hass, freezer, timedelta(seconds=6))
    assert [sync["status"] for sync in watched] == ["success", "success"]
    assert watched[-1]["files"] == 1
    assert (bob.replica("Photos") / "new.jpg").read_bytes() == b"n" * 5000
    # That sync read the folder: it starts no other, however long we wait.
    await hass.async_add_executor_job(time.sleep, 1.5)
    await _advance(hass, freezer, INTERVAL + QUIET)
    assert len(watched) == 2
    # A change soon after: synced INTERVAL after the last sync the watch started, not before.
    (tmp_path / "photos" / "later.jpg").write_bytes(b"l" * 10)
    await _until(hass, lambda: state.last_change is not None)
    await _advance(hass, freezer, QUIET + timedelta(seconds=1))
    assert len(watched) == 3  # INTERVAL had passed since the last one: at once
    (tmp_path / "photos" / "soon.jpg").write_bytes(b"s" * 10)
    await _until(hass, lambda: state.last_change is not None)
    await _advance(hass, freezer, QUIET + timedelta(seconds=1))
    assert len(watched) == 3
    await _advance(hass, freezer, INTERVAL)
    assert len(watched) == 4
    assert (bob.replica("Photos") / "soon.jpg").exists()


async def test_a_folder_whose_disk_goes_away_is_watched_again_when_back(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    running_node: RunningNode,
) -> None:
    freezer.move_to(NOW)
    photos = tmp_path / "photos"
    photos.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(photos)], check=True)
    try:
        make_tree(photos, {"a.jpg": b"a"})
        await running_node(photos, watch_minutes=1)
        watcher = node_entry.runtime_data.manager.watcher
        await _until(hass, lambda: PHOTOS_ID in watcher.watching)
    finally:
        subprocess.run(["umount", str(photos)], check=True)
    await _advance(hass, freezer, SCHEDULER_TICK)
    assert PHOTOS_ID not in watcher.watching
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(photos)], check=True)
    try:
        make_tree(photos, {"a.jpg": b"a"})
        await _advance(hass, freezer, SCHEDULER_TICK)
        assert PHOTOS_ID in watcher.watching
        (photos / "b.jpg").write_bytes(b"b")
        state = watcher._states[PHOTOS_ID]
        await _until(hass, lambda: state.last_change is not None)
        await _advance(hass, freezer, QUIET + timedelta(minutes=1))
        assert (bob.replica("Photos") / "b.jpg").read_bytes() == b"b"
        await hass.config_entries.async_unload(node_entry.entry_id)
        await hass.async_block_till_done()
    finally:
        subprocess.run(["umount", "-l", str(photos)], check=True)


async def test_a_folder_that_cannot_be_watched_keeps_its_schedule(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
    running_node: RunningNode,
) -> None:
    """Not there at start (or past the inotify limit): said once, tried again each check."""
    freezer.move_to(NOW)
    photos = tmp_path / "photos"
    await running_node(photos, watch_minutes=15)
    watcher = node_entry.runtime_data.manager.watcher
    assert watcher.watching == frozenset()
    assert caplog.text.count("Cannot watch") == 1
    await _advance(hass, freezer, SCHEDULER_TICK)
    assert caplog.text.count("Cannot watch") == 1
    make_tree(photos, {"a.jpg": b"a"})
    await _advance(hass, freezer, SCHEDULER_TICK)
    assert PHOTOS_ID in watcher.watching


async def test_a_change_during_a_run_gets_a_sync_of_its_own(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    watched: list[dict[str, Any]],
    freezer: FrozenDateTimeFactory,
) -> None:
    """The folder settled while a sync of it was under way: one more comes after it."""
    manager = node_entry.runtime_data.manager
    state = manager.watcher._states[PHOTOS_ID]
    (pair,) = manager.pairs
    manager.start(pair, SyncKind.SYNC)  # under way (its scan may be past the change)
    manager._sync_changed(PHOTOS_ID)
    assert state.first_change is not None
    await hass.async_block_till_done(wait_background_tasks=True)
    assert len(watched) == 2
    await _advance(hass, freezer, INTERVAL + QUIET)
    assert len(watched) == 3
