"""After a fire: the node's restore dialog and the ``mynas.list_folders`` service.

Alice's Home Assistant and Bob's real node on 127.0.0.1. Alice backs Photos and Docs up to
Bob; the service lists them (names, files, sizes as stored, last update); the dialog lists
them too and restores everything into a new folder beside the storage root, with progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest.mock import patch

from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import restore_flow
from custom_components.mynas.const import DOMAIN
from custom_components.mynas.engine import PeerUnreachable

from .conftest import BOB_ID, Bob, RunningNode, add_folder, add_peer, make_tree, setup_entry
from .flow_support import assert_translated

DOCS_ID = "01DOCSSUBENTRY000000000000"


async def _backed_up(hass: HomeAssistant, alice: RunningNode) -> None:
    """Alice protects Photos and Docs on Bob; both synced."""
    alice.protect({"a.jpg": b"a" * 1000, "2024/b.jpg": b"b" * 2000})
    docs = make_tree(alice.tmp_path / "docs", {"tax.pdf": b"t" * 300})
    add_folder(hass, alice.entry, docs, name="Docs", subentry_id=DOCS_ID)
    await setup_entry(hass, alice.entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    for folder in ("Photos", "Docs"):
        response = await hass.services.async_call(
            DOMAIN, "sync", {"folder": folder, "wait": True}, blocking=True, return_response=True
        )
        assert response["results"][0]["status"] == "success"


async def _list(hass: HomeAssistant, **data: Any) -> Any:
    return await hass.services.async_call(
        DOMAIN, "list_folders", data, blocking=True, return_response=True
    )


async def test_list_folders_says_what_each_friend_keeps(
    hass: HomeAssistant, running_node: RunningNode
) -> None:
    before = dt_util.utcnow()
    await _backed_up(hass, running_node)
    response = await _list(hass, peer="Bob")
    (peer,) = response["peers"]
    assert peer["peer"] == "Bob"
    assert not peer["more"]
    by_name = {item["name"]: item for item in peer["folders"]}
    assert set(by_name) == {"Docs", "Photos"}
    photos = by_name["Photos"]
    assert (photos["files"], photos["home_assistant_backups"]) == (2, False)
    assert photos["stored_bytes"] >= 3000  # as stored: sealed files are a little larger
    assert photos["stored_size"].endswith("kB")
    assert dt_util.parse_datetime(photos["last_update"]) >= before.replace(microsecond=0)
    # All friends when none is named: the same answer here.
    assert (await _list(hass))["peers"] == response["peers"]


async def test_list_folders_tells_a_friend_that_cannot_answer(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    add_peer(hass, node_entry, bob)
    await setup_entry(hass, node_entry)
    await bob.stop()
    response = await _list(hass)
    (peer,) = response["peers"]
    assert peer["folders"] == []
    assert "cannot reach" in peer["error"]
    with pytest.raises(HomeAssistantError) as err:
        await _list(hass, peer="Bob")
    assert err.value.translation_key == "list_failed"
    with pytest.raises(ServiceValidationError):
        await _list(hass, peer="Carol")


async def _open(hass: HomeAssistant, entry: MockConfigEntry) -> Any:
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert "restore" in result["menu_options"]
    assert_translated(result, "options")
    return await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "restore"}
    )


async def _open_on_bob(hass: HomeAssistant, entry: MockConfigEntry) -> Any:
    """The restore dialog, Bob chosen: the folders he keeps."""
    result = await _open(hass, entry)
    return await hass.config_entries.options.async_configure(result["flow_id"], {"peer": BOB_ID})


async def test_the_dialog_restores_everything_onto_the_storage_disk(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, running_node: RunningNode
) -> None:
    await _backed_up(hass, running_node)
    (tmp_path / f"MyNAS restore {dt_util.now():%Y-%m-%d}").mkdir()  # an earlier restore today
    result = await _open(hass, node_entry)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "restore"
    assert_translated(result, "options")
    result = await hass.config_entries.options.async_configure(result["flow_id"], {"peer": BOB_ID})
    assert result["step_id"] == "restore_folders"
    assert_translated(result, "options")
    text = result["description_placeholders"]
    assert "**Docs**: 1 ·" in text["folders"]
    assert "**Photos**: 2 ·" in text["folders"]
    assert text["backups"] == "-"
    target = Path(text["target"])
    assert target == tmp_path / f"MyNAS restore {dt_util.now():%Y-%m-%d} (2)"
    assert result["data_schema"]({})["folders"] == ["Docs", "Photos"]  # all, by default
    result = await hass.config_entries.options.async_configure(result["flow_id"], {"folders": []})
    assert result["errors"] == {"base": "choose_one"}
    assert_translated(result, "options")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"folders": ["Photos", "Docs"]}
    )
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    assert_translated(result, "options")
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await hass.config_entries.options.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "restored"
    assert_translated(result, "options")
    assert result["description_placeholders"]["files"] == "3"
    assert result["description_placeholders"]["failed"] == "0"
    assert (target / "Photos" / "2024" / "b.jpg").read_bytes() == b"b" * 2000
    assert (target / "Docs" / "tax.pdf").read_bytes() == b"t" * 300
    assert dict(node_entry.options) == {}  # nothing changed: no reload either


async def test_the_dialog_says_what_went_wrong(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, running_node: RunningNode
) -> None:
    await _backed_up(hass, running_node)
    result = await _open_on_bob(hass, node_entry)
    node = node_entry.runtime_data.node

    async def fails(*_args: Any, **_kwargs: Any) -> Any:
        raise PeerUnreachable("127.0.0.1:1", "connection refused")

    with patch.object(node, "restore", fails):
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {"folders": ["Photos"]}
        )
        await hass.async_block_till_done(wait_background_tasks=True)
        result = await hass.config_entries.options.async_configure(result["flow_id"])
    assert result["reason"] == "restore_failed"
    assert_translated(result, "options")
    assert "connection refused" in result["description_placeholders"]["error"]

    # A friend that does not answer: said on the form, nothing lost.
    await bob.stop()
    result = await _open_on_bob(hass, node_entry)
    assert result["errors"] == {"base": "list_failed"}
    assert_translated(result, "options")
    assert "cannot reach" in result["description_placeholders"]["error"]


async def test_the_dialog_with_nothing_to_restore(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    await setup_entry(hass, node_entry)
    result = await _open(hass, node_entry)
    assert result["reason"] == "no_peers"
    assert_translated(result, "options")
    add_peer(hass, node_entry, bob)
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await _open_on_bob(hass, node_entry)
    assert result["reason"] == "nothing_kept"
    assert_translated(result, "options")
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    result = await _open(hass, node_entry)
    assert result["reason"] == "node_not_loaded"
    assert_translated(result, "options")


def test_a_listing_names_home_assistant_s_backups_apart() -> None:
    from custom_components.mynas.engine import HeldFolder, Holdings  # noqa: PLC0415

    kept = Holdings(
        [
            HeldFolder("Photos", True, 2, 5000, None),
            HeldFolder(".ha-backups", True, 4, 2_000_000, 1_700_000_000.0, backups=True),
        ],
        more=True,
    )
    assert restore_flow._listing(kept) == "- **Photos**: 2 · 5.0 kB · -"
    assert restore_flow._backups(kept) == "2.0 MB"
    answer = restore_flow.held_folders(kept)
    assert answer["more"] is True
    assert answer["folders"][1]["home_assistant_backups"] is True
    assert answer["folders"][1]["last_update"] == "2023-11-14T22:13:20+00:00"
    assert restore_flow._backups(Holdings([])) == "-"


async def test_the_dialog_needs_the_node_running_to_restore(
    hass: HomeAssistant, node_entry: MockConfigEntry, running_node: RunningNode
) -> None:
    await _backed_up(hass, running_node)
    result = await _open_on_bob(hass, node_entry)
    assert result["step_id"] == "restore_folders"
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"folders": ["Photos"]}
    )
    assert result["reason"] == "node_not_loaded"
    assert_translated(result, "options")
