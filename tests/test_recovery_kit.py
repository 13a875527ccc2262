"""The recovery kit: its repair issue, its fix flow, its QR code, and where the code never goes."""

from __future__ import annotations

import base64
from http import HTTPStatus
import json
import logging
from pathlib import Path
import re
from typing import Any
import xml.etree.ElementTree as ET

from homeassistant.components.repairs import repairs_flow_manager
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.json import JSONEncoder
from PIL import Image, ImageDraw
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator
import zxingcpp

from custom_components.mynas import recovery_kit
from custom_components.mynas.const import CONF_KEY_FILE, CONF_KIT_SAVED, DOMAIN
from custom_components.mynas.diagnostics import async_get_config_entry_diagnostics
from custom_components.mynas.engine import identity, recovery_code

from .conftest import setup_entry
from .flow_support import EN, assert_translated

KIT_FIX = ("issues", "recovery_kit", "fix_flow")
_SVG = "{http://www.w3.org/2000/svg}"
_RUN = re.compile(r"M(\d+) (\d+)h(\d+)v1h-(\d+)z")


# Fix flows run in the repairs integration.
pytestmark = pytest.mark.usefixtures("repairs_loaded")


def _issue_id(entry: MockConfigEntry) -> str:
    return f"recovery_kit_{entry.entry_id}"


def _issue(hass: HomeAssistant, entry: MockConfigEntry) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, _issue_id(entry))


def _code_of(entry: MockConfigEntry) -> str:
    return recovery_code.of(identity.load(entry.data[CONF_KEY_FILE]))


def _svg_of(uri: str) -> ET.Element:
    prefix = "data:image/svg+xml;base64,"
    assert uri.startswith(prefix)
    return ET.fromstring(base64.b64decode(uri[len(prefix) :], validate=True))


def _raster(svg: ET.Element, scale: int = 8) -> Image.Image:
    """Draw the SVG's modules into a picture, as a browser would (only what it contains)."""
    assert svg.tag == f"{_SVG}svg"
    _, _, width, height = (int(v) for v in svg.attrib["viewBox"].split())
    rect, path = list(svg)
    assert rect.tag == f"{_SVG}rect"
    assert rect.attrib["fill"] == "#fff"
    assert (int(rect.attrib["width"]), int(rect.attrib["height"])) == (width, height)
    assert path.tag == f"{_SVG}path"
    assert path.attrib["fill"] == "#000"
    runs = _RUN.findall(path.attrib["d"])
    assert "".join(f"M{x} {y}h{n}v1h-{m}z" for x, y, n, m in runs) == path.attrib["d"]
    image = Image.new("L", (width * scale, height * scale), 255)
    draw = ImageDraw.Draw(image)
    for x, y, n, m in runs:
        assert n == m
        left, top = int(x) * scale, int(y) * scale
        draw.rectangle((left, top, left + int(n) * scale - 1, top + scale - 1), fill=0)
    return image


def test_the_qr_code_reads_back_as_the_code() -> None:
    """A real QR reader reads exactly the code from the SVG the fix flow shows."""
    for seed in (bytes(32), bytes(range(32)), b"\xff" * 32):
        code = recovery_code.encode(seed)
        image = _raster(_svg_of(recovery_kit.qr_data_uri(code)))
        found = zxingcpp.read_barcodes(image)
        assert [(item.format, item.text) for item in found] == [
            (zxingcpp.BarcodeFormat.QRCode, code)
        ]
        assert recovery_code.decode(found[0].text) == seed


