"""The translation files, as Home Assistant serves them to a custom integration.

Home Assistant resolves ``[%key:…%]`` references only when it builds core's own
``strings.json``; in a custom integration's ``translations/*.json`` such a reference is shown
to the user as it is. Every text is therefore written out, in every language.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers import translation
import pytest

from custom_components.mynas.const import DOMAIN

TRANSLATIONS = Path(__file__).parent.parent / "custom_components" / "mynas" / "translations"
FILES = sorted(TRANSLATIONS.glob("*.json"))


def test_there_are_translations() -> None:
    assert [path.name for path in FILES if path.name == "en.json"] == ["en.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_no_reference_is_left_unresolved(path: Path) -> None:
    """No ``[%key:`` anywhere: Home Assistant would show it as it is."""
    text = path.read_text(encoding="utf-8")
    json.loads(text)  # and the file is valid JSON
    assert "[%key:" not in text


EN = json.loads((TRANSLATIONS / "en.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("key", sorted(EN["issues"]))
def test_an_issue_has_a_description_or_a_fix_flow_never_both(key: str) -> None:
    """Home Assistant shows a fixable issue through its fix flow's first step (hassfest)."""
    issue = EN["issues"][key]
    assert issue["title"]
    assert ("description" in issue) != ("fix_flow" in issue), key


def _steps(section: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """Every flow step under ``section`` (a flow, or a mapping of flows), with its path."""
    found: list[tuple[str, dict[str, Any]]] = []
    for key, value in section.items():
        if not isinstance(value, dict):
            continue
        if key == "step":
            found += [(f"{where}.step.{name}", step) for name, step in value.items()]
        else:
            found += _steps(value, f"{where}.{key}")
    return found


@pytest.mark.parametrize(
    ("where", "step"),
    [
        pair
        for top in ("config", "options", "config_subentries", "issues")
        for pair in _steps(EN[top], top)
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_every_field_is_described(where: str, step: dict[str, Any]) -> None:
    """The quality scale's config-flow rule: each field has a data_description too."""
    assert set(step.get("data", {})) == set(step.get("data_description", {})), where


PLACEHOLDER = re.compile(r"\{(\w+)\}")
OTHERS = [path for path in FILES if path.name != "en.json"]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_french_is_shipped() -> None:
    """The households this is for are largely in Europe; the idea came from France."""
    assert "fr.json" in {path.name for path in OTHERS}


@pytest.mark.parametrize("path", OTHERS, ids=lambda path: path.name)
def test_every_text_is_translated_with_the_same_placeholders(path: Path) -> None:
    """Each key of en.json, and only those, with the placeholders the code fills in."""
    english = _flatten(EN)
    other = _flatten(json.loads(path.read_text(encoding="utf-8")))
    assert sorted(set(english) - set(other)) == [], "missing"
    assert sorted(set(other) - set(english)) == [], "not in en.json"
    for key, text in english.items():
        assert other[key].strip(), key
        assert sorted(PLACEHOLDER.findall(other[key])) == sorted(PLACEHOLDER.findall(text)), key
        # Markdown the text relies on (code spans for codes and fingerprints) survives.
        assert other[key].count("`") == text.count("`"), key


@pytest.mark.parametrize("path", OTHERS, ids=lambda path: path.name)
def test_translation_keeps_the_order_of_en(path: Path) -> None:
    """Same order as en.json: a diff of two languages lines up, merges stay small."""
    assert list(_flatten(json.loads(path.read_text(encoding="utf-8")))) == list(_flatten(EN))


@pytest.mark.parametrize("language", ["en", "fr"])
async def test_home_assistant_serves_the_texts(hass: HomeAssistant, language: str) -> None:
    """What Home Assistant hands the frontend for MyNAS: every text, none a raw reference."""
    served: dict[str, str] = {}
    for category in ("config", "config_subentries", "entity", "exceptions", "issues", "services"):
        served |= await translation.async_get_translations(hass, language, category, [DOMAIN])
    assert served
    assert not [key for key, text in served.items() if "[%key:" in text]
    connection = served[f"component.{DOMAIN}.entity.binary_sensor.connected.name"]
    assert connection == {"en": "Connection", "fr": "Connexion"}[language]
