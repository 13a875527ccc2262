"""Reachability in Home Assistant: the button, the service, the sensors, the repair issue, UPnP.

Alice's node runs in Home Assistant; Bob's is a real engine server on 127.0.0.1 that dials
back the addresses Alice announces (the check is done from the friend's side); the router
of the UPnP test is a real IGD on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er, issue_registry as ir
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mynas import reach, sensor as sensor_platform
from custom_components.mynas.const import CONF_ADDRESSES, CONF_PORT, CONF_UPNP, DOMAIN
from custom_components.mynas.engine import upnp

from .conftest import BOB_ID, Bob, add_peer, setup_entry
from .engine.igd_support import WanIpConnection, router


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _start(
    hass: HomeAssistant, entry: MockConfigEntry, bob: Bob, addresses: list[str], **options: Any
) -> None:
    hass.config_entries.async_update_entry(
        entry, options={**entry.options, CONF_ADDRESSES: addresses, **options}
    )
    add_peer(hass, entry, bob)
    await setup_entry(hass, entry)


def _entity(hass: HomeAssistant, domain: str, key: str, peer: str | None = None) -> str:
    registry = er.async_get(hass)
    suffix = f"_{peer}_{key}" if peer else f"_{key}"
    for entity in registry.entities.values():
        if (
            entity.platform == DOMAIN
            and entity.domain == domain
            and entity.unique_id.endswith(suffix)
        ):
            return entity.entity_id
    raise AssertionError(f"no {domain} entity {key}")


async def test_the_button_checks_and_the_sensors_say_reachable(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> None:
    ours = f"127.0.0.1:{node_entry.data[CONF_PORT]}"
    await _start(hass, node_entry, bob, [ours])
    sensor = _entity(hass, "sensor", "reachability")
    assert hass.states.get(sensor).state == "not_checked"  # not checked yet
    await hass.services.async_call(
        "button",
        "press",
        {"entity_id": _entity(hass, "button", "check_reachability")},
        blocking=True,
    )
    state = hass.states.get(sensor)
    assert state.state == "reachable"
    assert state.attributes["addresses"] == [ours]
    assert state.attributes["lan_address"] == "127.0.0.1"
    assert state.attributes["seen_from"] == ["127.0.0.1"]
    assert state.attributes["checked_at"]
    assert ir.async_get(hass).async_get_issue(DOMAIN, f"reachability_{node_entry.entry_id}") is None
    # Bob's device page: where he was reached, and since when.
    await hass.async_block_till_done(wait_background_tasks=True)
    address = hass.states.get(_entity(hass, "sensor", "peer_address", peer=BOB_ID))
    assert address.state == bob.address
    assert address.attributes["since"]
    assert address.attributes["typed"] == [bob.address]
    # UPnP is off for this node: the diagnostic sensor says so.
    assert hass.states.get(_entity(hass, "sensor", "upnp")).state == "off"


async def test_the_service_names_a_closed_port_and_the_issue_says_what_to_do(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> None:
    closed = f"127.0.0.1:{_closed_port()}"
    await _start(hass, node_entry, bob, [closed])
    response = await hass.services.async_call(
        DOMAIN, "check_reachability", {}, blocking=True, return_response=True
    )
    assert response["cause"] == "port_closed"
    assert response["checks"][BOB_ID] == [
        {"address": closed, "outcome": "refused", "detail": "connection refused"}
    ]
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"reachability_{node_entry.entry_id}")
    assert issue is not None
    assert issue.translation_key == "reachability_port_closed"
    assert issue.translation_placeholders == {
        "node": "Alice",
        "port": str(node_entry.data[CONF_PORT]),
        "lan_address": "127.0.0.1",
        "public": "127.0.0.1",
        "answered_by": "-",
    }
    assert hass.states.get(_entity(hass, "sensor", "reachability")).state == "port_closed"
    # Once a check finds us, the issue goes.
    reach.reachability_issue(hass, node_entry.entry_id, "Alice", 8022, {"cause": "reachable"})
    assert ir.async_get(hass).async_get_issue(DOMAIN, f"reachability_{node_entry.entry_id}") is None


async def test_without_an_address_the_issue_says_to_give_one(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob
) -> None:
    await _start(hass, node_entry, bob, [])
    response = await hass.services.async_call(
        DOMAIN, "check_reachability", {}, blocking=True, return_response=True
    )
    assert response["cause"] == "no_address"
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"reachability_{node_entry.entry_id}")
    assert issue is not None
    assert issue.translation_key == "reachability_no_address"
    # A check nobody could answer changes nothing.
    reach.reachability_issue(hass, node_entry.entry_id, "Alice", 8022, {"cause": "unknown"})
    assert ir.async_get(hass).async_get_issue(DOMAIN, f"reachability_{node_entry.entry_id}")


async def test_upnp_maps_the_port_on_the_router(
    hass: HomeAssistant, node_entry: MockConfigEntry, bob: Bob, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        ssdp = int(sock.getsockname()[1])
    async with router(_closed_port(), ssdp):
        monkeypatch.setattr(upnp, "DEFAULT_SEARCH_TARGET", ("127.0.0.1", ssdp))
        await _start(hass, node_entry, bob, [], **{CONF_UPNP: True})
        sensor = _entity(hass, "sensor", "upnp")
        deadline = time.monotonic() + 15
        while hass.states.get(sensor).state != "mapped":
            assert time.monotonic() < deadline, hass.states.get(sensor)
            await asyncio.sleep(0.05)
            await hass.async_block_till_done()
        state = hass.states.get(sensor)
        port = node_entry.data[CONF_PORT]
        assert state.attributes["external_address"] == f"203.0.113.7:{port}"
        assert state.attributes["protocol"] == "upnp"  # asked first; NAT-PMP only after it
        assert WanIpConnection.mappings[("TCP", port)]["internal_client"] == "127.0.0.1"
        await hass.config_entries.async_unload(node_entry.entry_id)
        await hass.async_block_till_done()
        assert WanIpConnection.mappings == {}  # removed when the entry unloads


def test_a_check_nobody_answered_reads_not_checked() -> None:
    """The engine's "unknown" would show as Home Assistant's own "Unknown": not checked."""
    assert sensor_platform._cause(None) == "not_checked"
    assert sensor_platform._cause({"cause": "unknown"}) == "not_checked"
    assert sensor_platform._cause({"cause": "port_closed"}) == "port_closed"
