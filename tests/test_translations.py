"""The translation files, as Home Assistant serves them to a custom integration.

Home Assistant resolves ``[%key:…%]`` references only when it builds core's own
``strings.json``; in a custom integration's ``translations/*.json`` such a reference is shown
to the user as it is. Every text is therefore written out, in every language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
