"""Diagnostics: what helps to debug a node, without keys, addresses or paths."""

from __future__ import annotations

import json
from pathlib import Path

from homeassistant.core import HomeAssistant
from homeassistant.helpers.json import JSONEncoder
from pytest_homeassistant_custom_component.common import MockConfigEntry
from syrupy.assertion import SnapshotAssertion
from syrupy.filters import props

from custom_components.mynas.const import CONF_KEY_FILE, CONF_NODE_PUBLIC_KEY
from custom_components.mynas.diagnostics import async_get_config_entry_diagnostics

from .conftest import Bob, setup_entry, unmount


def _assert_nothing_exposed(
    dump: str, entry: MockConfigEntry, bob: Bob | None, *paths: Path
) -> None:
    assert "ssh-ed25519" not in dump
    assert "AAAA" not in dump  # no base64 key material of any kind
    assert entry.data[CONF_NODE_PUBLIC_KEY].split()[1] not in dump
    assert entry.data[CONF_KEY_FILE] not in dump
    assert "127.0.0.1" not in dump
    for path in paths:
        assert str(path) not in dump
    if bob is not None:
        assert bob.identity.public_line.split()[1] not in dump
        assert str(bob.port) not in dump


async def test_diagnostics(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    node_root: Path,
    tmp_path: Path,
    snapshot: SnapshotAssertion,
) -> None:
    # Bob goes away: his error (which names his address) must not leak either.
    await bob.stop()
    await synced_node.runtime_data.manager.probe(synced_node.runtime_data.manager.pairs[0][1])
    diagnostics = await async_get_config_entry_diagnostics(hass, synced_node)
    dump = json.dumps(diagnostics, cls=JSONEncoder)
    _assert_nothing_exposed(dump, synced_node, bob, node_root, tmp_path)
    peer = diagnostics["peers"]["Bob"]
    assert peer["reachability"] == "unreachable"
    assert peer["error"] == "**REDACTED**"
    assert diagnostics == snapshot(exclude=props("node_id", "port"))


async def test_diagnostics_of_a_node_that_is_not_running(
    hass: HomeAssistant,
    node_entry: MockConfigEntry,
    node_root: Path,
) -> None:
    unmount(node_root)
    await setup_entry(hass, node_entry)
    diagnostics = await async_get_config_entry_diagnostics(hass, node_entry)
    assert diagnostics["state"] == "setup_retry"
    assert set(diagnostics) == {"entry", "subentries", "state"}
    _assert_nothing_exposed(json.dumps(diagnostics, cls=JSONEncoder), node_entry, None, node_root)
