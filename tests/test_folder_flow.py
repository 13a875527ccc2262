"""Protecting a folder: validation of every answer, duplicates, reconfigure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType, InvalidData
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import folder_flow
from custom_components.mynas.const import (
    CONF_BWLIMIT,
    CONF_ENCRYPTED,
    CONF_EXCLUDE,
    CONF_HOURS,
    CONF_NAME,
    CONF_PATH,
    CONF_PEERS,
    CONF_RETENTION_DAYS,
    CONF_SCHEDULE,
    CONF_STORAGE_ROOT,
    CONF_TIME,
    CONF_WATCH,
    CONF_WATCH_MINUTES,
    SUBENTRY_FOLDER,
)
from custom_components.mynas.engine import identity
from custom_components.mynas.models import folder_setup

from .conftest import pin_peer
from .flow_support import assert_translated

FOLDER = ("config_subentries", "folder")


def _peer(hass: HomeAssistant, entry: MockConfigEntry, name: str, key_dir: Path) -> str:
    key, _ = identity.load_or_create(key_dir / f"{name}.key")
    return pin_peer(hass, entry, key, "127.0.0.1:9", name=name, jail=name).subentry_id


@pytest.fixture(autouse=True)
def config_dir_apart(hass: HomeAssistant, tmp_path: Path) -> None:
    """Home Assistant's config dir away from the disk's folders (tests share tmp_path)."""
    hass.config.config_dir = str(tmp_path / "ha-config")


@pytest.fixture
def peers(hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path) -> dict[str, str]:
    """Bob and Carol, paired (the node is not running: no syncs start)."""
    return {name: _peer(hass, node_entry, name, tmp_path / "keys") for name in ("Bob", "Carol")}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A household folder beside the storage root."""
    path = tmp_path / "photos"
    (path / "2024").mkdir(parents=True)
    (path / "2024" / "beach.jpg").write_bytes(b"jpeg")
    return path


def _form(path: Path | str, peers: list[str], **changes: Any) -> dict[str, Any]:
    form = {
        CONF_NAME: "Photos",
        CONF_PATH: str(path),
        CONF_PEERS: peers,
        CONF_RETENTION_DAYS: 30,
        CONF_BWLIMIT: 0,
        CONF_EXCLUDE: "",
    }
    form.update(changes)
    return form


async def _start(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, Any]:
    return await hass.config_entries.subentries.async_init(
        (entry.entry_id, SUBENTRY_FOLDER), context={"source": "user"}
    )


async def _answer(hass: HomeAssistant, flow_id: str, answers: dict[str, Any]) -> dict[str, Any]:
    return await hass.config_entries.subentries.async_configure(flow_id, answers)


async def _submit(
    hass: HomeAssistant, entry: MockConfigEntry, form: dict[str, Any]
) -> dict[str, Any]:
    """A new folder's flow, ``form`` sent as its first step."""
    result = await _start(hass, entry)
    return await _answer(hass, result["flow_id"], form)


async def _daily_step(
    hass: HomeAssistant, entry: MockConfigEntry, form: dict[str, Any]
) -> dict[str, Any]:
    """``form`` sent, then Daily picked in the schedule menu: the time step."""
    result = await _submit(hass, entry, form)
    return await _answer(hass, result["flow_id"], {"next_step_id": "daily"})


async def _when(
    hass: HomeAssistant, result: dict[str, Any], kind: str = "daily", value: Any = "03:15"
) -> dict[str, Any]:
    """The second step: pick the kind of schedule in the menu, then its one field."""
    assert result["type"] is FlowResultType.MENU, result
    assert result["step_id"] == "schedule"
    assert result["menu_options"] == ["daily", "interval"]
    assert_translated(result, *FOLDER)
    result = await _answer(hass, result["flow_id"], {"next_step_id": kind})
    assert result["step_id"] == kind
    assert_translated(result, *FOLDER)
    field = CONF_TIME if kind == "daily" else CONF_HOURS
    assert list(result["data_schema"].schema) == [field]  # only what that kind needs
    return await _answer(hass, result["flow_id"], {field: value})


async def _protect(
    hass: HomeAssistant,
    flow_id: str,
    form: dict[str, Any],
    kind: str = "daily",
    value: Any = "03:15",
) -> dict[str, Any]:
    return await _when(hass, await _answer(hass, flow_id, form), kind, value)


def _folders(entry: MockConfigEntry) -> list[ConfigSubentry]:
    return [sub for sub in entry.subentries.values() if sub.subentry_type == SUBENTRY_FOLDER]


