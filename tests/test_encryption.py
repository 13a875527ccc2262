"""Encrypted folders in Home Assistant: the default, plain folders, their conversion.

Real nodes: Alice in Home Assistant, Bob's engine on 127.0.0.1; what Bob's disk holds is
read from the disk itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homeassistant.components.repairs import repairs_flow_manager
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import issues
from custom_components.mynas.const import CONF_ENCRYPTED, DOMAIN
from custom_components.mynas.engine import identity
from custom_components.mynas.models import Encryption

from .conftest import (
    BOB_ID,
    PAIR,
    PHOTOS_ID,
    Bob,
    RunningNode,
    make_tree,
    pin_peer,
    plain_leaks,
    setup_entry,
)
from .flow_support import assert_translated

CONVERT_FIX = ("issues", "plain_copies", "fix_flow")
ISSUE = f"convert_plain_{PHOTOS_ID}"
NAMES = ["Photos", "beach", "notes", "2024"]


# Fix flows run in the repairs integration.
pytestmark = pytest.mark.usefixtures("repairs_loaded")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder with a photo and a note, contents that cannot appear by chance."""
    return make_tree(
        tmp_path / "photos",
        {"2024/beach.jpg": b"JPEG-beach-" * 20_000, "notes.txt": b"dear diary, " * 100},
    )


def _issue(hass: HomeAssistant, issue_id: str = ISSUE) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, issue_id)


def _encryption(hass: HomeAssistant) -> str:
    state = hass.states.get("sensor.photos_encryption_on_bob")
    assert state is not None
    return state.state


async def _plain_leaks(hass: HomeAssistant, bob: Bob, photos: Path) -> list[str]:
    """What of Photos' names and contents Bob's disk shows in clear (his trash aside)."""
    contents = [(photos / "2024" / "beach.jpg").read_bytes()[:64], b"dear diary"]
    return await hass.async_add_executor_job(plain_leaks, bob.storage / "alice", NAMES, contents)


async def _convert(hass: HomeAssistant, peers: str = "Bob") -> dict[str, Any]:
    """Run the issue's fix flow to its end: its text, submit, progress, the outcome."""
    manager = repairs_flow_manager(hass)
    result: dict[str, Any] = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "confirm"
    assert_translated(result, *CONVERT_FIX)
    assert result["description_placeholders"] == {"folder": "Photos", "peers": peers}
    result = await manager.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    assert result["progress_action"] == "converting"
    assert_translated(result, *CONVERT_FIX)
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await manager.async_configure(result["flow_id"])
    await hass.async_block_till_done(wait_background_tasks=True)
    return result


def _room_for_one_copy(photos: Path) -> int:
    """A quota that holds a copy of ``photos``, not two (the plain one and the sealed one)."""
    size = sum(path.stat().st_size for path in photos.rglob("*") if path.is_file())
    return size * 3 // 2


async def test_a_new_folder_is_encrypted_on_bobs_disk(
    hass: HomeAssistant, bob: Bob, photos: Path, running_node: RunningNode
) -> None:
    """Set up encrypted: Bob's disk shows neither a name nor the content; no issue."""
    await running_node(photos, encrypted=True)
    assert any((bob.storage / "alice").rglob("*")), "nothing was sent"
    assert await _plain_leaks(hass, bob, photos) == []
    assert _encryption(hass) == Encryption.ENCRYPTED
    assert _issue(hass) is None


