"""Fix flows: a peer's changed key (accepted only when confirmed), a removed peer's data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
import shutil
from typing import Any

from homeassistant.components.repairs import repairs_flow_manager
from homeassistant.config_entries import ConfigEntryState, ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.mynas import issues, repairs, texts
from custom_components.mynas.const import (
    CONF_ADDRESSES,
    CONF_NODE_PUBLIC_KEY,
    CONF_PUBLIC_KEY,
    CONF_UNREACHABLE_HOURS,
    DOMAIN,
)
from custom_components.mynas.engine import identity
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.storage_root import INTERNAL_DIR
from custom_components.mynas.orphans import CONF_KEPT_DATA, jails_on_disk

from .conftest import (
    BOB_ID,
    PAIR,
    PHOTOS_ID,
    Bob,
    RunningNode,
    gated_pushes,
    pin_peer,
    setup_entry,
)
from .flow_support import EN, assert_translated, node_server

KEY_FIX = ("issues", "key_changed", "fix_flow")
ORPHAN_FIX = ("issues", "orphaned_data", "fix_flow")
STORAGE_FIX = ("issues", "storage_missing", "fix_flow")
UNREACHABLE_FIX = ("issues", "peer_unreachable", "fix_flow")
QUOTA_FIX = ("issues", "quota_exceeded", "fix_flow")
OVERDUE_FIX = ("issues", "folder_overdue", "fix_flow")
QUOTA_TEXT = {"folder": "Photos", "peer": "Bob", "needed": "2 GB", "available": "1 GB"}
OVERDUE_TEXT = {
    "folder": "Photos",
    "peers": "Bob",
    "hours": "36",
    "since": "2026-05-04 10:35",
    "error": "Bob's node does not answer",
}


# Fix flows run in the repairs integration.
pytestmark = pytest.mark.usefixtures("repairs_loaded")


def _issue(hass: HomeAssistant, issue_id: str) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, issue_id)


def _key(tmp_path: Path, name: str) -> Identity:
    key, _ = identity.load_or_create(tmp_path / "keys" / f"{name}.key")
    return key


async def _fix(hass: HomeAssistant, issue_id: str) -> dict[str, Any]:
    return await repairs_flow_manager(hass).async_init(DOMAIN, context={"issue_id": issue_id})


async def _step(hass: HomeAssistant, flow_id: str, data: dict[str, Any] | None = None) -> Any:
    return await repairs_flow_manager(hass).async_configure(flow_id, data)


# --- a peer's key changed --------------------------------------------------------------------


@pytest.fixture
async def rebuilt_bob(node_entry: MockConfigEntry, tmp_path: Path) -> AsyncIterator[NodeServer]:
    """Bob's node, rebuilt with a new key; he already added us again."""
    alice = PeerGrant("alice", node_entry.data[CONF_NODE_PUBLIC_KEY], 10**9)
    async with node_server(tmp_path / "keys" / "bob-new.key", tmp_path / "bob", [alice]) as bob:
        yield bob


async def test_key_change_accepted_only_when_confirmed(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    node_entry: MockConfigEntry,
    rebuilt_bob: NodeServer,
    tmp_path: Path,
) -> None:
    """Bob rebuilt his node with a new key: the node raises the issue, the user accepts it.

    Driven as the UI does it, over Home Assistant's HTTP API.
    """
    old_key, new_key, bob = _key(tmp_path, "bob"), rebuilt_bob.identity, rebuilt_bob
    peer = _peer(hass, node_entry, old_key, "Bob", f"127.0.0.1:{bob.port}")
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    issue_id = f"key_changed_{peer.subentry_id}"
    issue = _issue(hass, issue_id)
    assert issue is not None, "the node did not notice the new key"
    assert issue.is_fixable
    assert issue.severity is ir.IssueSeverity.CRITICAL
    assert issue.translation_placeholders == {
        "peer": "Bob",
        "old": old_key.fingerprint,
        "new": new_key.fingerprint,
        "since": texts.since(
            node_entry.runtime_data.manager.data.peers[peer.subentry_id].down_since
        ),
        "folders": "-",  # no folder is copied to Bob
    }

    client = await hass_client()
    response = await client.post(
        "/api/repairs/issues/fix", json={"handler": DOMAIN, "issue_id": issue_id}
    )
    assert response.status == HTTPStatus.OK
    result = await response.json()
    assert result["type"] == "form"
    assert result["step_id"] == "confirm"
    assert not result["errors"]  # the question first, not "tick the box"
    assert result["description_placeholders"] == issue.translation_placeholders
    flow_url = f"/api/repairs/issues/fix/{result['flow_id']}"

    # Submitting without ticking the box refuses the key: nothing changes.
    response = await client.post(flow_url, json={"confirm": False})
    result = await response.json()
    assert result["type"] == "form"
    assert result["errors"] == {"confirm": "confirm_required"}
    assert node_entry.subentries[peer.subentry_id].data[CONF_PUBLIC_KEY] == old_key.public_line
    assert _issue(hass, issue_id) is not None

    response = await client.post(flow_url, json={"confirm": True})
    result = await response.json()
    assert result["type"] == "create_entry"
    updated = node_entry.subentries[peer.subentry_id]
    assert updated.data[CONF_PUBLIC_KEY] == new_key.public_line
    assert updated.unique_id == new_key.fingerprint
    assert {k: v for k, v in updated.data.items() if k != CONF_PUBLIC_KEY} == {
        k: v for k, v in peer.data.items() if k != CONF_PUBLIC_KEY
    }
    assert _issue(hass, issue_id) is None
    # The node restarted with the new key pinned, and reaches Bob again.
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    assert node_entry.runtime_data.node.peers[peer.subentry_id].public_key == new_key.public_line
    assert _issue(hass, issue_id) is None