async def test_no_peers_aborts(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    result = await _start(hass, node_entry)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "no_peers"
    assert_translated(result, *FOLDER)


async def test_protect_a_folder(
    hass: HomeAssistant, node_entry: MockConfigEntry, peers: dict[str, str], photos: Path
) -> None:
    result = await _start(hass, node_entry)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert_translated(result, *FOLDER)
    # What and where first; when comes next, as a menu.
    assert not {CONF_SCHEDULE, CONF_TIME, CONF_HOURS} & set(result["data_schema"].schema)
    defaults = result["data_schema"]({CONF_NAME: "x", CONF_PATH: "/x"})
    assert defaults[CONF_PEERS] == []  # two friends: the user picks
    assert (defaults[CONF_WATCH], defaults[CONF_WATCH_MINUTES]) == (True, 15)
    assert defaults[CONF_ENCRYPTED] is True  # a new folder's copies are encrypted
    # Both peers are offered.
    selector = next(v for k, v in result["data_schema"].schema.items() if k == CONF_PEERS)
    assert [option["label"] for option in selector.config["options"]] == ["Bob", "Carol"]

    result = await _answer(
        hass,
        result["flow_id"],
        _form(
            f" {photos}/./ ",
            [peers["Bob"], peers["Carol"]],
            **{
                CONF_NAME: " Photos ",
                CONF_RETENTION_DAYS: 90,
                CONF_BWLIMIT: 2.5,
                CONF_EXCLUDE: "*.tmp\n\n  .DS_Store \ncache/",
            },
        ),
    )
    assert result["description_placeholders"] == {"name": "Photos"}
    result = await _when(hass, result, "interval", 12)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Photos"
    assert result["unique_id"] == "Photos"
    data = dict(result["data"])
    # The daily time is kept for a later change of kind: at night, spread between nodes.
    assert "02:00:00" <= data.pop(CONF_TIME) <= "04:59:00"
    assert data == {
        CONF_NAME: "Photos",
        CONF_PATH: str(photos),
        CONF_PEERS: [peers["Bob"], peers["Carol"]],
        CONF_SCHEDULE: "interval",
        CONF_HOURS: 12,
        CONF_RETENTION_DAYS: 90,
        CONF_BWLIMIT: 2.5,
        CONF_EXCLUDE: ["*.tmp", ".DS_Store", "cache/"],
        # Watched for changes unless asked otherwise, synced at most every 15 minutes.
        CONF_WATCH: True,
        CONF_WATCH_MINUTES: 15,
        # Not asked otherwise: friends' copies are encrypted.
        CONF_ENCRYPTED: True,
    }
    assert [sub.title for sub in _folders(node_entry)] == ["Photos"]
    assert folder_setup(_folders(node_entry)[0]).config.encrypted is True


async def test_daily_at_a_time_without_seconds(
    hass: HomeAssistant, node_entry: MockConfigEntry, peers: dict[str, str], photos: Path
) -> None:
    result = await _daily_step(hass, node_entry, _form(photos, [peers["Bob"]]))
    (marker, selector) = next(iter(result["data_schema"].schema.items()))
    assert selector.serialize() == {"selector": {"time": {"no_second": True}}}
    # By default a time at night, spread so that friends' nodes do not all copy at once.
    assert "02:00:00" <= marker.default() <= "04:59:00"
    result = await _answer(hass, result["flow_id"], {CONF_TIME: "3:05"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert (result["data"][CONF_SCHEDULE], result["data"][CONF_TIME]) == ("daily", "03:05:00")
    assert result["data"][CONF_HOURS] == 6  # kept for a later change of kind


async def test_one_friend_is_ticked(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path, photos: Path
) -> None:
    """With one friend there is nothing to choose: "Copy to" starts ticked."""
    bob = _peer(hass, node_entry, "Bob", tmp_path / "keys")
    result = await _start(hass, node_entry)
    assert result["data_schema"]({CONF_NAME: "x", CONF_PATH: "/x"})[CONF_PEERS] == [bob]
    form = _form(photos, [bob])
    result = await _protect(hass, result["flow_id"], form)
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_folders_found_on_the_disk_are_offered(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    tmp_path: Path,
    peers: dict[str, str],
    photos: Path,
) -> None:
    """The backup disk's folders (beside the storage root) are offered; any path may be typed."""
    for name in ("TimeMachine", "FileHistory/alice", ".hidden", "lost+found"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "to-root").symlink_to(node_root)
    result = await _start(hass, node_entry)
    selector = result["data_schema"].schema[CONF_PATH]
    assert selector.config["custom_value"] is True
    offered = [Path(path).relative_to(tmp_path).as_posix() for path in selector.config["options"]]
    assert {"photos", "photos/2024"} <= set(offered)
    assert {"TimeMachine", "FileHistory", "FileHistory/alice"} <= set(offered)
    # Never the storage root (nor through a link), hidden folders or files.
    assert not {"disk", "to-root", ".hidden", "lost+found", "a-file"} & set(offered)
    assert offered.index("FileHistory") < offered.index("photos") < offered.index("TimeMachine")
    # A folder not offered (three levels down), typed.
    elsewhere = tmp_path / "deep" / "down" / "here"
    elsewhere.mkdir(parents=True)
    assert str(elsewhere) not in selector.config["options"]
    result = await _protect(hass, result["flow_id"], _form(elsewhere, [peers["Bob"]]))
    assert result["data"][CONF_PATH] == str(elsewhere)


async def test_folders_offered_at_most(
    hass: HomeAssistant, node_entry: MockConfigEntry, tmp_path: Path
) -> None:
    for number in range(folder_flow.MAX_OFFERED + 5):
        (tmp_path / f"f{number:03d}").mkdir()
    offered = await hass.async_add_executor_job(
        folder_flow.folders_on_disk, node_entry.data[CONF_STORAGE_ROOT]
    )
    assert len(offered) == folder_flow.MAX_OFFERED
    # Home Assistant's own configuration is never offered (its own backups keep it).
    offered = folder_flow.folders_on_disk(
        node_entry.data[CONF_STORAGE_ROOT], str(tmp_path / "f000")
    )
    assert str(tmp_path / "f000") not in offered
    assert str(tmp_path / "f001") in offered
    assert folder_flow.folders_on_disk(str(tmp_path / "gone" / "mynas")) == []


def _link_to_root(tmp: Path, root: Path) -> Path:
    (tmp / "link").symlink_to(root)
    return tmp / "link"


def _a_file(tmp: Path, _root: Path) -> Path:
    (tmp / "a-file").write_text("not a folder")
    return tmp / "a-file"


def _inside(tmp: Path, root: Path) -> Path:
    (root / "bob" / "Photos").mkdir(parents=True)
    return root / "bob" / "Photos"


@pytest.mark.parametrize(
    ("make_path", "error"),
    [
        (lambda tmp, root: "photos", "not_absolute"),
        (lambda tmp, root: tmp / "missing", "not_found"),
        (_a_file, "not_a_directory"),
        (lambda tmp, root: root, "inside_storage"),  # the storage root itself
        (_inside, "inside_storage"),  # what a friend stores here
        (lambda tmp, root: tmp, "inside_storage"),  # a parent of the storage root
        (lambda tmp, root: Path("/"), "inside_storage"),
        (_link_to_root, "inside_storage"),  # the storage root under another name
    ],
)
async def test_path_errors_recover(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
    tmp_path: Path,
    peers: dict[str, str],
    photos: Path,
    make_path,
    error: str,
) -> None:
    bad = make_path(tmp_path, node_root)
    result = await _start(hass, node_entry)
    form = _form(bad, [peers["Bob"]], **{CONF_EXCLUDE: "*.tmp\ncache/"})
    result = await hass.config_entries.subentries.async_configure(result["flow_id"], form)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_PATH: error}
    assert_translated(result, *FOLDER)
    # Everything typed is shown again, the exclude patterns line by line.
    shown = result["data_schema"]({})
    assert shown[CONF_PATH] == str(bad)
    assert shown[CONF_PEERS] == [peers["Bob"]]
    assert shown[CONF_NAME] == "Photos"
    exclude = next(k for k in result["data_schema"].schema if k == CONF_EXCLUDE)
    assert exclude.description["suggested_value"] == "*.tmp\ncache/"
    result = await _protect(hass, result["flow_id"], {**form, CONF_PATH: str(photos)})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_EXCLUDE] == ["*.tmp", "cache/"]


async def test_unreadable_folder(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    peers: dict[str, str],
    photos: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder Home Assistant cannot read (root reads anything: the check is simulated)."""
    monkeypatch.setattr(folder_flow.os, "access", lambda path, mode: Path(path) != photos)
    result = await _submit(hass, node_entry, _form(photos, [peers["Bob"]]))
    assert result["errors"] == {CONF_PATH: "not_readable"}
    assert_translated(result, *FOLDER)
    monkeypatch.undo()
    result = await _protect(hass, result["flow_id"], _form(photos, [peers["Bob"]]))
    assert result["type"] is FlowResultType.CREATE_ENTRY


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("Photos/2024", "bad_folder_name"),
        (".mynas-trash", "bad_folder_name"),
        ("..", "bad_folder_name"),
        ("   ", "bad_folder_name"),
        ("x" * 256, "bad_folder_name"),
    ],
)
async def test_name_errors_recover(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    peers: dict[str, str],
    photos: Path,
    name: str,
    error: str,
) -> None:
    result = await _submit(hass, node_entry, _form(photos, [peers["Bob"]], **{CONF_NAME: name}))
    assert result["errors"] == {CONF_NAME: error}
    assert_translated(result, *FOLDER)
    result = await _protect(
        hass, result["flow_id"], _form(photos, [peers["Bob"]], **{CONF_NAME: "Photos 2024"})
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["unique_id"] == "Photos 2024"


async def test_no_peer_selected(
    hass: HomeAssistant, node_entry: MockConfigEntry, peers: dict[str, str], photos: Path
) -> None:
    result = await _submit(hass, node_entry, _form(photos, []))
    assert result["errors"] == {CONF_PEERS: "no_peer_selected"}
    assert_translated(result, *FOLDER)
    result = await _protect(hass, result["flow_id"], _form(photos, [peers["Carol"]]))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_PEERS] == [peers["Carol"]]


async def test_several_errors_at_once(
    hass: HomeAssistant, node_entry: MockConfigEntry, peers: dict[str, str], tmp_path: Path
) -> None:
    result = await _submit(hass, node_entry, _form(tmp_path / "missing", [], **{CONF_NAME: "a/b"}))
    assert result["errors"] == {
        CONF_PATH: "not_found",
        CONF_PEERS: "no_peer_selected",
        CONF_NAME: "bad_folder_name",
    }


@pytest.mark.parametrize("bad_time", ["25:00", "03:15:99", "soon"])
async def test_bad_time_is_refused(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    peers: dict[str, str],
    photos: Path,
    bad_time: str,
) -> None:
    """The time selector refuses what is not a time; the form stays open."""
    result = await _daily_step(hass, node_entry, _form(photos, [peers["Bob"]]))
    with pytest.raises(InvalidData) as err:
        await _answer(hass, result["flow_id"], {CONF_TIME: bad_time})
    assert CONF_TIME in err.value.schema_errors
    result = await _answer(hass, result["flow_id"], {CONF_TIME: "23:45:00"})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_TIME] == "23:45:00"


async def test_duplicate_name_is_refused(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    peers: dict[str, str],
    photos: Path,
    tmp_path: Path,
) -> None:
    """The name is where the replica lives on the hosts: one folder per name.

    The form stays open with the error on the name, so nothing typed is lost.
    """
    result = await _start(hass, node_entry)
    result = await _protect(hass, result["flow_id"], _form(photos, [peers["Bob"]]))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    other = tmp_path / "other"
    other.mkdir()
    for name in ("Photos", "PHOTOS", " photos "):
        result = await _submit(
            hass, node_entry, _form(other, [peers["Carol"]], **{CONF_NAME: name})
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {CONF_NAME: "name_taken"}
        assert_translated(result, *FOLDER)
        assert result["data_schema"]({})[CONF_PATH] == str(other)
    result = await _protect(
        hass, result["flow_id"], _form(other, [peers["Carol"]], **{CONF_NAME: "Other"})
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert sorted(sub.title for sub in _folders(node_entry)) == ["Other", "Photos"]


async def test_reconfigure_all_but_the_name(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    peers: dict[str, str],
    photos: Path,
    tmp_path: Path,
) -> None:
    result = await _start(hass, node_entry)
    result = await _protect(
        hass,
        result["flow_id"],
        _form(photos, [peers["Bob"], peers["Carol"]], **{CONF_EXCLUDE: "*.tmp\ncache/"}),
    )
    (folder,) = _folders(node_entry)
    # Carol is removed since: she is no longer offered nor preselected.
    hass.config_entries.async_remove_subentry(node_entry, peers["Carol"])
    result = await node_entry.start_subentry_reconfigure_flow(hass, folder.subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert result["description_placeholders"] == {"name": "Photos"}
    assert_translated(result, *FOLDER)
    assert CONF_NAME not in result["data_schema"].schema
    # Encryption is not offered: an encrypted folder's copies never become readable again.
    assert CONF_ENCRYPTED not in result["data_schema"].schema
    shown = result["data_schema"]({})
    assert shown[CONF_PATH] == str(photos)
    assert shown[CONF_PEERS] == [peers["Bob"]]
    assert (shown[CONF_WATCH], shown[CONF_WATCH_MINUTES]) == (True, 15)
    exclude = next(k for k in result["data_schema"].schema if k == CONF_EXCLUDE)
    assert exclude.description["suggested_value"] == "*.tmp\ncache/"

    moved = tmp_path / "deep" / "down" / "pictures"  # not among the folders offered: typed
    answers = {
        CONF_PATH: str(tmp_path / "nowhere"),
        CONF_PEERS: [peers["Bob"]],
        CONF_RETENTION_DAYS: 7,
        CONF_BWLIMIT: 1.5,
        CONF_EXCLUDE: "*.bak",
        CONF_WATCH: False,
        CONF_WATCH_MINUTES: 5,
    }
    result = await _answer(hass, result["flow_id"], answers)
    assert result["errors"] == {CONF_PATH: "not_found"}
    assert_translated(result, *FOLDER)
    exclude = next(k for k in result["data_schema"].schema if k == CONF_EXCLUDE)
    assert exclude.description["suggested_value"] == "*.bak"
    moved.mkdir(parents=True)
    result = await _answer(hass, result["flow_id"], {**answers, CONF_PATH: str(moved)})
    # When: the daily time it had is shown again; switched to every 4 hours.
    result = await _answer(hass, result["flow_id"], {"next_step_id": "daily"})
    assert next(iter(result["data_schema"].schema)).default() == "03:15:00"
    result = await node_entry.start_subentry_reconfigure_flow(hass, folder.subentry_id)
    result = await _answer(hass, result["flow_id"], {**answers, CONF_PATH: str(moved)})
    result = await _when(hass, result, "interval", 4)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert_translated(result, *FOLDER)
    updated = node_entry.subentries[folder.subentry_id]
    assert updated.title == "Photos"
    assert updated.unique_id == "Photos"
    assert dict(updated.data) == {
        CONF_NAME: "Photos",
        CONF_PATH: str(moved),
        CONF_PEERS: [peers["Bob"]],
        CONF_SCHEDULE: "interval",
        CONF_TIME: "03:15:00",  # kept, for a change back to daily
        CONF_HOURS: 4,
        CONF_RETENTION_DAYS: 7,
        CONF_BWLIMIT: 1.5,
        CONF_EXCLUDE: ["*.bak"],
        CONF_WATCH: False,
        CONF_WATCH_MINUTES: 5,
        CONF_ENCRYPTED: True,  # kept as set up
    }
    # The path it protects is offered first, even when not found on the disk.
    result = await node_entry.start_subentry_reconfigure_flow(hass, folder.subentry_id)
    assert result["data_schema"].schema[CONF_PATH].config["options"][0] == str(moved)


async def test_a_plain_copy_when_asked_and_a_folder_from_before_is_plain(
    hass: HomeAssistant, node_entry: MockConfigEntry, peers: dict[str, str], photos: Path
) -> None:
    """Unticked, the copies are a plain mirror; a folder set up before encryption is plain."""
    result = await _start(hass, node_entry)
    result = await _protect(
        hass, result["flow_id"], _form(photos, [peers["Bob"]], **{CONF_ENCRYPTED: False})
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_ENCRYPTED] is False
    (folder,) = _folders(node_entry)
    assert folder_setup(folder).config.encrypted is False
    # Reconfigured, it stays plain (encrypting goes through its repair issue).
    result = await node_entry.start_subentry_reconfigure_flow(hass, folder.subentry_id)
    assert CONF_ENCRYPTED not in result["data_schema"].schema
    answers = dict(result["data_schema"]({}))
    result = await _when(hass, await _answer(hass, result["flow_id"], answers), "interval", 4)
    assert result["reason"] == "reconfigure_successful"
    assert node_entry.subentries[folder.subentry_id].data[CONF_ENCRYPTED] is False
    # A subentry written before the option existed has no such key: plain.
    old = dict(folder.data)
    del old[CONF_ENCRYPTED]
    hass.config_entries.async_update_subentry(node_entry, folder, data=old)
    assert folder_setup(node_entry.subentries[folder.subentry_id]).config.encrypted is False
