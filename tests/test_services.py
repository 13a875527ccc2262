"""Services: sync, verify, restore — results, and errors that say what is wrong."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
from pathlib import Path
from typing import Any
from unittest.mock import patch

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError, Unauthorized
from homeassistant.helpers import device_registry as dr
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, MockUser

from custom_components.mynas import texts
from custom_components.mynas.const import DOMAIN
from custom_components.mynas.engine import identity
from custom_components.mynas.engine.errors import HostRefused
from custom_components.mynas.engine.node import Node
from custom_components.mynas.entity import device_identifier

from .conftest import (
    BOB_ID,
    PAIR,
    PHOTOS_ID,
    Bob,
    RunningNode,
    add_node_entry,
    add_peer,
    gated_pushes,
    setup_entry,
)

FILES = {"a.jpg": b"a" * 1000, "2024/beach.jpg": b"b" * 5000, "2024/sea/wave.jpg": b"w" * 10}
CAROL_ID = "01PEERCAROL000000000000000"


@pytest.fixture
async def node(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, running_node: RunningNode
) -> MockConfigEntry:
    """Alice, with Photos synced to Bob; Home Assistant may write under tmp_path."""
    hass.config.allowlist_external_dirs = {str(tmp_path)}
    await running_node(FILES)
    return node_entry


async def _call(hass: HomeAssistant, service: str, **data: Any) -> Any:
    return await hass.services.async_call(
        DOMAIN, service, data, blocking=True, return_response=True
    )


async def _invalid(
    hass: HomeAssistant, service: str, *, domain: str = DOMAIN, **data: Any
) -> ServiceValidationError:
    """The error a call raises; ``domain``: whose translations say it (ours, or HA's own)."""
    with pytest.raises(ServiceValidationError) as err:
        await _call(hass, service, **data)
    assert err.value.translation_domain == domain
    return err.value


# --- sync ------------------------------------------------------------------------------------


async def test_sync_all_and_wait(hass: HomeAssistant, node: MockConfigEntry, bob: Bob) -> None:
    response = await _call(hass, "sync", wait=True)
    (result,) = response["results"]
    assert result["status"] == "success"
    assert (result["folder"], result["peer"], result["kind"]) == ("Photos", "Bob", "sync")
    assert result["files_sent"] == 0  # synced already when the node started
    assert result["duration"] >= 0


async def test_sync_without_waiting_says_what_started(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path, bob: Bob
) -> None:
    (tmp_path / "photos" / "new.jpg").write_bytes(b"new")
    response = await _call(hass, "sync", folder="photos", peer="BOB")
    assert response == {"started": [{"folder": "Photos", "peer": "Bob"}]}
    await hass.async_block_till_done(wait_background_tasks=True)
    assert (bob.replica("Photos") / "new.jpg").read_bytes() == b"new"


async def test_sync_by_id_and_folder_by_peer(hass: HomeAssistant, node: MockConfigEntry) -> None:
    response = await _call(hass, "sync", folder=PHOTOS_ID, peer=BOB_ID, wait=True)
    assert [r["status"] for r in response["results"]] == ["success"]
    response = await _call(hass, "sync", config_entry_id=node.entry_id, folder="Photos", wait=True)
    assert [r["peer"] for r in response["results"]] == ["Bob"]


async def test_sync_unknown_folder_or_peer(hass: HomeAssistant, node: MockConfigEntry) -> None:
    err = await _invalid(hass, "sync", folder="Videos")
    assert err.translation_key == "unknown_folder"
    assert err.translation_placeholders == {"name": "Videos", "known": "Photos"}
    assert "No protected folder is called Videos. Known folders: Photos" in str(err)
    err = await _invalid(hass, "sync", peer="Carol")
    assert err.translation_key == "unknown_peer"
    assert "Known peers: Bob" in str(err)


async def test_sync_a_folder_to_a_peer_it_does_not_go_to(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    running_node: RunningNode,
) -> None:
    carol, _ = await hass.async_add_executor_job(identity.load_or_create, tmp_path / "c.key")
    add_peer(
        hass, node_entry, Bob(bob.engine, tmp_path, carol, ""), name="Carol", subentry_id=CAROL_ID
    )
    await running_node({"a": b"a"})
    err = await _invalid(hass, "sync", folder="Photos", peer="Carol")
    assert err.translation_key == "nothing_to_sync"


async def test_sync_result_when_the_node_stops_meanwhile(
    hass: HomeAssistant, node: MockConfigEntry
) -> None:
    with gated_pushes(hass) as (entered, _release):
        call = hass.async_create_task(_call(hass, "sync", wait=True))
        await entered.get()
        assert await hass.config_entries.async_unload(node.entry_id)
        response = await call
    assert response == {"results": [{"folder": "Photos", "peer": "Bob", "status": "cancelled"}]}


# --- which node ------------------------------------------------------------------------------


async def test_no_node_running(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    await setup_entry(hass, node_entry)
    assert await hass.config_entries.async_unload(node_entry.entry_id)
    # Home Assistant's own helper picks the node, and says why it cannot, in its words.
    err = await _invalid(hass, "sync", domain="homeassistant")
    assert err.translation_key == "service_config_entry_not_loaded"
    assert err.translation_placeholders["entry_title"] == "Alice"
    err = await _invalid(
        hass, "verify", domain="homeassistant", config_entry_id=node_entry.entry_id
    )
    assert err.translation_key == "service_config_entry_not_loaded"
    err = await _invalid(hass, "sync", domain="homeassistant", config_entry_id="nope")
    assert err.translation_key == "service_config_entry_not_found"
    other = MockConfigEntry(domain="sun", title="Sun")
    other.add_to_hass(hass)
    err = await _invalid(hass, "sync", domain="homeassistant", config_entry_id=other.entry_id)
    assert err.translation_key == "service_config_entry_wrong_domain"


async def test_several_nodes_need_the_entry_id(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    tmp_path: Path,
    unused_tcp_port_factory: Any,
) -> None:
    root = tmp_path / "disk2"
    root.mkdir()
    second = add_node_entry(
        hass,
        root,
        unused_tcp_port_factory(),
        name="Attic",
        key_file=tmp_path / "attic.key",
        unique_id="attic",
    )
    await setup_entry(hass, node_entry)  # sets up every node entry
    assert node_entry.state is ConfigEntryState.LOADED
    assert second.state is ConfigEntryState.LOADED
    err = await _invalid(hass, "sync", domain="homeassistant")
    assert err.translation_key == "service_found_multiple_config_entry_for_domain"
    # Named, the node answers (it has nothing to sync).
    err = await _invalid(hass, "sync", config_entry_id=second.entry_id)
    assert err.translation_key == "nothing_to_sync"


# --- verify ----------------------------------------------------------------------------------


async def test_verify_clean_then_mismatch_then_repair(
    hass: HomeAssistant, node: MockConfigEntry, bob: Bob
) -> None:
    (result,) = (await _call(hass, "verify"))["results"]
    assert (result["kind"], result["status"], result["clean"]) == ("verify", "success", True)
    assert result["checked"] == 3
    # Someone tampers with Bob's copy.
    tampered = bob.replica("Photos") / "2024" / "beach.jpg"
    tampered.write_bytes(b"evil")
    (result,) = (await _call(hass, "verify", folder="Photos"))["results"]
    assert (result["status"], result["host_damaged"], result["clean"]) == ("mismatch", 1, False)
    assert result["examples"] == ["host damage: 2024/beach.jpg (not what was sent)"]
    (result,) = (await _call(hass, "verify", repair=True))["results"]
    assert (result["status"], result["repaired"]) == ("success", 1)
    assert tampered.read_bytes() == FILES["2024/beach.jpg"]
    (result,) = (await _call(hass, "verify"))["results"]
    assert result["clean"]


async def test_verify_with_the_peer_down(
    hass: HomeAssistant, node: MockConfigEntry, bob: Bob
) -> None:
    await bob.stop()
    (result,) = (await _call(hass, "verify"))["results"]
    assert result["status"] == "failed"
    assert "connection refused" in result["error"]
    # A failed verify does not count against the sync schedule.
    status = node.runtime_data.manager.data.pairs[PAIR]
    assert (status.failures, status.state) == (0, "idle")
    assert "connection refused" in (status.last_error or "")


# --- restore ---------------------------------------------------------------------------------


async def test_restore_into_an_empty_folder(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    result = await _call(hass, "restore", folder="Photos", peer="Bob", target=str(target))
    size = sum(len(data) for data in FILES.values())
    seconds = result.pop("seconds")
    assert 0 <= seconds < 30
    # What was asked, said back; what was written, in bytes and as people read a size.
    assert result == {
        "folder": "Photos",
        "path": "",
        "peer": "Bob",
        "target": str(target),
        "files": 3,
        "dirs": result["dirs"],
        "bytes": size,
        "size": texts.size(size),
        "failed": 0,
        "failures": [],
    }
    assert result["size"] == "6.0 kB"
    for rel, data in FILES.items():
        assert (target / rel).read_bytes() == data


async def test_the_form_picks_folder_and_peer_as_devices(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    """The action form's device pickers hand in device ids; names work in YAML too."""
    devices = dr.async_get(hass)

    def device_id(subentry_id: str) -> str:
        device = devices.async_get_device_by_identifier(
            device_identifier(node.entry_id, subentry_id), node.entry_id
        )
        assert device is not None
        return device.id

    photos, bob = device_id(PHOTOS_ID), device_id(BOB_ID)
    (result,) = (await _call(hass, "verify", folder=photos, peer=bob))["results"]
    assert (result["folder"], result["peer"], result["status"]) == ("Photos", "Bob", "success")
    target = tmp_path / "picked"
    result = await _call(hass, "restore", folder=photos, peer=bob, target=str(target))
    assert (result["folder"], result["peer"], result["files"]) == ("Photos", "Bob", 3)
    # A device of something else is no folder of ours.
    other = devices.async_get_or_create(
        config_entry_id=node.entry_id, identifiers={(DOMAIN, "other")}, name="Other"
    )
    err = await _invalid(hass, "sync", folder=other.id)
    assert err.translation_key == "unknown_folder"


async def test_restore_is_for_administrators(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path, hass_read_only_user: MockUser
) -> None:
    """Restore writes files: a user who is not an administrator may not call it."""
    target = tmp_path / "restored"
    with pytest.raises(Unauthorized):
        await hass.services.async_call(
            DOMAIN,
            "restore",
            {"folder": "Photos", "peer": "Bob", "target": str(target)},
            blocking=True,
            return_response=True,
            context=Context(user_id=hass_read_only_user.id),
        )
    assert not target.exists()
    # Sync and verify only send and compare: anyone may.
    await hass.services.async_call(
        DOMAIN, "sync", {}, blocking=True, context=Context(user_id=hass_read_only_user.id)
    )


async def test_restore_a_sub_path(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    target = tmp_path / "only-2024"
    target.mkdir()  # empty: fine
    result = await _call(
        hass, "restore", folder="photos", peer="Bob", target=str(target), path="2024/sea"
    )
    assert result["files"] == 1
    assert (target / "2024" / "sea" / "wave.jpg").read_bytes() == b"w" * 10
    assert not (target / "a.jpg").exists()


async def test_restore_refuses_a_non_empty_target_unless_overwrite(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "a.jpg").write_bytes(b"mine")
    err = await _invalid(hass, "restore", folder="Photos", peer="Bob", target=str(target))
    assert err.translation_key == "target_not_empty"
    assert "is not empty" in str(err)
    assert (target / "a.jpg").read_bytes() == b"mine"
    await _call(hass, "restore", folder="Photos", peer="Bob", target=str(target), overwrite=True)
    assert (target / "a.jpg").read_bytes() == FILES["a.jpg"]


async def test_restore_conflict_found_by_the_engine(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    """The target filled up between the check and the restore: nothing is overwritten."""
    target = tmp_path / "raced"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("custom_components.mynas.services._target_state", lambda *_: None)
        target.mkdir()
        (target / "a.jpg").write_bytes(b"mine")
        err = await _invalid(hass, "restore", folder="Photos", peer="Bob", target=str(target))
    assert err.translation_key == "target_not_empty"
    assert (target / "a.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"target": "relative/dir"}, "target_not_absolute"),
        ({"target": "/etc/mynas-restore"}, "target_not_allowed"),
        ({"target": "{tmp}/photos/a.jpg"}, "target_not_a_directory"),
        ({"target": "{tmp}/out", "path": "../etc"}, "invalid_restore_path"),
        ({"target": "{tmp}/out", "folder": "a/b"}, "unknown_folder"),
        ({"target": "{tmp}/out", "folder": "Videos"}, "restore_nothing"),
        ({"target": "{tmp}/out", "path": "2025"}, "restore_nothing"),
        ({"target": "{tmp}/out", "peer": "Carol"}, "unknown_peer"),
    ],
)
async def test_restore_validation(
    hass: HomeAssistant,
    node: MockConfigEntry,
    tmp_path: Path,
    data: dict[str, str],
    key: str,
) -> None:
    call = {"folder": "Photos", "peer": "Bob"} | {
        name: value.format(tmp=tmp_path) for name, value in data.items()
    }
    err = await _invalid(hass, "restore", **call)
    assert err.translation_key == key
    assert "{" not in str(err)  # every placeholder was filled
    assert not (tmp_path / "out").exists()  # a failed restore leaves no empty folder


async def test_restore_with_the_peer_down(
    hass: HomeAssistant, node: MockConfigEntry, bob: Bob, tmp_path: Path
) -> None:
    await bob.stop()
    with pytest.raises(HomeAssistantError) as err:
        await _call(hass, "restore", folder="Photos", peer="Bob", target=str(tmp_path / "out"))
    assert not isinstance(err.value, ServiceValidationError)
    assert err.value.translation_key == "restore_failed"
    assert "connection refused" in str(err.value)
    assert not (tmp_path / "out").exists()


async def test_restore_refused_by_the_host(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    with (
        patch.object(Node, "restore", side_effect=HostRefused("io", "Bob's disk failed")),
        pytest.raises(HomeAssistantError) as err,
    ):
        await _call(hass, "restore", folder="Photos", peer="Bob", target=str(tmp_path / "out"))
    assert not isinstance(err.value, ServiceValidationError)
    assert "The restore failed: Bob's disk failed" in str(err.value)


@contextlib.asynccontextmanager
async def _restore_under_way(hass: HomeAssistant, target: Path) -> AsyncIterator[asyncio.Task[Any]]:
    """A ``mynas.restore`` call whose restore has started and never ends by itself."""
    started = asyncio.Event()

    async def endless(*_args: object, **_kwargs: object) -> None:
        hass.loop.call_soon_threadsafe(started.set)
        await asyncio.Event().wait()

    with patch("custom_components.mynas.engine.node.restore_folder", endless):
        call = hass.async_create_task(
            _call(hass, "restore", folder="Photos", peer="Bob", target=str(target))
        )
        await started.wait()
        yield call


async def test_restore_interrupted_by_the_node_stopping(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    async with _restore_under_way(hass, tmp_path / "out") as call:
        assert await hass.config_entries.async_unload(node.entry_id)
        with pytest.raises(HomeAssistantError) as err:
            await call
    assert "Alice stopped during the restore" in str(err.value)


async def test_restore_call_cancelled(
    hass: HomeAssistant, node: MockConfigEntry, tmp_path: Path
) -> None:
    """Cancelling the call (not the node) cancels the restore with it."""
    async with _restore_under_way(hass, tmp_path / "out") as call:
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert node.state is ConfigEntryState.LOADED
