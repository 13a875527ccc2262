"""The checks HACS runs on a repository that can run offline (its validate action).

HACS (hacs/integration, ``custom_components/hacs/validate/``) checks ``hacs.json`` against
its schema, the integration's manifest against its own, that the repository holds exactly
one integration under ``custom_components/``, and that it has an information file. Its
``brands`` check asks brands.home-assistant.io over the network; the offline part of it is
that the integration ships its own brand images (``brand/``, which Home Assistant reads
since 2026.3). The repository's description and topics live on GitHub, not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from awesomeversion import AwesomeVersion
from homeassistant.const import __version__ as HA_VERSION
import pytest

ROOT = Path(__file__).parent.parent
HACS = json.loads((ROOT / "hacs.json").read_text())
INTEGRATIONS = [path for path in (ROOT / "custom_components").iterdir() if path.is_dir()]

# HACS_MANIFEST_JSON_SCHEMA: the keys hacs.json may hold, and their types (no others).
HACS_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "content_in_root": bool,
    "country": (str, list),
    "filename": str,
    "hacs": str,
    "hide_default_branch": bool,
    "homeassistant": str,
    "persistent_directory": str,
    "render_readme": bool,
    "zip_release": bool,
}


def _url(value: Any) -> bool:
    parsed = urlparse(value) if isinstance(value, str) else None
    return parsed is not None and parsed.scheme in ("http", "https") and bool(parsed.netloc)


def test_hacs_json_follows_the_schema() -> None:
    assert "name" in HACS
    assert set(HACS) <= set(HACS_KEYS), set(HACS) - set(HACS_KEYS)
    for key, value in HACS.items():
        assert isinstance(value, HACS_KEYS[key]), key
    # HACS: "zip_release is True, but filename is not set".
    assert not HACS.get("zip_release") or HACS.get("filename")
    assert not HACS.get("content_in_root")  # the integration lives in custom_components/


def test_the_versions_hacs_json_asks_for_are_met() -> None:
    """HACS refuses to install on an older Home Assistant than ``homeassistant`` names."""
    assert AwesomeVersion(HACS["homeassistant"]).valid
    assert AwesomeVersion(HACS["homeassistant"]) <= AwesomeVersion(HA_VERSION)
    assert AwesomeVersion(HACS["hacs"]).valid


def test_one_integration_in_custom_components() -> None:
    """HACS installs the one directory under custom_components/, named as its domain."""
    assert [path.name for path in INTEGRATIONS] == ["mynas"]
    manifest = json.loads((INTEGRATIONS[0] / "manifest.json").read_text())
    assert manifest["domain"] == INTEGRATIONS[0].name


@pytest.mark.parametrize("integration", INTEGRATIONS, ids=lambda path: path.name)
def test_integration_manifest_follows_the_schema(integration: Path) -> None:
    """INTEGRATION_MANIFEST_JSON_SCHEMA: what HACS needs of the manifest."""
    manifest = json.loads((integration / "manifest.json").read_text())
    assert isinstance(manifest["codeowners"], list)
    assert _url(manifest["documentation"])
    assert isinstance(manifest["domain"], str)
    assert _url(manifest["issue_tracker"])
    assert isinstance(manifest["name"], str)
    # A custom integration must carry a version Home Assistant (and HACS) can compare.
    assert AwesomeVersion(manifest["version"]).valid
    assert manifest["name"] == HACS["name"]


def test_repository_has_an_information_file() -> None:
    names = {path.name.lower() for path in ROOT.iterdir()}
    assert names & {"readme", "readme.md", "info", "info.md"}


@pytest.mark.parametrize("integration", INTEGRATIONS, ids=lambda path: path.name)
def test_integration_ships_its_brand(integration: Path) -> None:
    for name in ("icon.png", "logo.png"):
        assert (integration / "brand" / name).is_file(), name
