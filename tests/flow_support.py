"""Helpers for the flow tests: every result a flow shows must be translated, and real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
import json
from pathlib import Path
import re
from typing import Any

from homeassistant.data_entry_flow import FlowResultType

from custom_components.mynas.engine import identity, invite
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.host.space import HostedSpace

EN: dict[str, Any] = json.loads(
    (
        Path(__file__).parent.parent / "custom_components" / "mynas" / "translations" / "en.json"
    ).read_text()
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _section(path: Iterable[str]) -> dict[str, Any]:
    section: Any = EN
    for key in path:
        assert key in section, f"en.json has no {key!r} under {list(path)}"
        section = section[key]
    return section


def _placeholders_given(text: str, given: Mapping[str, Any] | None, where: str) -> None:
    missing = set(_PLACEHOLDER.findall(text)) - set(given or {})
    assert not missing, f"{where} uses placeholders {missing} the flow does not give"


def assert_translated(result: Mapping[str, Any], *path: str) -> None:
    """Check that what ``result`` shows exists in en.json under ``path``, placeholders too.

    ``path`` is ``("config",)``, ``("options",)``, ``("config_subentries", "peer")``, or
    ``("issues", "key_changed", "fix_flow")``.
    """
    section = _section(path)
    placeholders = result.get("description_placeholders")
    kind = result["type"]
    if kind in (FlowResultType.FORM, FlowResultType.MENU, FlowResultType.SHOW_PROGRESS):
        step = section["step"].get(result["step_id"])
        assert step is not None, f"step {result['step_id']} is not translated under {path}"
        for key in ("title", "description"):
            if key in step:
                _placeholders_given(step[key], placeholders, f"{result['step_id']}.{key}")
    if kind is FlowResultType.FORM:
        for field, error in (result.get("errors") or {}).items():
            assert error in section.get("error", {}), f"error {error} ({field}) not translated"
            _placeholders_given(section["error"][error], placeholders, f"error {error}")
        schema = result["data_schema"]
        labels = step.get("data", {})
        # The quality scale's config-flow rule: every field says what it is for.
        descriptions = step.get("data_description", {})
        for marker in schema.schema if schema is not None else ():
            assert str(marker) in labels, f"field {marker} of {result['step_id']} has no label"
            assert str(marker) in descriptions, (
                f"field {marker} of {result['step_id']} has no data_description"
            )
    elif kind is FlowResultType.MENU:
        for option in result["menu_options"]:
            assert option in step["menu_options"], f"menu option {option} not translated"
    elif kind is FlowResultType.SHOW_PROGRESS:
        text = section["progress"][result["progress_action"]]
        _placeholders_given(text, placeholders, f"progress {result['progress_action']}")
    elif kind is FlowResultType.ABORT:
        assert result["reason"] in section["abort"], f"abort {result['reason']} not translated"
        _placeholders_given(section["abort"][result["reason"]], placeholders, "abort")


def invite_code(name: str, addresses: Iterable[str], public_key: str) -> str:
    """An invite code, as a friend's node writes it."""
    return invite.encode(invite.Invite(name, tuple(addresses), public_key))


@asynccontextmanager
async def node_server(
    key_file: Path, storage: Path, grants: Iterable[PeerGrant] = ()
) -> AsyncIterator[NodeServer]:
    """A friend's node (engine only) listening on 127.0.0.1; closed on leaving."""
    key, _ = identity.load_or_create(key_file)
    storage.mkdir(parents=True, exist_ok=True)
    server = NodeServer(key, HostedSpace(storage), list(grants))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()