def test_the_qr_svg_has_a_quiet_zone_and_nothing_else() -> None:
    code = recovery_code.encode(bytes(range(32)))
    svg = _svg_of(recovery_kit.qr_data_uri(code))
    matrix = recovery_kit.qr_matrix(code)
    assert len(matrix) == 33  # version 4: 69 characters in alphanumeric mode, level M
    size = len(matrix) + 2 * recovery_kit.QUIET_ZONE
    assert svg.attrib["viewBox"] == f"0 0 {size} {size}"
    assert svg.attrib["width"] == str(size * recovery_kit.MODULE_PIXELS)
    # Module for module, what is drawn is the library's symbol, inside a white margin.
    image = _raster(svg, scale=1)
    drawn = [[int(image.getpixel((x, y)) == 0) for x in range(size)] for y in range(size)]
    margin = recovery_kit.QUIET_ZONE
    assert [row[margin:-margin] for row in drawn[margin:-margin]] == matrix
    assert not any(
        drawn[y][x]
        for y in range(size)
        for x in range(size)
        if min(x, y) < margin or max(x, y) >= size - margin
    )
    text = ET.tostring(svg, encoding="unicode")
    assert "script" not in text
    assert "href" not in text


async def test_kit_issue_after_setup_gone_only_once_confirmed(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, node_entry: MockConfigEntry
) -> None:
    """Raised at setup; the fix flow shows the code and its QR; unticked, the issue stays.

    Driven as the UI does it, over Home Assistant's HTTP API.
    """
    assert await setup_entry(hass, node_entry)
    issue = _issue(hass, node_entry)
    assert issue is not None
    assert issue.is_fixable
    assert issue.severity is ir.IssueSeverity.WARNING
    assert issue.translation_key == "recovery_kit"
    assert issue.translation_placeholders == {"node": "Alice"}
    code = _code_of(node_entry)

    client = await hass_client()
    response = await client.post(
        "/api/repairs/issues/fix", json={"handler": DOMAIN, "issue_id": _issue_id(node_entry)}
    )
    assert response.status == HTTPStatus.OK
    result = await response.json()
    assert result["type"] == "form"
    assert result["step_id"] == "confirm"
    assert not result["errors"]
    placeholders = result["description_placeholders"]
    assert placeholders["node"] == "Alice"
    assert placeholders["code"] == code
    assert len(code.split("-")) == 14
    assert _svg_of(placeholders["qr"]) is not None
    text = EN["issues"]["recovery_kit"]["fix_flow"]["step"]["confirm"]["description"]
    assert "`{code}`" in text
    assert "]({qr})" in text
    flow_url = f"/api/repairs/issues/fix/{result['flow_id']}"

    # Unticked: refused, the issue stays, the code is shown again.
    response = await client.post(flow_url, json={"stored": False})
    result = await response.json()
    assert result["type"] == "form"
    assert result["errors"] == {"stored": "kit_not_stored"}
    assert result["description_placeholders"]["code"] == code
    assert _issue(hass, node_entry) is not None
    assert not node_entry.data.get(CONF_KIT_SAVED)

    response = await client.post(flow_url, json={"stored": True})
    result = await response.json()
    assert result["type"] == "create_entry"
    assert _issue(hass, node_entry) is None
    assert node_entry.data[CONF_KIT_SAVED] is True

    # A reload (as after a restart) does not raise it again.
    assert await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done()
    assert _issue(hass, node_entry) is None


async def test_kit_issue_survives_a_reload_until_confirmed(
    hass: HomeAssistant, node_entry: MockConfigEntry
) -> None:
    assert await setup_entry(hass, node_entry)
    ir.async_delete_issue(hass, DOMAIN, _issue_id(node_entry))  # as a restart forgets it
    assert await hass.config_entries.async_reload(node_entry.entry_id)
    await hass.async_block_till_done()
    assert _issue(hass, node_entry) is not None
    # Even a node that cannot start (its disk is away) asks for its kit.
    await hass.config_entries.async_unload(node_entry.entry_id)
    ir.async_delete_issue(hass, DOMAIN, _issue_id(node_entry))
    Path(node_entry.data["storage_root"], ".mynas", "node.json").unlink()
    await hass.config_entries.async_setup(node_entry.entry_id)
    await hass.async_block_till_done()
    assert _issue(hass, node_entry) is not None
    assert ir.async_get(hass).async_get_issue(DOMAIN, f"storage_{node_entry.entry_id}")


