"""The node's options: our invite code, the addresses it carries, alerts, bandwidth limits."""

from __future__ import annotations

from datetime import timedelta

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.core_config import async_process_ha_core_config
from homeassistant.data_entry_flow import FlowResultType
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas.config_flow import CONF_INVITE_CODE
from custom_components.mynas.const import (
    CONF_ADDRESSES,
    CONF_DOWNLOAD_LIMIT,
    CONF_INBOUND,
    CONF_MASS_CHANGE,
    CONF_NODE_PUBLIC_KEY,
    CONF_OVERDUE_HOURS,
    CONF_PORT,
    CONF_UNREACHABLE_HOURS,
    CONF_UPLOAD_LIMIT,
    CONF_UPNP,
    DEFAULT_MASS_CHANGE,
    DEFAULT_OVERDUE_HOURS,
    DEFAULT_UNREACHABLE_HOURS,
)
from custom_components.mynas.engine import invite
from custom_components.mynas.orphans import CONF_KEPT_DATA

from .conftest import setup_entry
from .flow_support import assert_translated


async def _open(hass: HomeAssistant, entry: MockConfigEntry, step: str) -> dict:
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.MENU
    assert result["menu_options"] == ["invite", "settings", "bandwidth", "verify", "restore"]
    assert_translated(result, "options")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": step}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == step
    assert_translated(result, "options")
    return result


async def _submit(hass: HomeAssistant, flow_id: str, data: dict) -> dict:
    """Submit a step; let the reload that saved options cause finish before going on."""
    result = await hass.config_entries.options.async_configure(flow_id, data)
    await hass.async_block_till_done()
    return result


def _settings(
    addresses: str, hours: int = DEFAULT_OVERDUE_HOURS, silent: int = DEFAULT_UNREACHABLE_HOURS
) -> dict:
    return {CONF_ADDRESSES: addresses, CONF_OVERDUE_HOURS: hours, CONF_UNREACHABLE_HOURS: silent}


async def test_invite_shows_our_code_with_the_local_address(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    result = await _open(hass, node_entry, "invite")
    code = result["description_placeholders"]["code"]
    # The same code is in a read-only box to copy.
    assert result["data_schema"]({})[CONF_INVITE_CODE] == code
    read = invite.decode(code)
    assert read.name == "Alice"
    assert read.public_key == node_entry.data[CONF_NODE_PUBLIC_KEY]
    # No URL configured for Home Assistant: the loopback address and the node's port.
    assert read.addresses == (f"127.0.0.1:{node_entry.data[CONF_PORT]}",)
    # Closing it changes nothing.
    result = await _submit(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert dict(node_entry.options) == {}


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://192.168.1.20:8123", "192.168.1.20"),
        ("http://HomeAssistant.local:8123", "homeassistant.local"),
        ("http://[fd00::5]:8123", "[fd00::5]"),
        # A name an invite code cannot carry: the loopback address, until one is set.
        ("http://my_ha.local:8123", "127.0.0.1"),
    ],
)
async def test_invite_uses_home_assistants_lan_address(
    hass: HomeAssistant, node_entry: MockConfigEntry, url: str, host: str
) -> None:
    await async_process_ha_core_config(hass, {"internal_url": url})
    result = await _open(hass, node_entry, "invite")
    read = invite.decode(result["description_placeholders"]["code"])
    assert read.addresses == (f"{host}:{node_entry.data[CONF_PORT]}",)


