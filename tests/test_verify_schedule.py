"""The scrub: every copy verified (and repaired) once per period, spread, never in a storm.

Real nodes (Alice in Home Assistant, Bob's engine on 127.0.0.1) and Home Assistant's clock
moved by the freezer; the damage is done to Bob's disk itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

from freezegun.api import FrozenDateTimeFactory
from homeassistant.components.repairs import repairs_flow_manager
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
    async_fire_time_changed,
)

from custom_components.mynas.const import (
    CONF_VERIFY_DAYS,
    DOMAIN,
    EVENT_SYNC_FINISHED,
    VERIFY_STARTUP_DELAY,
)
from custom_components.mynas.engine.owner import verify as verify_module
from custom_components.mynas.models import SyncKind
from custom_components.mynas.scheduler import VERIFY_RETRY, verify_offset

from .conftest import (
    BOB_ID,
    NOW,
    PAIR,
    PHOTOS_ID,
    Bob,
    Gate,
    RunningNode,
    add_folder,
    make_tree,
    setup_entry,
)
from .flow_support import assert_translated

DAMAGE_ISSUE = f"verify_damage_{PHOTOS_ID}_{BOB_ID}"


# Fix flows run in the repairs integration.
pytestmark = pytest.mark.usefixtures("repairs_loaded")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of a few files."""
    return make_tree(
        tmp_path / "photos",
        {f"2024/{n}.jpg": bytes([n]) * (50_000 + n) for n in range(5)},
    )


def _state(hass: HomeAssistant, entity_id: str) -> str:
    state = hass.states.get(entity_id)
    assert state is not None, entity_id
    return state.state


def _when(hass: HomeAssistant, entity_id: str) -> datetime | None:
    return dt_util.parse_datetime(_state(hass, entity_id))


async def _at(hass: HomeAssistant, freezer: FrozenDateTimeFactory, when: datetime) -> None:
    """Move Home Assistant's clock to ``when`` and let what it starts run to its end."""
    freezer.move_to(when)
    async_fire_time_changed(hass, when)
    await hass.async_block_till_done(wait_background_tasks=True)


Started = Callable[..., Awaitable[list[Any]]]


@pytest.fixture
def started(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    photos: Path,
    freezer: FrozenDateTimeFactory,
    running_node: RunningNode,
) -> Started:
    """Alice protecting Photos (encrypted) on Bob, first synced now; the sync events.

    Called with the node's options.
    """

    async def start(**options: Any) -> list[Any]:
        freezer.move_to(NOW)
        hass.config_entries.async_update_entry(node_entry, options=options)
        events = async_capture_events(hass, EVENT_SYNC_FINISHED)
        await running_node(photos, encrypted=True)
        assert [(e.data["kind"], e.data["status"]) for e in events] == [("sync", "success")]
        return events

    return start


async def _add_docs(hass: HomeAssistant, entry: MockConfigEntry, tmp_path: Path) -> None:
    """Protect Docs (encrypted) on Bob too; the node reloads and syncs it."""
    docs = make_tree(tmp_path / "docs", {"a.txt": b"a"})
    add_folder(hass, entry, docs, name="Docs", subentry_id="01FOLDERDOCS", encrypted=True)
    await hass.async_block_till_done(wait_background_tasks=True)


def _verifies(events: list[Any]) -> list[dict[str, Any]]:
    return [dict(event.data) for event in events if event.data["kind"] == "verify"]


