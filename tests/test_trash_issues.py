"""When trash fills a quota anyway, both sides get a repair issue that says so.

The owner's side: Bob (a real node on 127.0.0.1) refuses Alice for quota while the old
versions of her rewritten files fill her space there. The host's side: a friend's jail on
Alice's own disk at its quota, mostly trash.
"""

from __future__ import annotations

from datetime import timedelta
import os
from pathlib import Path
import shutil
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import coordinator
from custom_components.mynas.const import CONF_MASS_CHANGE, CONF_QUOTA, DOMAIN

from .conftest import BOB_ID, Bob, RunningNode, add_peer, setup_entry

KB = 1000


def _issue(hass: HomeAssistant, issue_id: str) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, issue_id)


async def _sync(hass: HomeAssistant) -> Any:
    response = await hass.services.async_call(
        DOMAIN, "sync", {"folder": "Photos", "wait": True}, blocking=True, return_response=True
    )
    await hass.async_block_till_done(wait_background_tasks=True)
    return response["results"][0]


async def test_the_owner_hears_that_trash_fills_its_space_there(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, running_node: RunningNode
) -> None:
    await bob.restart(quota=1000 * KB)
    hass.config_entries.async_update_entry(node_entry, options={CONF_MASS_CHANGE: 0})
    photos = await running_node({f"{n:02}.jpg": os.urandom(20 * KB) for n in range(30)})
    assert (await _sync(hass))["status"] == "success"
    assert _issue(hass, f"trash_fills_quota_{BOB_ID}") is None

    for n in range(30):  # every file rewritten: the old versions go to Bob's trash
        (photos / f"{n:02}.jpg").write_bytes(os.urandom(20 * KB))
    refused = await _sync(hass)
    assert refused["status"] == "failed"
    assert "quota" in refused["error"]
    issue = _issue(hass, f"trash_fills_quota_{BOB_ID}")
    assert issue is not None
    text = issue.translation_placeholders or {}
    assert text["peer"] == "Bob"
    assert text["folders"] == "Photos"
    assert text["quota"] == "1.0 MB"
    assert text["trash"].endswith("kB")
    assert float(text["trash"].split()[0]) >= 300
    assert text["frees_at"] != "-"
    assert text["until"] != "-"
    assert text["since"]

    await bob.restart(quota=10_000 * KB)  # Bob grants more space for a while
    assert (await _sync(hass))["status"] == "success"
    assert _issue(hass, f"trash_fills_quota_{BOB_ID}") is None


async def test_the_host_hears_that_a_friend_s_space_here_is_mostly_trash(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    bob: Bob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_peer(hass, node_entry, bob, quota=200 * KB)
    await setup_entry(hass, node_entry)
    runtime = node_entry.runtime_data
    issue_id = f"hosted_trash_full_{BOB_ID}"
    assert _issue(hass, issue_id) is None
    # What Bob's rewrites left here: his folder, and its old versions in his trash.
    (node_root / "bob" / "F").mkdir(parents=True, exist_ok=True)
    (node_root / "bob" / "F" / "new").write_bytes(b"n" * 60 * KB)
    old = node_root / ".mynas" / "trash" / "bob" / "20261201T000000Z" / "F"
    old.mkdir(parents=True)
    (old / "new").write_bytes(b"o" * 130 * KB)
    engine = runtime.node._node

    async def rescan() -> None:
        await runtime.node.engine.loop.run_in_executor(None, engine.server.space.rescan, "bob")

    await runtime.node.run(rescan())
    await runtime.node_data.async_refresh()
    issue = _issue(hass, issue_id)
    assert issue is not None
    text = issue.translation_placeholders or {}
    assert text["peer"] == "Bob"
    assert text["quota"] == "200 kB"
    assert text["trash"] == "139 kB"  # 32 blocks of 4 KiB, and two directories
    assert text["days"] == "30"
    assert text["frees_at"].startswith("2026-12-30")
    assert text["until"].startswith("2026-12-30")
    # Measured again only every few minutes; the issue stays meanwhile.
    await runtime.node_data.async_refresh()
    assert _issue(hass, issue_id) is not None

    # Measured again once the interval passed: trash purged, the jail itself full.
    monkeypatch.setattr(coordinator, "TRASH_CHECK_INTERVAL", timedelta(0))
    shutil.rmtree(old.parent)
    (node_root / "bob" / "F" / "more").write_bytes(b"m" * 140 * KB)
    await runtime.node.run(rescan())
    await runtime.node_data.async_refresh()
    assert _issue(hass, issue_id) is None  # full, but not of trash: the quota issue's job

    # A jail that cannot be measured: nothing said, nothing broken.
    async def fails(_peer_id: str) -> dict[str, Any]:
        raise OSError("I/O error")

    monkeypatch.setattr(runtime.node, "hosted_trash", fails)
    await runtime.node_data.async_refresh()
    assert runtime.node_data.last_update_success
    assert _issue(hass, issue_id) is None

    # More space granted: not full any more, the issue goes.
    subentry = node_entry.subentries[BOB_ID]
    hass.config_entries.async_update_subentry(
        node_entry, subentry, data={**subentry.data, CONF_QUOTA: 10_000 * KB}
    )
    await hass.async_block_till_done(wait_background_tasks=True)
    await node_entry.runtime_data.node_data.async_refresh()
    assert _issue(hass, issue_id) is None
