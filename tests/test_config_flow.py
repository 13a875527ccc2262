"""The node config flow: every error, its recovery, duplicates and reconfigure."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import stat

from homeassistant.config_entries import SOURCE_USER
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas.const import (
    CONF_ALLOW_SAME_DISK,
    CONF_KEY_FILE,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PORT,
    CONF_RECOVERY_CODE,
    CONF_RESTORE_KEY,
    CONF_STORAGE_ROOT,
    DOMAIN,
)
from custom_components.mynas.engine import identity, recovery_code, storage_root

from .conftest import claim_root_for
from .flow_support import assert_translated


def _form(name: str, root: Path | str, port: int = 8022, same_disk: bool = False) -> dict:
    return {
        CONF_NODE_NAME: name,
        CONF_STORAGE_ROOT: str(root),
        CONF_PORT: port,
        CONF_ALLOW_SAME_DISK: same_disk,
    }


async def _start(hass: HomeAssistant) -> str:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}
    return result["flow_id"]


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/self")
    path = tmp_path / "readonly"
    path.mkdir(mode=0o555)
    return path


async def test_user_creates_node_on_separate_disk(hass: HomeAssistant, usb_disk: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _form("  Alice's house ", usb_disk, 9022)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Alice's house"
    data = result["data"]
    assert data[CONF_NODE_NAME] == "Alice's house"
    assert data[CONF_STORAGE_ROOT] == str(usb_disk.resolve())
    assert data[CONF_PORT] == 9022
    marker = storage_root.read_marker(usb_disk)
    assert marker == storage_root.Marker(node_id=data[CONF_NODE_ID], node_name="Alice's house")
    entry = result["result"]
    assert entry.unique_id == storage_root.filesystem_identity(usb_disk)


@pytest.mark.parametrize(
    ("make_root", "error"),
    [
        (lambda tmp, ro: "relative/path", "not_absolute"),
        (lambda tmp, ro: tmp / "missing", "not_found"),
        (lambda tmp, ro: _file(tmp / "a-file"), "not_a_directory"),
        (lambda tmp, ro: ro, "not_writable"),
        (lambda tmp, ro: tmp, "same_disk"),
    ],
)
async def test_user_storage_root_errors_recover(
    hass: HomeAssistant,
    tmp_path: Path,
    readonly_dir: Path,
    usb_disk: Path,
    make_root,
    error: str,
) -> None:
    flow_id = await _start(hass)
    bad = make_root(tmp_path, readonly_dir)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", bad))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_STORAGE_ROOT: error}
    assert not hass.config_entries.async_entries(DOMAIN)
    # The form keeps what was typed, and a good answer then succeeds.
    assert result["data_schema"]({})[CONF_STORAGE_ROOT] == str(bad)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


async def test_user_same_disk_accepted_when_ticked(hass: HomeAssistant, tmp_path: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _form("Test box", tmp_path, same_disk=True)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert storage_root.read_marker(tmp_path) is not None


async def test_user_name_required(hass: HomeAssistant, usb_disk: Path) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("   ", usb_disk))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_NODE_NAME: "name_required"}
    assert storage_root.read_marker(usb_disk) is None
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_a_second_set_up_in_progress_ends_with_the_first(
    hass: HomeAssistant, usb_disk: Path
) -> None:
    """Two set-ups opened side by side: once one makes the node, the other is gone."""
    flow_id = await _start(hass)
    second_flow = await _start(hass)
    first = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert first["type"] is FlowResultType.CREATE_ENTRY
    assert second_flow not in {
        flow["flow_id"] for flow in hass.config_entries.flow.async_progress()
    }
    assert storage_root.read_marker(usb_disk).node_name == "Alice"


async def test_one_node_per_home_assistant(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """A node is one Home Assistant: a second set-up is refused before it asks anything."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "user"})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "single_instance_allowed"
    assert result["translation_domain"] == "homeassistant"  # Home Assistant's own text


async def test_user_reinstall_keeps_node_id(hass: HomeAssistant, usb_disk: Path) -> None:
    """Setting up again on a disk that already carries our marker keeps the node's id."""
    before = storage_root.claim_root(usb_disk, "Old name")
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("New name", usb_disk))
    assert result["data"][CONF_NODE_ID] == before.node_id
    assert storage_root.read_marker(usb_disk).node_name == "New name"