async def test_the_monthly_verify_repairs_damage_at_bobs_and_says_so(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    photos: Path,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    events = await started()
    first = dt_util.utcnow()
    # The schedule is visible: 30 days after the first sync, at the pair's own time of day.
    expected = first + timedelta(days=30) + verify_offset(PAIR, timedelta(days=30))
    assert _when(hass, "sensor.photos_next_verify_on_bob") == expected.replace(microsecond=0)
    assert _state(hass, "sensor.photos_last_verify_on_bob") == "unavailable"
    # Bob's disk rots one of the sealed files.
    stored = max(
        (path for path in (bob.storage / "alice").rglob("*") if path.is_file()),
        key=lambda path: path.stat().st_size,
    )
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    # A minute before it is due: nothing. Then due: the daily sync goes first (a verify
    # never runs while its pair syncs), the verify at the next tick.
    await _at(hass, freezer, expected - timedelta(minutes=1))
    assert _verifies(events) == []
    await _at(hass, freezer, expected + timedelta(minutes=1))
    await _at(hass, freezer, expected + timedelta(minutes=2))
    (verify,) = _verifies(events)
    assert verify["status"] == "success", verify  # repaired
    assert (verify["host_damaged"], verify["repaired"]) == (1, 1)
    assert verify["checked"] == 5
    # Sent again: Bob's copy comes back whole.
    back = photos.parent / "back"
    restored = await node_entry.runtime_data.node.restore("Photos", BOB_ID, str(back))
    assert (restored.files, restored.failed) == (5, 0)
    for path in photos.rglob("*.jpg"):
        assert (back / path.relative_to(photos)).read_bytes() == path.read_bytes()

    issue = ir.async_get(hass).async_get_issue(DOMAIN, DAMAGE_ISSUE)
    assert issue is not None
    assert issue.severity is ir.IssueSeverity.WARNING
    placeholders = dict(issue.translation_placeholders or {})
    assert (placeholders["damaged"], placeholders["repaired"], placeholders["checked"]) == (
        "1",
        "1",
        "5",
    )
    assert placeholders["folder"] == "Photos"
    assert placeholders["peer"] == "Bob"
    assert ".jpg" in placeholders["examples"]
    last = _when(hass, "sensor.photos_last_verify_on_bob")
    assert last is not None
    assert abs(last - dt_util.utcnow()) < timedelta(minutes=2)
    attributes = hass.states.get("sensor.photos_last_verify_on_bob").attributes  # type: ignore[union-attr]
    assert (attributes["host_damaged"], attributes["repaired"]) == (1, 1)
    # Next month's comes 30 days after this one; a minute later nothing runs again.
    await _at(hass, freezer, expected + timedelta(minutes=3))
    assert len(_verifies(events)) == 1
    next_verify = _when(hass, "sensor.photos_next_verify_on_bob")
    assert next_verify is not None
    assert next_verify - last == timedelta(days=30)

    # The user takes note in the fix flow: the issue goes.
    flows = repairs_flow_manager(hass)
    result = await flows.async_init(DOMAIN, context={"issue_id": DAMAGE_ISSUE})
    assert result["step_id"] == "confirm"
    assert_translated(result, "issues", "verify_damage", "fix_flow")
    result = await flows.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert ir.async_get(hass).async_get_issue(DOMAIN, DAMAGE_ISSUE) is None

    # It is remembered across a restart.
    await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert _when(hass, "sensor.photos_last_verify_on_bob") == last


async def test_no_verify_storm_at_start_and_one_at_a_time(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    """Long overdue at start: none in the first minutes, then one per tick, none twice."""
    await started()
    await _add_docs(hass, node_entry, tmp_path)  # reloaded, Docs synced
    # Home Assistant was off for two months: both pairs are long due when it starts.
    await hass.config_entries.async_unload(node_entry.entry_id)
    started = dt_util.utcnow() + timedelta(days=60)
    freezer.move_to(started)
    events = async_capture_events(hass, EVENT_SYNC_FINISHED)
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    await _at(hass, freezer, started + VERIFY_STARTUP_DELAY - timedelta(minutes=1))
    assert _verifies(events) == []
    await _at(hass, freezer, started + VERIFY_STARTUP_DELAY)
    (first,) = [v["folder"] for v in _verifies(events)]  # one at a time
    await _at(hass, freezer, started + VERIFY_STARTUP_DELAY + timedelta(minutes=1))
    assert sorted(v["folder"] for v in _verifies(events)) == ["Docs", "Photos"]
    assert _verifies(events)[0]["folder"] == first
    await _at(hass, freezer, started + VERIFY_STARTUP_DELAY + timedelta(minutes=2))
    assert len(_verifies(events)) == 2


async def test_a_failed_verify_is_tried_again_an_hour_later(
    hass: HomeAssistant,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    events = await started()
    due = _when(hass, "sensor.photos_next_verify_on_bob")
    assert due is not None
    await _at(hass, freezer, due + timedelta(minutes=1))  # the daily sync, done
    await bob.stop()
    await _at(hass, freezer, due + timedelta(minutes=2))
    assert [v["status"] for v in _verifies(events)] == ["failed"]
    await _at(hass, freezer, due + timedelta(minutes=3))
    assert len(_verifies(events)) == 1  # not every minute
    assert _when(hass, "sensor.photos_next_verify_on_bob") == (
        due + timedelta(minutes=2) + VERIFY_RETRY
    )
    await bob.start()
    await _at(hass, freezer, due + timedelta(minutes=2) + VERIFY_RETRY)
    assert [v["status"] for v in _verifies(events)] == ["failed", "success"]


async def test_verifying_can_be_turned_off(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    """Configure → Verify copies: 0 days is never; the sensor says nothing is planned."""
    events = await started()
    result = await hass.config_entries.options.async_init(node_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "verify"}
    )
    assert result["step_id"] == "verify"
    assert_translated(result, "options")
    assert result["data_schema"]({})[CONF_VERIFY_DAYS] == 30
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_VERIFY_DAYS: 0}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.options[CONF_VERIFY_DAYS] == 0
    assert _state(hass, "sensor.photos_next_verify_on_bob") == "unavailable"
    await _at(hass, freezer, dt_util.utcnow() + timedelta(days=90))
    await _at(hass, freezer, dt_util.utcnow() + timedelta(minutes=1))
    assert _verifies(events) == []


async def test_every_week(
    hass: HomeAssistant,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    await started(**{CONF_VERIFY_DAYS: 7})
    due = _when(hass, "sensor.photos_next_verify_on_bob")
    assert due is not None
    offset = verify_offset(PAIR, timedelta(days=7))
    assert timedelta(0) <= offset < timedelta(days=1)
    assert due - dt_util.utcnow().replace(microsecond=0) <= timedelta(days=7) + offset


async def test_a_verify_waits_while_another_runs(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    started: Started,
) -> None:
    """Two pairs due: while the first verify runs (held inside the engine), none other starts."""
    await started()
    await _add_docs(hass, node_entry, tmp_path)
    manager = node_entry.runtime_data.manager
    pairs = [PAIR, ("01FOLDERDOCS", BOB_ID)]
    later = dt_util.utcnow() + timedelta(days=32)
    real = verify_module.verify
    release = Gate()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await real(*args, **kwargs)

    with patch("custom_components.mynas.engine.node.verify_folder", held):
        await _at(hass, freezer, later)  # the daily syncs, due too, go first
        later += timedelta(minutes=1)
        freezer.move_to(later)
        async_fire_time_changed(hass, later)
        await hass.async_block_till_done()
        started = [pair for pair in pairs if manager.running(pair, SyncKind.VERIFY)]
        assert len(started) == 1
        for minutes in (1, 2):
            freezer.move_to(later + timedelta(minutes=minutes))
            async_fire_time_changed(hass, later + timedelta(minutes=minutes))
            await hass.async_block_till_done()
            assert [p for p in pairs if manager.running(p, SyncKind.VERIFY)] == started
        release.set()
        await hass.async_block_till_done(wait_background_tasks=True)
        await _at(hass, freezer, later + timedelta(minutes=3))
    assert all(manager.data.pairs[pair].last_verify is not None for pair in pairs)
