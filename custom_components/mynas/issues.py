"""Repair issues MyNAS raises: only for what the user can act on, each saying what to do.

Every issue says since when (an absolute local time: a duration would be stale as soon as
it is shown), which folders are not copied meanwhile, and the one thing to do; where the
user can act from the dialog, the issue is fixable (retry now, change an address, accept a
key, keep or delete data, confirm the recovery kit is kept) and its fix flow's first step
carries the text. The recovery kit's issue is the one that is not about a fault: it asks
once per node, until confirmed, for the one secret that survives the house.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .const import DOMAIN
from .engine import RootProblem
from .texts import names, since


def _create(
    hass: HomeAssistant,
    issue_id: str,
    key: str,
    placeholders: dict[str, str],
    *,
    severity: ir.IssueSeverity = ir.IssueSeverity.ERROR,
    fixable: bool = False,
    data: dict[str, str | int | float | None] | None = None,
) -> None:
    ir.async_create_issue(
        hass,
        DOMAIN,
        issue_id,
        is_fixable=fixable,
        is_persistent=False,
        severity=severity,
        translation_key=key,
        translation_placeholders=placeholders,
        data=data,
    )


def _delete(hass: HomeAssistant, issue_id: str) -> None:
    ir.async_delete_issue(hass, DOMAIN, issue_id)


def _raise_or_clear(
    hass: HomeAssistant,
    issue_id: str,
    key: str,
    placeholders: dict[str, str] | None,
    **options: Any,
) -> None:
    """Raise ``issue_id`` (of ``key``, with ``_create``'s options); None clears it."""
    if placeholders is None:
        _delete(hass, issue_id)
    else:
        _create(hass, issue_id, key, placeholders, **options)


def _since_before(hass: HomeAssistant, issue_id: str, key: str) -> str:
    """When the issue ``issue_id`` (of ``key``) was first raised: kept while it stays."""
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id)
    if issue is not None and issue.translation_key == key:
        kept = (issue.translation_placeholders or {}).get("since")
        if kept:
            return kept
    return since(None)


def storage_problem(
    hass: HomeAssistant,
    entry_id: str,
    node: str,
    problem: RootProblem | None,
    path: str,
    folders: list[str] | None = None,
) -> None:
    """Raise (or, with ``problem`` None, clear) the "storage disk" issue of a node.

    Fixable: the fix flow checks the disk again now (MyNAS also does, every minute).
    """
    issue_id = f"storage_{entry_id}"
    if problem is None:
        _delete(hass, issue_id)
        return
    key = {
        RootProblem.NOT_FOUND: "storage_missing",
        RootProblem.MARKER_MISSING: "storage_missing",
        RootProblem.FOREIGN_MARKER: "storage_foreign",
    }.get(problem, "storage_missing")
    _create(
        hass,
        issue_id,
        key,
        {
            "node": node,
            "path": path,
            "since": _since_before(hass, issue_id, key),
            "folders": names(folders or []),
        },
        fixable=True,
        data={"entry_id": entry_id},
    )


def recovery_kit(hass: HomeAssistant, entry_id: str, node: str) -> None:
    """Ask the user to keep the node's recovery kit outside the house, until they confirm.

    Fixable: the fix flow shows the code and its QR code (never the issue: the registry is
    stored) and records the confirmation in the entry (``CONF_KIT_SAVED``).
    """
    _create(
        hass,
        f"recovery_kit_{entry_id}",
        "recovery_kit",
        {"node": node},
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id},
    )