async def test_reconfigure_name_and_port(
    hass: HomeAssistant, node_entry: MockConfigEntry, node_root: Path
) -> None:
    result = await node_entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_NODE_NAME: " ", CONF_PORT: 9000}
    )
    assert result["errors"] == {CONF_NODE_NAME: "name_required"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_NODE_NAME: "Alice & Bob", CONF_PORT: 9000}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert node_entry.title == "Alice & Bob"
    assert node_entry.data[CONF_NODE_NAME] == "Alice & Bob"
    assert node_entry.data[CONF_PORT] == 9000
    assert node_entry.data[CONF_STORAGE_ROOT] == str(node_root)
    await hass.async_block_till_done()
    # The reload that follows writes the new name into the disk's marker.
    assert storage_root.read_marker(node_root).node_name == "Alice & Bob"


# --- the node's name must fit in an invite code -------------------------------------------


@pytest.mark.parametrize("name", ["x" * 65, "Alice\x07", "Bob\u202e"])
async def test_user_bad_name_recovers(hass: HomeAssistant, usb_disk: Path, name: str) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form(name, usb_disk))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_NODE_NAME: "bad_name"}
    assert_translated(result, "config")
    assert storage_root.read_marker(usb_disk) is None
    result = await hass.config_entries.flow.async_configure(flow_id, _form("x" * 64, usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_forms_are_translated(hass: HomeAssistant, tmp_path: Path) -> None:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert_translated(result, "config")
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form("", tmp_path / "missing")
    )
    assert result["errors"] == {CONF_NODE_NAME: "name_required"}
    assert_translated(result, "config")


async def test_reconfigure_form_is_translated(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    result = await node_entry.start_reconfigure_flow(hass)
    assert_translated(result, "config")


# --- restoring a lost node's key -----------------------------------------------------------


@pytest.fixture
def old_key(tmp_path: Path) -> identity.Identity:
    """The key of a node that was lost (saved by its household), at tmp_path/saved.key."""
    key, _ = identity.load_or_create(tmp_path / "saved" / "saved.key")
    return key


def _with_key(form: dict, key_path: Path | str) -> dict:
    return {**form, CONF_RESTORE_KEY: f"  {key_path} "}


async def test_restore_key_reuses_old_key(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity
) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_key(_form("Alice", usb_disk), tmp_path / "saved" / "saved.key")
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    data = result["data"]
    assert data[CONF_NODE_PUBLIC_KEY] == old_key.public_line
    key_file = Path(data[CONF_KEY_FILE])
    assert key_file == Path(hass.config.path(DOMAIN, f"{data[CONF_NODE_ID]}.key"))
    assert identity.load(key_file) == old_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


async def test_restore_key_same_as_existing_key(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity
) -> None:
    """A reinstall that still has the key in place, restoring that same key: accepted."""
    _, key_file = claim_root_for(hass, usb_disk)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "saved" / "saved.key", key_file)
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_key(_form("Alice", usb_disk), tmp_path / "saved" / "saved.key")
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == old_key.public_line


@pytest.mark.parametrize(
    "make_key",
    [
        lambda tmp: tmp / "nothing-here.key",
        lambda tmp: _file(tmp / "garbage.key"),
        lambda tmp: tmp,  # a folder
    ],
)
async def test_restore_bad_key_recovers(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity, make_key
) -> None:
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_key(_form("Alice", usb_disk), make_key(tmp_path))
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_RESTORE_KEY: "bad_key"}
    assert_translated(result, "config")
    # Nothing was written to the disk yet, and what was typed is kept.
    assert storage_root.read_marker(usb_disk) is None
    assert result["data_schema"]({})[CONF_STORAGE_ROOT] == str(usb_disk)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_key(_form("Alice", usb_disk), tmp_path / "saved" / "saved.key")
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == old_key.public_line


async def test_restore_key_differing_from_existing_key(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity
) -> None:
    """The node's key is still in place: another key is not written over it."""
    _, key_file = claim_root_for(hass, usb_disk)
    current, _ = identity.load_or_create(key_file)
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_key(_form("Alice", usb_disk), tmp_path / "saved" / "saved.key")
    )
    assert result["errors"] == {CONF_RESTORE_KEY: "bad_key"}
    assert identity.load(key_file) == current
    # Leaving the box empty keeps the node's own key.
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == current.public_line


async def test_damaged_node_key_is_reported(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity
) -> None:
    _, key_file = claim_root_for(hass, usb_disk)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text("damaged")
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["errors"] == {"base": "node_key_unreadable"}
    assert_translated(result, "config")
    assert key_file.read_text() == "damaged"  # nothing is overwritten silently
    # Moving the damaged file away gives the node a new key.
    key_file.unlink()
    result = await hass.config_entries.flow.async_configure(flow_id, _form("Alice", usb_disk))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == identity.load(key_file).public_line


