"""The owner's modules keep to their rooms: the runs speak to the host through PeerLink.

Frames, close modes and frame sizes belong to the client (``client``, ``outbox``,
``answers``); push, restore and verify and their halves use PeerLink's requests, its
``Upload`` and its typed ``download`` stream. What the runs share comes from ``run``, not
from a push module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OWNER = Path(__file__).parents[3] / "custom_components" / "mynas" / "engine" / "owner"
RUNS = [
    *("push", "sender", "feed", "restore", "verify", "run", "handoff", "index_writer"),
    "backup_area",
]


def _imports(module: str) -> set[tuple[str, str]]:
    """(module, name) for each ``from X import name`` in an owner module."""
    tree = ast.parse((OWNER / f"{module}.py").read_text())
    return {
        ("." * node.level + (node.module or ""), alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


@pytest.mark.parametrize("module", RUNS)
def test_runs_use_no_frames(module: str) -> None:
    """No run imports the protocol module, its frames or its close modes."""
    found = _imports(module)
    assert ("..", "protocol") not in found
    assert {name for source, name in found if source == "..protocol"} <= {"FailCode"}


@pytest.mark.parametrize("module", ["restore", "verify"])
def test_restore_and_verify_take_their_words_from_run(module: str) -> None:
    """Restore imports nothing of push; verify only the push its repair runs."""
    from_push = {name for source, name in _imports(module) if source == ".push"}
    assert from_push == ({"push"} if module == "verify" else set())