def _peer(
    hass: HomeAssistant, entry: MockConfigEntry, key: Identity, name: str, address: str
) -> ConfigSubentry:
    return pin_peer(hass, entry, key, address, name=name)


def _raise_key_changed(
    hass: HomeAssistant, entry: MockConfigEntry, peer: ConfigSubentry, new_key: Identity
) -> str:
    """Raise the issue as the node does when a peer presents ``new_key``."""
    issues.key_changed(
        hass,
        entry.entry_id,
        peer.subentry_id,
        peer.title,
        identity.fingerprint(peer.data[CONF_PUBLIC_KEY]),
        new_key.fingerprint,
        new_key.public_line,
    )
    return f"key_changed_{peer.subentry_id}"


async def test_key_change_fix_flow_steps(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    """The same flow through the flow manager, with the node stopped (disk away, say)."""
    old, new = _key(tmp_path, "carol"), _key(tmp_path, "carol-new")
    peer = _peer(hass, node_entry, old, "Carol", "127.0.0.1:9")
    await setup_entry(hass, node_entry)
    await hass.config_entries.async_unload(node_entry.entry_id)
    issue_id = _raise_key_changed(hass, node_entry, peer, new)
    result = await _fix(hass, issue_id)
    assert result["type"] is FlowResultType.FORM
    assert_translated(result, *KEY_FIX)
    assert result["data_schema"]({}) == {"confirm": False}
    result = await _step(hass, result["flow_id"], {})
    assert result["errors"] == {"confirm": "confirm_required"}
    assert_translated(result, *KEY_FIX)
    result = await _step(hass, result["flow_id"], {"confirm": True})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert node_entry.subentries[peer.subentry_id].data[CONF_PUBLIC_KEY] == new.public_line
    assert _issue(hass, issue_id) is None


async def test_key_change_for_a_removed_peer(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    old, new = _key(tmp_path, "carol"), _key(tmp_path, "carol-new")
    peer = _peer(hass, node_entry, old, "Carol", "127.0.0.1:9")
    await setup_entry(hass, node_entry)
    issue_id = _raise_key_changed(hass, node_entry, peer, new)
    hass.config_entries.async_remove_subentry(node_entry, peer.subentry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await _fix(hass, issue_id)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "peer_gone"
    assert_translated(result, *KEY_FIX)
    # The node is removed: its issues go with it.
    issue_id = _raise_key_changed(hass, node_entry, peer, new)
    await hass.config_entries.async_remove(node_entry.entry_id)
    assert _issue(hass, issue_id) is None


async def test_key_already_pinned_for_another_peer(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    """Carol's node now presents Dave's key: it cannot become Carol's too."""
    carol, dave = _key(tmp_path, "carol"), _key(tmp_path, "dave")
    peer = _peer(hass, node_entry, carol, "Carol", "127.0.0.1:9")
    _peer(hass, node_entry, dave, "Dave", "127.0.0.1:10")
    await setup_entry(hass, node_entry)
    issue_id = _raise_key_changed(hass, node_entry, peer, dave)
    result = await _fix(hass, issue_id)
    result = await _step(hass, result["flow_id"], {"confirm": True})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "key_in_use"
    assert_translated(result, *KEY_FIX)
    assert node_entry.subentries[peer.subentry_id].data[CONF_PUBLIC_KEY] == carol.public_line
    assert _issue(hass, issue_id) is not None


async def test_unfixable_key_change_has_no_flow(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    """A mismatch without the presented key can only be reported, never accepted."""
    carol = _key(tmp_path, "carol")
    peer = _peer(hass, node_entry, carol, "Carol", "127.0.0.1:9")
    issues.key_changed(
        hass, node_entry.entry_id, peer.subentry_id, "Carol", carol.fingerprint, None, None
    )
    issue = _issue(hass, f"key_changed_{peer.subentry_id}")
    assert issue is not None
    assert not issue.is_fixable
    # Its own text (an unfixable issue needs a description, a fixable one has a fix flow).
    assert issue.translation_key == "key_changed_unknown"
    assert "description" in EN["issues"]["key_changed_unknown"]
    assert issue.translation_placeholders["new"] == "unknown"


# --- a removed peer's data -----------------------------------------------------------------


@pytest.fixture
async def orphan(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path, tmp_path: Path
) -> str:
    """Erin stored data here, then was removed: the node raises the keep-or-delete issue."""
    erin = _key(tmp_path, "erin")
    peer = _peer(hass, node_entry, erin, "Erin", "127.0.0.1:9")
    # The household keeps its own folder in the storage root: never offered for deletion.
    (node_root / "Family photos").mkdir()
    (node_root / "Family photos" / "cat.jpg").write_bytes(b"jpeg")
    await setup_entry(hass, node_entry)
    (node_root / "erin" / "Laptop").mkdir()
    (node_root / "erin" / "Laptop" / "thesis.odt").write_bytes(b"x" * 5000)
    assert "erin" in jails_on_disk(str(node_root))
    hass.config_entries.async_remove_subentry(node_entry, peer.subentry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    return f"orphan_{node_entry.entry_id}_erin"


def _our_issues(hass: HomeAssistant) -> set[str]:
    return {issue_id for (domain, issue_id) in ir.async_get(hass).issues if domain == DOMAIN}


async def test_orphaned_data_raises_an_issue(
    hass: HomeAssistant, node_entry: MockConfigEntry, orphan: str
) -> None:
    issue = _issue(hass, orphan)
    assert issue is not None
    assert issue.is_fixable
    assert issue.translation_key == "orphaned_data"
    assert issue.translation_placeholders["jail"] == "erin"
    # Only the removed peer's jail: not the household's folder beside it.
    assert {i for i in _our_issues(hass) if i.startswith("orphan_")} == {orphan}


async def test_delete_orphaned_data(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path, orphan: str
) -> None:
    result = await _fix(hass, orphan)
    assert result["type"] is FlowResultType.MENU
    assert result["menu_options"] == ["keep", "delete"]
    assert result["description_placeholders"]["jail"] == "erin"
    assert result["description_placeholders"]["size"]
    assert_translated(result, *ORPHAN_FIX)
    result = await _step(hass, result["flow_id"], {"next_step_id": "delete"})
    # Deleting asks once more.
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "delete"
    assert_translated(result, *ORPHAN_FIX)
    assert (node_root / "erin" / "Laptop" / "thesis.odt").exists()
    result = await _step(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert not (node_root / "erin").exists()
    assert not any(
        (node_root / INTERNAL_DIR / area / "erin").exists()
        for area in ("peers", "trash", "partial", "tmp")
    )
    assert (node_root / "Family photos" / "cat.jpg").read_bytes() == b"jpeg"
    assert _issue(hass, orphan) is None
    # After a restart the question does not come back: there is nothing left.
    await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert _issue(hass, orphan) is None


async def test_keep_orphaned_data(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path, orphan: str
) -> None:
    result = await _fix(hass, orphan)
    result = await _step(hass, result["flow_id"], {"next_step_id": "keep"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert node_entry.options[CONF_KEPT_DATA] == ["erin"]
    assert (node_root / "erin" / "Laptop" / "thesis.odt").exists()
    assert _issue(hass, orphan) is None
    # After a restart the question is not asked again.
    await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    assert _issue(hass, orphan) is None
    assert (node_root / "erin" / "Laptop" / "thesis.odt").exists()


async def test_orphan_flow_needs_the_node_running(
    hass: HomeAssistant, node_entry: MockConfigEntry, orphan: str
) -> None:
    """The node stopped while the question was on screen: nothing is decided."""
    flows = [await _fix(hass, orphan), await _fix(hass, orphan)]
    assert [flow["type"] for flow in flows] == [FlowResultType.MENU] * 2
    await hass.config_entries.async_unload(node_entry.entry_id)
    for flow, choice in zip(flows, ("keep", "delete"), strict=True):
        result = await _step(hass, flow["flow_id"], {"next_step_id": choice})
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "node_not_loaded"
        assert_translated(result, *ORPHAN_FIX)
    # The issue stays: the question is still open, and asked again once the node runs.
    assert _issue(hass, orphan) is not None
    assert CONF_KEPT_DATA not in node_entry.options
    result = await _fix(hass, orphan)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "node_not_loaded"


async def test_orphan_size_placeholder_without_issue(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """The flow's texts still read well when the issue's placeholders are gone."""
    flow = repairs.OrphanedDataFlow(node_entry.entry_id, "erin")
    flow.hass = hass
    flow.issue_id = "orphan_gone"
    assert flow._placeholders() == {"jail": "erin", "size": "?"}


def test_jails_on_disk(tmp_path: Path) -> None:
    """Only folders MyNAS keeps peer state for count; damaged state counts as empty."""
    assert jails_on_disk(str(tmp_path)) == {}  # no .mynas/peers at all
    peers = tmp_path / INTERNAL_DIR / "peers"
    for name in ("good", "damaged", "no-state", "state-only"):
        (peers / name).mkdir(parents=True)
    for name in ("good", "damaged", "no-state", "household"):
        (tmp_path / name).mkdir()
    (peers / "good" / "state.json").write_text('{"used": 12288}')
    (peers / "damaged" / "state.json").write_text("{not json")
    assert jails_on_disk(str(tmp_path)) == {"good": 12288, "damaged": 0, "no-state": 0}


# --- the backup disk -----------------------------------------------------------------------


@pytest.mark.parametrize("loaded", [True, False], ids=["running", "waiting-for-its-disk"])
async def test_storage_fix_flow_checks_the_disk_again(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    tmp_path: Path,
    loaded: bool,
) -> None:
    """ "Check now": not back yet says so; back, the issue is gone (and a waiting node runs)."""
    saved = tmp_path / "unplugged"
    if loaded:
        await setup_entry(hass, node_entry)
        shutil.move(node_root, saved)
        await node_entry.runtime_data.node_data.async_refresh()
    else:
        shutil.move(node_root, saved)
        await setup_entry(hass, node_entry)
        assert node_entry.state is ConfigEntryState.SETUP_RETRY
    issue_id = f"storage_{node_entry.entry_id}"
    assert _issue(hass, issue_id) is not None
    result = await _fix(hass, issue_id)
    assert_translated(result, *STORAGE_FIX)
    result = await _step(hass, result["flow_id"], {})
    assert result["errors"] == {"base": "not_back"}
    assert_translated(result, *STORAGE_FIX)
    shutil.move(saved, node_root)  # plugged in again
    result = await _step(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert _issue(hass, issue_id) is None
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED


async def test_storage_fix_flow_for_a_removed_node(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    """The node is removed with the dialog open: nothing to check; its issues are gone."""
    shutil.rmtree(node_root)
    await setup_entry(hass, node_entry)  # waits for its disk
    issue_id = f"storage_{node_entry.entry_id}"
    result = await _fix(hass, issue_id)
    await hass.config_entries.async_remove(node_entry.entry_id)
    assert _issue(hass, issue_id) is None
    result = await _step(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "node_gone"
    assert_translated(result, *STORAGE_FIX)


# --- a peer that does not answer -------------------------------------------------------------


@pytest.fixture
async def silent_bob(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, running_node: RunningNode
) -> str:
    """Bob is down, and has been long enough for the issue (threshold 0 hours)."""
    running_node.protect({"a.jpg": b"a"})
    hass.config_entries.async_update_entry(node_entry, options={CONF_UNREACHABLE_HOURS: 0})
    await bob.stop()
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    issue_id = f"unreachable_{BOB_ID}"
    assert _issue(hass, issue_id) is not None
    return issue_id


async def test_unreachable_try_again_now(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, silent_bob: str
) -> None:
    result = await _fix(hass, silent_bob)
    assert result["type"] is FlowResultType.MENU
    assert result["description_placeholders"]["folders"] == "Photos"
    assert_translated(result, *UNREACHABLE_FIX)
    result = await _step(hass, result["flow_id"], {"next_step_id": "retry"})
    # Still down: says why, and offers to try again.
    assert result["step_id"] == "retry"
    assert "connection refused" in result["description_placeholders"]["error"]
    assert_translated(result, *UNREACHABLE_FIX)
    await bob.start()
    result = await _step(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert _issue(hass, silent_bob) is None


async def test_unreachable_change_the_address(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, silent_bob: str
) -> None:
    """Bob moved: his new address, checked as the peer's settings check it, then a restart."""
    await bob.start()  # listening again, on a new port: the old address is wrong
    result = await _fix(hass, silent_bob)
    result = await _step(hass, result["flow_id"], {"next_step_id": "address"})
    assert result["step_id"] == "address"
    assert_translated(result, *UNREACHABLE_FIX)
    for typed, error in (("", "no_address"), ("not an address!", "bad_address")):
        result = await _step(hass, result["flow_id"], {CONF_ADDRESSES: typed})
        assert result["errors"] == {CONF_ADDRESSES: error}
        assert_translated(result, *UNREACHABLE_FIX)
    result = await _step(hass, result["flow_id"], {CONF_ADDRESSES: f" 127.0.0.1:{bob.port}\n"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert node_entry.subentries[BOB_ID].data[CONF_ADDRESSES] == [f"127.0.0.1:{bob.port}"]
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.state is ConfigEntryState.LOADED
    assert _issue(hass, silent_bob) is None  # the restarted node reached him at once


async def test_unreachable_flow_when_the_node_or_peer_is_gone(
    hass: HomeAssistant, node_entry: MockConfigEntry, silent_bob: str
) -> None:
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    result = await _fix(hass, silent_bob)
    result = await _step(hass, result["flow_id"], {"next_step_id": "retry"})
    assert result["reason"] == "node_not_loaded"
    assert_translated(result, *UNREACHABLE_FIX)
    hass.config_entries.async_remove_subentry(node_entry, BOB_ID)
    result = await _fix(hass, silent_bob)
    result = await _step(hass, result["flow_id"], {"next_step_id": "address"})
    assert result["reason"] == "peer_gone"
    assert_translated(result, *UNREACHABLE_FIX)


async def test_unreachable_retry_for_a_peer_removed_meanwhile(
    hass: HomeAssistant, node_entry: MockConfigEntry, silent_bob: str
) -> None:
    result = await _fix(hass, silent_bob)
    node_entry.runtime_data.manager.peers.pop(BOB_ID)  # as between a removal and the reload
    result = await _step(hass, result["flow_id"], {"next_step_id": "retry"})
    assert result["reason"] == "peer_gone"


# --- back up again: a friend granted more space, an overdue backup -------------------------


@pytest.mark.parametrize(
    ("issue_id", "section"),
    [(f"quota_{PHOTOS_ID}_{BOB_ID}", QUOTA_FIX), (f"overdue_{PHOTOS_ID}", OVERDUE_FIX)],
    ids=["quota", "overdue"],
)
async def test_back_up_again_now(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    issue_id: str,
    section: tuple[str, ...],
    running_node: RunningNode,
) -> None:
    running_node.protect({"a.jpg": b"a"})
    with gated_pushes(hass) as (entered, release):
        await setup_entry(hass, node_entry)
        await entered.get()  # the first sync runs: hold it
        manager = node_entry.runtime_data.manager
        if issue_id.startswith("quota"):
            issues.quota_refused(hass, node_entry.entry_id, PHOTOS_ID, BOB_ID, QUOTA_TEXT)
        else:
            issues.overdue(hass, node_entry.entry_id, PHOTOS_ID, OVERDUE_TEXT)
        result = await _fix(hass, issue_id)
        assert result["type"] is FlowResultType.FORM
        assert_translated(result, *section)
        result = await _step(hass, result["flow_id"], {})
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert _issue(hass, issue_id) is None
        assert manager.running(PAIR)
        release.set()
    await hass.async_block_till_done(wait_background_tasks=True)


async def test_back_up_again_needs_the_node_and_its_disk(
    hass: HomeAssistant, node_entry: MockConfigEntry, running_node: RunningNode
) -> None:
    await running_node({"a.jpg": b"a"})
    issue_id = f"overdue_{PHOTOS_ID}"
    issues.overdue(hass, node_entry.entry_id, PHOTOS_ID, OVERDUE_TEXT)
    result = await _fix(hass, issue_id)
    node_entry.runtime_data.manager.set_storage_ok(False, "the disk is gone")
    result = await _step(hass, result["flow_id"], {})
    assert result["reason"] == "node_not_loaded"
    assert_translated(result, *OVERDUE_FIX)
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    issues.overdue(hass, node_entry.entry_id, PHOTOS_ID, OVERDUE_TEXT)
    result = await _fix(hass, issue_id)
    assert result["reason"] == "node_not_loaded"