async def test_reconfigure_bad_name(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    result = await node_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_NODE_NAME: "y" * 65, CONF_PORT: 9000}
    )
    assert result["errors"] == {CONF_NODE_NAME: "bad_name"}
    assert_translated(result, "config")
    # The form shows what was typed.
    assert result["data_schema"]({})[CONF_PORT] == 9000
    assert node_entry.data[CONF_NODE_NAME] == "Alice"


def _with_code(form: dict, code: str) -> dict:
    return {**form, CONF_RECOVERY_CODE: code}


async def test_recovery_code_brings_back_the_same_identity(
    hass: HomeAssistant, usb_disk: Path, old_key: identity.Identity
) -> None:
    """After a house fire: the code alone gives the new node the old key (friends' pins hold)."""
    code = recovery_code.of(old_key)
    typed = f"  {code.lower().replace('-', ' ')} "  # as a person may type it from paper
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_code(_form("Alice", usb_disk), typed)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    data = result["data"]
    assert data[CONF_NODE_PUBLIC_KEY] == old_key.public_line
    key_file = Path(data[CONF_KEY_FILE])
    assert key_file == Path(hass.config.path(DOMAIN, f"{data[CONF_NODE_ID]}.key"))
    restored = identity.load(key_file)
    assert restored.fingerprint == old_key.fingerprint
    assert identity.private_seed(restored) == identity.private_seed(old_key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The code itself is kept nowhere in the entry.
    stored = repr((result["data"], result["options"], result["title"]))
    assert code not in stored
    assert code.replace("-", "") not in stored
    assert CONF_RECOVERY_CODE not in data


async def test_recovery_code_typo_is_refused_and_kept_to_correct(
    hass: HomeAssistant, usb_disk: Path, old_key: identity.Identity
) -> None:
    code = recovery_code.of(old_key)
    # One character changed: the checksum catches it.
    wrong = code[:-1] + ("0" if code[-1] != "0" else "1")
    flow_id = await _start(hass)
    for typo in (wrong, code[:-5], code.replace(code[0], "U", 1)):
        result = await hass.config_entries.flow.async_configure(
            flow_id, _with_code(_form("Alice", usb_disk), typo)
        )
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {CONF_RECOVERY_CODE: "bad_recovery_code"}
        assert_translated(result, "config")
        # Nothing was written to the disk, and the code is shown again to be corrected.
        assert storage_root.read_marker(usb_disk) is None
        assert result["data_schema"]({})[CONF_STORAGE_ROOT] == str(usb_disk)
        suggested = {
            str(key): key.description.get("suggested_value")
            for key in result["data_schema"].schema
            if key.description
        }
        assert suggested[CONF_RECOVERY_CODE] == typo
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_code(_form("Alice", usb_disk), code)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == old_key.public_line


async def test_key_file_and_recovery_code_together_are_refused(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, old_key: identity.Identity
) -> None:
    flow_id = await _start(hass)
    form = _with_code(
        _with_key(_form("Alice", usb_disk), tmp_path / "saved" / "saved.key"),
        recovery_code.of(old_key),
    )
    result = await hass.config_entries.flow.async_configure(flow_id, form)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "key_and_code"}
    assert_translated(result, "config")
    assert storage_root.read_marker(usb_disk) is None
    # Either one alone is accepted.
    result = await hass.config_entries.flow.async_configure(flow_id, {**form, CONF_RESTORE_KEY: ""})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == old_key.public_line


async def test_recovery_code_of_another_key_than_the_one_in_place(
    hass: HomeAssistant, usb_disk: Path, old_key: identity.Identity
) -> None:
    """The node's key is still in place: the code's key is not written over it."""
    _, key_file = claim_root_for(hass, usb_disk)
    current, _ = identity.load_or_create(key_file)
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_code(_form("Alice", usb_disk), recovery_code.of(old_key))
    )
    assert result["errors"] == {CONF_RECOVERY_CODE: "other_key_here"}
    assert_translated(result, "config")
    assert identity.load(key_file) == current
    # The code of the key in place is accepted (a reinstall that kept its key).
    result = await hass.config_entries.flow.async_configure(
        flow_id, _with_code(_form("Alice", usb_disk), recovery_code.of(current))
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_NODE_PUBLIC_KEY] == current.public_line