async def test_convert_a_plain_folder_from_its_issue(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    photos: Path,
    running_node: RunningNode,
) -> None:
    """A folder from before encryption: plain at Bob's, an issue; its fix flow seals it."""
    await running_node(photos)  # no "encrypted" key: set up before it existed
    replica = bob.replica("Photos")
    assert (replica / "notes.txt").read_bytes() == (photos / "notes.txt").read_bytes()
    assert _encryption(hass) == Encryption.PLAIN
    issue = _issue(hass)
    assert issue is not None
    assert (issue.severity, issue.is_fixable) == (ir.IssueSeverity.WARNING, True)
    assert issue.translation_key == "plain_copies"

    result = await _convert(hass)
    assert result["type"] is FlowResultType.CREATE_ENTRY, result
    # Bob's disk: the plain copy left his jail (into his trash), the sealed one is there.
    assert not replica.exists()
    trashed = list((bob.storage / ".mynas" / "trash" / "alice").rglob("notes.txt"))
    assert [path.read_bytes() for path in trashed] == [(photos / "notes.txt").read_bytes()]
    assert any((bob.storage / "alice").rglob("*"))
    assert await _plain_leaks(hass, bob, photos) == []
    # The folder is stored encrypted, the node reloaded with it, the issue gone.
    assert node_entry.subentries[PHOTOS_ID].data[CONF_ENCRYPTED] is True
    assert _issue(hass) is None
    assert _encryption(hass) == Encryption.ENCRYPTED
    # Later syncs are encrypted, and it comes back whole with Alice's key.
    (photos / "notes.txt").write_bytes(b"dear diary, again")
    response = await hass.services.async_call(
        DOMAIN, "sync", {"wait": True}, blocking=True, return_response=True
    )
    assert response["results"][0]["status"] == "success", response
    assert await _plain_leaks(hass, bob, photos) == []
    back = photos.parent / "back"
    await node_entry.runtime_data.node.restore("Photos", BOB_ID, str(back))
    assert (back / "notes.txt").read_bytes() == b"dear diary, again"
    assert (back / "2024" / "beach.jpg").read_bytes() == (photos / "2024/beach.jpg").read_bytes()


async def test_a_conversion_cut_short_stays_plain_and_the_next_sync_goes_on(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    photos: Path,
    running_node: RunningNode,
) -> None:
    """No room at Bob's for both copies: the folder stays plain, the issue stays.

    The pair is "being encrypted" (its plain copy still at Bob's); once Bob grants more
    space, the next sync finishes the conversion and the folder is stored encrypted.
    """
    await bob.restart(quota=_room_for_one_copy(photos))  # the plain copy fits, not both
    await running_node(photos)
    assert bob.replica("Photos").is_dir()

    result = await _convert(hass)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "convert_failed"
    assert_translated(result, *CONVERT_FIX)
    assert "quota" in result["description_placeholders"]["error"].lower()
    assert (bob.replica("Photos") / "notes.txt").is_file()  # the plain copy stays
    assert node_entry.subentries[PHOTOS_ID].data.get(CONF_ENCRYPTED) is None
    assert _issue(hass) is not None
    assert _encryption(hass) == Encryption.CONVERTING

    await bob.restart(quota=10**9)
    response = await hass.services.async_call(
        DOMAIN, "sync", {"wait": True}, blocking=True, return_response=True
    )
    assert response["results"][0]["status"] == "success", response
    await hass.async_block_till_done(wait_background_tasks=True)
    assert not bob.replica("Photos").exists()
    assert await _plain_leaks(hass, bob, photos) == []
    assert node_entry.subentries[PHOTOS_ID].data[CONF_ENCRYPTED] is True
    assert _issue(hass) is None
    assert _encryption(hass) == Encryption.ENCRYPTED


async def test_a_conversion_survives_a_restart(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    photos: Path,
    running_node: RunningNode,
) -> None:
    """Cut short, then Home Assistant restarts: the pair is still being encrypted."""
    await bob.restart(quota=_room_for_one_copy(photos))
    await running_node(photos)
    assert (await _convert(hass))["reason"] == "convert_failed"
    await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    status = node_entry.runtime_data.manager.data.pairs[PAIR]
    assert (status.converting, status.sealed) == (True, True)
    assert _encryption(hass) == Encryption.CONVERTING


async def test_the_fix_flow_when_the_node_or_folder_is_gone(
    hass: HomeAssistant, node_entry: MockConfigEntry, photos: Path, running_node: RunningNode
) -> None:
    await running_node(photos)
    manager = repairs_flow_manager(hass)
    # The folder removed while its issue is still shown (the reload clears it later).
    node_entry.runtime_data.manager.folders.pop(PHOTOS_ID)
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    assert (result["type"], result["reason"]) == (FlowResultType.ABORT, "folder_gone")
    assert_translated(result, *CONVERT_FIX)
    await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    # The disk went away just as the user submits.
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    node_entry.runtime_data.manager.set_storage_ok(False, "gone")
    result = await manager.async_configure(result["flow_id"], {})
    assert (result["type"], result["reason"]) == (FlowResultType.ABORT, "node_not_loaded")
    await hass.config_entries.async_unload(node_entry.entry_id)
    result = await manager.async_init(DOMAIN, context={"issue_id": ISSUE})
    assert (result["type"], result["reason"]) == (FlowResultType.ABORT, "node_not_loaded")
    assert_translated(result, *CONVERT_FIX)


