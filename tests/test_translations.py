"""The translation files, as Home Assistant serves them to a custom integration.

Home Assistant resolves ``[%key:…%]`` references only when it builds core's own
``strings.json``; in a custom integration's ``translations/*.json`` such a reference is shown
to the user as it is. Every text is therefore written out, in every language.
"""

from __future__ import annotations

import json
from pathlib import Path

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