async def test_invite_uses_configured_addresses(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    port = node_entry.data[CONF_PORT]
    hass.config_entries.async_update_entry(
        node_entry,
        # Saved by an older version: a bare host, and a repeat.
        options={CONF_ADDRESSES: ["alice.duckdns.org", "203.0.113.7:9000", "203.0.113.7:9000"]},
    )
    result = await _open(hass, node_entry, "invite")
    read = invite.decode(result["description_placeholders"]["code"])
    assert read.addresses == (f"alice.duckdns.org:{port}", "203.0.113.7:9000")


async def test_settings_saves_addresses_and_hours(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    port = node_entry.data[CONF_PORT]
    hass.config_entries.async_update_entry(node_entry, options={CONF_KEPT_DATA: ["old-peer"]})
    result = await _open(hass, node_entry, "settings")
    assert result["description_placeholders"] == {"default": f"127.0.0.1:{port}"}
    assert result["data_schema"]({})[CONF_OVERDUE_HOURS] == DEFAULT_OVERDUE_HOURS
    assert result["data_schema"]({})[CONF_UNREACHABLE_HOURS] == DEFAULT_UNREACHABLE_HOURS
    assert result["data_schema"]({})[CONF_UPNP] is True  # on by default
    assert result["data_schema"]({})[CONF_INBOUND] == "auto"
    assert result["data_schema"]({})[CONF_MASS_CHANGE] == DEFAULT_MASS_CHANGE == 30
    result = await _submit(
        hass,
        result["flow_id"],
        {
            **_settings(
                " Alice.DuckDNS.org\n203.0.113.7:9000, [2001:db8::1]\n\n"
                "2001:db8::2 alice.duckdns.org",
                48,
                0,
            ),
            CONF_UPNP: False,
            CONF_INBOUND: "no",
            CONF_MASS_CHANGE: 50,
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert dict(node_entry.options) == {
        CONF_ADDRESSES: [
            f"alice.duckdns.org:{port}",
            "203.0.113.7:9000",
            f"[2001:db8::1]:{port}",
            f"[2001:db8::2]:{port}",
        ],
        CONF_OVERDUE_HOURS: 48,
        CONF_UNREACHABLE_HOURS: 0,
        CONF_UPNP: False,
        CONF_INBOUND: "no",
        CONF_MASS_CHANGE: 50,
        CONF_KEPT_DATA: ["old-peer"],  # other options are kept
    }
    # The invite code now carries them.
    result = await _open(hass, node_entry, "invite")
    read = invite.decode(result["description_placeholders"]["code"])
    assert read.addresses == tuple(node_entry.options[CONF_ADDRESSES])
    # The form shows the saved values next time.
    result = await _open(hass, node_entry, "settings")
    assert result["data_schema"]({})[CONF_OVERDUE_HOURS] == 48
    assert result["data_schema"]({})[CONF_UNREACHABLE_HOURS] == 0
    assert result["data_schema"]({})[CONF_UPNP] is False
    assert result["data_schema"]({})[CONF_INBOUND] == "no"
    assert result["data_schema"]({})[CONF_MASS_CHANGE] == 50
    suggested = next(
        marker.description["suggested_value"]
        for marker in result["data_schema"].schema
        if marker == CONF_ADDRESSES
    )
    assert suggested.splitlines() == node_entry.options[CONF_ADDRESSES]


async def test_settings_without_addresses_falls_back_to_local(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    hass.config_entries.async_update_entry(node_entry, options={CONF_ADDRESSES: ["a.example"]})
    result = await _open(hass, node_entry, "settings")
    result = await _submit(hass, result["flow_id"], {CONF_OVERDUE_HOURS: 12})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert node_entry.options[CONF_ADDRESSES] == []
    result = await _open(hass, node_entry, "invite")
    read = invite.decode(result["description_placeholders"]["code"])
    assert read.addresses == (f"127.0.0.1:{node_entry.data[CONF_PORT]}",)


@pytest.mark.parametrize(
    ("typed", "error"),
    [
        ("alice.duckdns.org\nbad host!", "bad_address"),
        ("alice.duckdns.org:99999", "bad_address"),
        ("[fe80::1%eth0]", "bad_address"),
        ("\n".join(f"10.0.0.{n}" for n in range(1, 10)), "too_many_addresses"),
    ],
)
async def test_settings_errors_recover(
    hass: HomeAssistant, node_entry: MockConfigEntry, typed: str, error: str
) -> None:
    result = await _open(hass, node_entry, "settings")
    result = await _submit(hass, result["flow_id"], _settings(typed, 24, 5))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_ADDRESSES: error}
    assert_translated(result, "options")
    # What was typed is shown again, to correct it.
    assert result["data_schema"]({})[CONF_OVERDUE_HOURS] == 24
    assert result["data_schema"]({})[CONF_UNREACHABLE_HOURS] == 5
    suggested = next(
        marker.description["suggested_value"]
        for marker in result["data_schema"].schema
        if marker == CONF_ADDRESSES
    )
    assert suggested == typed
    assert dict(node_entry.options) == {}
    # Eight addresses are fine.
    eight = "\n".join(f"10.0.0.{n}" for n in range(1, 9))
    result = await _submit(hass, result["flow_id"], _settings(eight, 24))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert len(node_entry.options[CONF_ADDRESSES]) == 8


async def test_changed_options_reload_the_node(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    await setup_entry(hass, node_entry)
    before = node_entry.runtime_data
    # Showing the invite code changes nothing: no reload.
    result = await _open(hass, node_entry, "invite")
    result = await _submit(hass, result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert node_entry.runtime_data is before
    # New settings restart the node with them.
    result = await _open(hass, node_entry, "settings")
    result = await _submit(hass, result["flow_id"], _settings("alice.duckdns.org", 6, 1))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert node_entry.state is ConfigEntryState.LOADED
    assert node_entry.runtime_data is not before
    manager = node_entry.runtime_data.manager
    assert manager is not before.manager
    assert (manager.overdue_after, manager.unreachable_after) == (
        timedelta(hours=6),
        timedelta(hours=1),
    )


async def test_bandwidth_limits_reach_the_node(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    """Saved in MB/s, applied node-wide in bytes/s after the reload; 0 means none."""
    await setup_entry(hass, node_entry)
    node = node_entry.runtime_data.node._node
    assert (node.upload.rate, node.download.rate) == (0, 0)
    result = await _open(hass, node_entry, "bandwidth")
    schema = result["data_schema"]({})
    assert (schema[CONF_UPLOAD_LIMIT], schema[CONF_DOWNLOAD_LIMIT]) == (0, 0)
    result = await _submit(
        hass, result["flow_id"], {CONF_UPLOAD_LIMIT: 2.5, CONF_DOWNLOAD_LIMIT: 0}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert node_entry.options[CONF_UPLOAD_LIMIT] == 2.5
    assert node_entry.options[CONF_DOWNLOAD_LIMIT] == 0
    node = node_entry.runtime_data.node._node
    assert (node.upload.rate, node.download.rate) == (2_500_000, 0)
    # The form shows what is saved; the other settings are kept.
    result = await _open(hass, node_entry, "bandwidth")
    assert result["data_schema"]({})[CONF_UPLOAD_LIMIT] == 2.5
    result = await _open(hass, node_entry, "settings")
    result = await _submit(hass, result["flow_id"], _settings("alice.duckdns.org"))
    assert node_entry.options[CONF_UPLOAD_LIMIT] == 2.5
    assert node_entry.runtime_data.node._node.upload.rate == 2_500_000
