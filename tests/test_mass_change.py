"""A sync that would change most of a folder waits: a repair issue, "Send it" / "Not now".

Alice's Home Assistant and Bob's real node on 127.0.0.1: after a first sync, nearly every
file is rewritten (as ransomware would); the next sync is held — Bob's copies untouched,
the pair's last error says "held", a repair issue says what it would do — until "Send it".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from homeassistant.components.repairs import repairs_flow_manager
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas.const import CONF_MASS_CHANGE, DOMAIN
from custom_components.mynas.models import ErrorKind, SyncState

from .conftest import BOB_ID, PAIR, PHOTOS_ID, Bob, RunningNode
from .flow_support import assert_translated

ISSUE = f"mass_change_{PHOTOS_ID}_{BOB_ID}"
FIX = ("issues", "mass_change", "fix_flow")
TWENTY_FIVE = {f"{n:02}.jpg": b"photo %d" % n for n in range(25)}


# Fix flows run in the repairs integration.
pytestmark = pytest.mark.usefixtures("repairs_loaded")


def _held_at(bob: Bob) -> dict[str, str]:
    """Every file Bob holds for Alice (jail and trash), by path: its content hash."""
    found = {}
    for base in (bob.storage / "alice", bob.storage / ".mynas" / "trash" / "alice"):
        for folder, _, files in os.walk(base):
            for name in files:
                path = Path(folder) / name
                found[str(path.relative_to(bob.storage))] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return found


async def _sync(hass: HomeAssistant) -> Any:
    response = await hass.services.async_call(
        DOMAIN, "sync", {"folder": "Photos", "wait": True}, blocking=True, return_response=True
    )
    return response["results"][0]


async def _fix(hass: HomeAssistant, choice: str) -> Any:
    manager = repairs_flow_manager(hass)
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    assert result["type"] is FlowResultType.MENU
    assert result["menu_options"] == ["send", "not_now"]
    assert_translated(result, *FIX)
    return await manager.async_configure(result["flow_id"], {"next_step_id": choice})


async def test_a_mass_change_is_held_until_sent(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, running_node: RunningNode
) -> None:
    photos = await running_node(TWENTY_FIVE)
    assert (await _sync(hass))["status"] == "success"
    sent = _held_at(bob)
    assert len(sent) == 25

    for n in range(20):  # 20 of 25: 80 %
        (photos / f"{n:02}.jpg").write_bytes(b"encrypted by them %d" % n)
    held = await _sync(hass)
    assert held["status"] == "failed"
    assert "nothing was sent" in held["error"]
    assert _held_at(bob) == sent  # Bob's copies (and his trash) untouched
    status = node_entry.runtime_data.manager.data.pairs[PAIR]
    assert (status.state, status.last_error_kind) == (SyncState.ERROR, ErrorKind.HELD)
    issue = ir.async_get(hass).async_get_issue(DOMAIN, ISSUE)
    assert issue is not None
    assert issue.is_fixable
    text = issue.translation_placeholders or {}
    assert (text["replaced"], text["deleted"], text["total"]) == ("20", "0", "25")
    assert (text["share"], text["percent"]) == ("80", "30")
    assert text["examples"] == "00.jpg, 01.jpg, 02.jpg, 03.jpg, 04.jpg"
    assert text["folder"] == "Photos"
    assert text["peer"] == "Bob"
    assert text["since"]

    result = await _fix(hass, "not_now")
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "still_held"
    assert_translated(result, *FIX)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert ir.async_get(hass).async_get_issue(DOMAIN, ISSUE) is not None  # still there
    assert _held_at(bob) == sent

    result = await _fix(hass, "send")
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done(wait_background_tasks=True)
    now = _held_at(bob)
    assert len(now) == 45  # 20 new versions, the 20 old ones in Bob's trash
    assert set(sent.values()) <= set(now.values())  # every old version is still there
    assert ir.async_get(hass).async_get_issue(DOMAIN, ISSUE) is None
    status = node_entry.runtime_data.manager.data.pairs[PAIR]
    assert (status.state, status.last_error_kind, status.last_files_sent) == (
        SyncState.IDLE,
        None,
        20,
    )


async def test_the_threshold_is_an_option_and_0_never_holds(
    hass: HomeAssistant, node_entry: MockConfigEntry, running_node: RunningNode
) -> None:
    hass.config_entries.async_update_entry(node_entry, options={CONF_MASS_CHANGE: 0})
    photos = await running_node(TWENTY_FIVE)
    for n in range(25):
        (photos / f"{n:02}.jpg").write_bytes(b"changed %d" % n)
    result = await _sync(hass)
    assert (result["status"], result["files_sent"]) == ("success", 25)


async def test_send_it_needs_the_node_and_the_pair(
    hass: HomeAssistant, node_entry: MockConfigEntry, running_node: RunningNode
) -> None:
    from custom_components.mynas import issues  # noqa: PLC0415

    await running_node({"a.jpg": b"a"})
    text = {"folder": "Photos", "peer": "Bob", "replaced": "1", "deleted": "0", "total": "1"}
    text |= {"share": "100", "percent": "30", "examples": "a.jpg"}
    issues.mass_change(hass, node_entry.entry_id, PHOTOS_ID, "gone-peer", text)
    manager = repairs_flow_manager(hass)
    result = await manager.async_init(
        DOMAIN, context={"issue_id": f"mass_change_{PHOTOS_ID}_gone-peer"}
    )
    result = await manager.async_configure(result["flow_id"], {"next_step_id": "send"})
    assert result["reason"] == "pair_gone"
    issues.mass_change(hass, node_entry.entry_id, PHOTOS_ID, BOB_ID, text)
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    node_entry.runtime_data.manager.set_storage_ok(False, "the disk is gone")
    result = await manager.async_configure(result["flow_id"], {"next_step_id": "send"})
    assert result["reason"] == "node_not_loaded"
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    issues.mass_change(hass, node_entry.entry_id, PHOTOS_ID, BOB_ID, text)
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    result = await manager.async_configure(result["flow_id"], {"next_step_id": "send"})
    assert result["reason"] == "node_not_loaded"