def key_changed(
    hass: HomeAssistant,
    entry_id: str,
    peer_id: str,
    peer: str,
    old_fingerprint: str,
    new_fingerprint: str | None,
    new_key: str | None,
    *,
    down_since: datetime | None = None,
    folders: list[str] | None = None,
) -> None:
    """A peer answers with another key: nothing is sent until the user decides.

    With the presented key in hand the issue is fixable (its fix flow accepts the key once
    confirmed); without it there is nothing to accept, and the text says what to do instead.
    """
    _create(
        hass,
        f"key_changed_{peer_id}",
        "key_changed" if new_key is not None else "key_changed_unknown",
        {
            "peer": peer,
            "old": old_fingerprint,
            "new": new_fingerprint or "unknown",
            "since": since(down_since),
            "folders": names(folders or []),
        },
        severity=ir.IssueSeverity.CRITICAL,
        fixable=new_key is not None,
        data={"entry_id": entry_id, "peer_id": peer_id, "new_key": new_key},
    )


def clear_key_changed(hass: HomeAssistant, peer_id: str) -> None:
    """The peer presents its pinned key again."""
    _delete(hass, f"key_changed_{peer_id}")


def unreachable(
    hass: HomeAssistant,
    entry_id: str,
    peer_id: str,
    peer: str,
    down_since: datetime | None,
    folders: list[str] | None = None,
) -> None:
    """Raise (or, with ``down_since`` None, clear) "peer unreachable since <when>".

    Fixable: the fix flow tries again now, or changes the peer's address.
    """
    _raise_or_clear(
        hass,
        f"unreachable_{peer_id}",
        "peer_unreachable",
        None
        if down_since is None
        else {"peer": peer, "since": since(down_since), "folders": names(folders or [])},
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id, "peer_id": peer_id},
    )


def quota_refused(
    hass: HomeAssistant,
    entry_id: str,
    folder_id: str,
    peer_id: str,
    placeholders: dict[str, str] | None,
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the host refused us for quota".

    Fixable: once the friend grants more space, the fix flow backs the folder up again.
    """
    issue_id = f"quota_{folder_id}_{peer_id}"
    _raise_or_clear(
        hass,
        issue_id,
        "quota_exceeded",
        None
        if placeholders is None
        else {**placeholders, "since": _since_before(hass, issue_id, "quota_exceeded")},
        fixable=True,
        data={"entry_id": entry_id, "folder_id": folder_id, "peer_id": peer_id},
    )


def peer_disk_full(hass: HomeAssistant, peer_id: str, placeholders: dict[str, str] | None) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the friend's disk itself is full".

    Not the quota: the host's disk has no room left (it answered "no space left on
    device", or reports next to no free space). Only the friend can free space there.
    """
    _raise_or_clear(hass, f"peer_disk_full_{peer_id}", "peer_disk_full", placeholders)


def folder_missing(
    hass: HomeAssistant, folder_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the protected folder is not there".

    Missing, unreadable, or empty while friends hold its files: its disk is not mounted.
    """
    _raise_or_clear(hass, f"folder_missing_{folder_id}", "folder_missing", placeholders)


def overdue(
    hass: HomeAssistant, entry_id: str, folder_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "folder backup overdue".

    Fixable: the fix flow backs the folder up now (once the cause, which the text names,
    is dealt with).
    """
    _raise_or_clear(
        hass,
        f"overdue_{folder_id}",
        "folder_overdue",
        placeholders,
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id, "folder_id": folder_id},
    )


def orphaned_data(hass: HomeAssistant, entry_id: str, jail: str, size: str) -> None:
    """Ask whether to keep or delete the data a removed peer left on the disk."""
    _create(
        hass,
        f"orphan_{entry_id}_{jail}",
        "orphaned_data",
        {"jail": jail, "size": size},
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id, "jail": jail},
    )


def clear_orphaned_data(hass: HomeAssistant, entry_id: str, jail: str) -> None:
    """The removed peer's data question is settled."""
    _delete(hass, f"orphan_{entry_id}_{jail}")


def clear_node(hass: HomeAssistant, entry_id: str) -> None:
    """The node is removed: none of its issues has anything left to say."""
    registry = ir.async_get(hass)
    for (domain, issue_id), issue in list(registry.issues.items()):
        if domain == DOMAIN and (issue.data or {}).get("entry_id") == entry_id:
            _delete(hass, issue_id)