async def test_kit_flow_texts_and_aborts(hass: HomeAssistant, node_entry: MockConfigEntry) -> None:
    assert await setup_entry(hass, node_entry)
    manager = repairs_flow_manager(hass)
    assert manager is not None
    result: Any = await manager.async_init(DOMAIN, context={"issue_id": _issue_id(node_entry)})
    assert_translated(result, *KIT_FIX)
    result = await manager.async_configure(result["flow_id"], {"stored": False})
    assert_translated(result, *KIT_FIX)
    manager.async_abort(result["flow_id"])

    # The key file is unreadable: nothing to show, said so.
    Path(node_entry.data[CONF_KEY_FILE]).write_text("damaged")
    result = await manager.async_init(DOMAIN, context={"issue_id": _issue_id(node_entry)})
    assert result["type"] == "abort"
    assert result["reason"] == "key_unreadable"
    assert_translated(result, *KIT_FIX)

    # The node was removed meanwhile.
    await hass.config_entries.async_remove(node_entry.entry_id)
    await hass.async_block_till_done()
    ir.async_create_issue(
        hass,
        DOMAIN,
        _issue_id(node_entry),
        is_fixable=True,
        severity=ir.IssueSeverity.WARNING,
        translation_key="recovery_kit",
        translation_placeholders={"node": "Alice"},
        data={"entry_id": node_entry.entry_id},
    )
    result = await manager.async_init(DOMAIN, context={"issue_id": _issue_id(node_entry)})
    assert result["reason"] == "node_gone"
    assert_translated(result, *KIT_FIX)


async def test_the_code_is_never_logged_stored_or_in_diagnostics(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    node_entry: MockConfigEntry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    code = _code_of(node_entry)
    spellings = {code, code.replace("-", ""), code.lower()}
    assert await setup_entry(hass, node_entry)
    client = await hass_client()
    response = await client.post(
        "/api/repairs/issues/fix", json={"handler": DOMAIN, "issue_id": _issue_id(node_entry)}
    )
    result = await response.json()
    assert result["description_placeholders"]["code"] == code  # it was shown
    flow_url = f"/api/repairs/issues/fix/{result['flow_id']}"
    await client.post(flow_url, json={"stored": False})
    diagnostics = json.dumps(
        await async_get_config_entry_diagnostics(hass, node_entry), cls=JSONEncoder
    )
    await client.post(flow_url, json={"stored": True})
    await hass.async_block_till_done()
    stored = json.dumps(
        [dict(node_entry.data), dict(node_entry.options), ir.async_get(hass).issues],
        cls=JSONEncoder,
        default=str,
    )
    for spelling in spellings:
        assert spelling not in caplog.text
        assert spelling not in diagnostics
        assert spelling not in stored
    assert "DEBUG" in caplog.text  # the capture did see the flow's debug records


async def test_a_node_set_up_from_its_code_asks_for_the_same_kit_again(
    hass: HomeAssistant, usb_disk: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    """After a house fire: the node set up from the code shows that same code in its kit."""
    lost, _ = identity.load_or_create(tmp_path / "lost.key")
    code = recovery_code.of(lost)
    result: Any = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "user"})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            "node_name": "Alice",
            "storage_root": str(usb_disk),
            "port": unused_tcp_port,
            "allow_same_disk": False,
            "upnp": False,
            "recovery_code": code,
        },
    )
    assert result["type"] == "create_entry"
    await hass.async_block_till_done()
    entry = result["result"]
    assert entry.data["public_key"] == lost.public_line
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"recovery_kit_{entry.entry_id}")
    assert issue is not None
    manager = repairs_flow_manager(hass)
    assert manager is not None
    shown: Any = await manager.async_init(DOMAIN, context={"issue_id": issue.issue_id})
    assert shown["description_placeholders"]["code"] == code
    await hass.config_entries.async_unload(entry.entry_id)
