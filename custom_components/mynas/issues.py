"""Repair issues MyNAS raises: only for what the user can act on, each saying what to do."""

from __future__ import annotations

from datetime import timedelta

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir

from .const import DOMAIN
from .engine import RootProblem


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


def storage_problem(
    hass: HomeAssistant, entry_id: str, node: str, problem: RootProblem | None, path: str
) -> None:
    """Raise (or, with ``problem`` None, clear) the "storage disk" issue of a node."""
    issue_id = f"storage_{entry_id}"
    if problem is None:
        _delete(hass, issue_id)
        return
    key = {
        RootProblem.NOT_FOUND: "storage_missing",
        RootProblem.MARKER_MISSING: "storage_missing",
        RootProblem.FOREIGN_MARKER: "storage_foreign",
    }.get(problem, "storage_missing")
    _create(hass, issue_id, key, {"node": node, "path": path})


def key_changed(
    hass: HomeAssistant,
    entry_id: str,
    peer_id: str,
    peer: str,
    old_fingerprint: str,
    new_fingerprint: str | None,
    new_key: str | None,
) -> None:
    """A peer answers with another key: nothing is sent until the user decides.

    With the presented key in hand the issue is fixable (its fix flow accepts the key once
    confirmed); without it there is nothing to accept, and the text says what to do instead.
    """
    _create(
        hass,
        f"key_changed_{peer_id}",
        "key_changed" if new_key is not None else "key_changed_unknown",
        {"peer": peer, "old": old_fingerprint, "new": new_fingerprint or "unknown"},
        severity=ir.IssueSeverity.CRITICAL,
        fixable=new_key is not None,
        data={"entry_id": entry_id, "peer_id": peer_id, "new_key": new_key},
    )


def clear_key_changed(hass: HomeAssistant, peer_id: str) -> None:
    """The peer presents its pinned key again."""
    _delete(hass, f"key_changed_{peer_id}")


def unreachable(hass: HomeAssistant, peer_id: str, peer: str, silent: timedelta | None) -> None:
    """Raise (or, with ``silent`` None, clear) "peer unreachable for <how long>"."""
    issue_id = f"unreachable_{peer_id}"
    if silent is None:
        _delete(hass, issue_id)
    else:
        _create(
            hass,
            issue_id,
            "peer_unreachable",
            {"peer": peer, "duration": _duration(silent)},
            severity=ir.IssueSeverity.WARNING,
        )


def _duration(span: timedelta) -> str:
    """``3 days``, ``5 hours``, ``1 minute``: the largest whole unit, as people say it."""
    seconds = int(span.total_seconds())
    if seconds < 60:
        return "less than a minute"
    unit, size = next(
        ((unit, size) for unit, size in (("day", 86400), ("hour", 3600)) if seconds >= size),
        ("minute", 60),
    )
    count = seconds // size
    return f"{count} {unit}{'' if count == 1 else 's'}"


def quota_refused(
    hass: HomeAssistant,
    folder_id: str,
    peer_id: str,
    placeholders: dict[str, str] | None,
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the host refused us for quota"."""
    issue_id = f"quota_{folder_id}_{peer_id}"
    if placeholders is None:
        _delete(hass, issue_id)
    else:
        _create(hass, issue_id, "quota_exceeded", placeholders)


def peer_disk_full(hass: HomeAssistant, peer_id: str, placeholders: dict[str, str] | None) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the friend's disk itself is full".

    Not the quota: the host's disk has no room left (it answered "no space left on
    device", or reports next to no free space). Only the friend can free space there.
    """
    issue_id = f"peer_disk_full_{peer_id}"
    if placeholders is None:
        _delete(hass, issue_id)
    else:
        _create(hass, issue_id, "peer_disk_full", placeholders)


def folder_missing(
    hass: HomeAssistant, folder_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "the protected folder is not there".

    Missing, unreadable, or empty while friends hold its files: its disk is not mounted.
    """
    issue_id = f"folder_missing_{folder_id}"
    if placeholders is None:
        _delete(hass, issue_id)
    else:
        _create(hass, issue_id, "folder_missing", placeholders)


def overdue(hass: HomeAssistant, folder_id: str, placeholders: dict[str, str] | None) -> None:
    """Raise (or, with ``placeholders`` None, clear) "folder backup overdue"."""
    issue_id = f"overdue_{folder_id}"
    if placeholders is None:
        _delete(hass, issue_id)
    else:
        _create(hass, issue_id, "folder_overdue", placeholders, severity=ir.IssueSeverity.WARNING)


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