async def test_removing_the_folder_clears_its_issues(
    hass: HomeAssistant, node_entry: MockConfigEntry, photos: Path, running_node: RunningNode
) -> None:
    await running_node(photos)
    issues.verify_damage(hass, node_entry.entry_id, PHOTOS_ID, BOB_ID, {})
    assert _issue(hass) is not None
    hass.config_entries.async_remove_subentry(node_entry, PHOTOS_ID)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert _issue(hass) is None
    assert _issue(hass, f"verify_damage_{PHOTOS_ID}_{BOB_ID}") is None


async def test_a_copy_converted_syncs_encrypted_while_another_is_not_yet(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    photos: Path,
    tmp_path: Path,
    running_node: RunningNode,
) -> None:
    """Bob's copy converted, Carol's not (no room): the folder stays plain; Bob's syncs go on
    encrypted (a plain push onto his sealed copy would be refused), Carol's plain."""
    carol_key, _ = await hass.async_add_executor_job(
        identity.load_or_create, tmp_path / "carol.key"
    )
    (tmp_path / "carol-disk").mkdir()
    carol = Bob(
        bob.engine,
        tmp_path / "carol-disk",
        carol_key,
        bob.alice_key,
        quota=_room_for_one_copy(photos),
    )
    await carol.start()
    try:
        carol_id = pin_peer(
            hass, node_entry, carol_key, carol.address, name="Carol", subentry_id="01PEERCAROL"
        ).subentry_id
        await running_node(photos, peers=(BOB_ID, carol_id))
        result = await _convert(hass, peers="Bob, Carol")
        assert result["reason"] == "convert_failed"
        manager = node_entry.runtime_data.manager
        bob_pair = manager.data.pairs[PAIR]
        assert (bob_pair.sealed, bob_pair.converting) == (True, False)
        assert manager.data.pairs[(PHOTOS_ID, carol_id)].encryption is Encryption.CONVERTING
        assert not bob.replica("Photos").exists()
        assert (carol.replica("Photos") / "notes.txt").is_file()
        assert _issue(hass) is not None
        # A change: Bob's copy gets it sealed; Carol's conversion is still short of room.
        (photos / "notes.txt").write_bytes(b"dear diary, once more")
        response = await hass.services.async_call(
            DOMAIN, "sync", {"peer": "Bob", "wait": True}, blocking=True, return_response=True
        )
        assert response["results"][0]["status"] == "success", response
        assert await _plain_leaks(hass, bob, photos) == []
        assert node_entry.subentries[PHOTOS_ID].data.get(CONF_ENCRYPTED) is None
    finally:
        await carol.stop()


async def test_converted_everywhere_but_not_stored_so_is_stored_at_start(
    hass: HomeAssistant, node_entry: MockConfigEntry, photos: Path, running_node: RunningNode
) -> None:
    """Home Assistant stopped between the last copy's conversion and storing the folder."""
    await running_node(photos, encrypted=True)
    await hass.config_entries.async_unload(node_entry.entry_id)
    # The copy at Bob's is sealed (the index says so); the folder reads plain.
    subentry = node_entry.subentries[PHOTOS_ID]
    hass.config_entries.async_update_subentry(
        node_entry, subentry, data={**subentry.data, CONF_ENCRYPTED: False}
    )
    await setup_entry(hass, node_entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert node_entry.subentries[PHOTOS_ID].data[CONF_ENCRYPTED] is True
    await hass.async_block_till_done(wait_background_tasks=True)
    assert _issue(hass) is None
    assert _encryption(hass) == Encryption.ENCRYPTED
