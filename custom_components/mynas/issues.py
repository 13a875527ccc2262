"""Repair issues MyNAS raises: only for what the user can act on, each saying what to do.

Every issue says since when (an absolute local time: a duration would be stale as soon as
it is shown), which folders are not copied meanwhile, and the one thing to do; where the
user can act from the dialog, the issue is fixable (retry now, change an address, accept a
key, keep or delete data, confirm the recovery kit is kept) and its fix flow's first step
carries the text. The recovery kit's issue is the one that is not about a fault: it asks
once per node, until confirmed, for the one secret that survives the house.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    *,
    since_first: bool = False,
    **options: Any,
) -> None:
    """Raise ``issue_id`` (of ``key``, with ``_create``'s options); None clears it.

    ``since_first``: the text's ``since`` is when the issue was first raised (kept while it
    stays), not now.
    """
    if placeholders is None:
        _delete(hass, issue_id)
        return
    if since_first:
        placeholders = {**placeholders, "since": _since_before(hass, issue_id, key)}
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


@dataclass(frozen=True, slots=True)
class _PairIssue:
    """A fixable issue about one folder × peer pair; its text says since when it stands."""

    prefix: str  # of the issue id: ``<prefix>_<folder id>_<peer id>``
    key: str  # its translation key

    def __call__(
        self,
        hass: HomeAssistant,
        entry_id: str,
        folder_id: str,
        peer_id: str,
        placeholders: dict[str, str] | None,
    ) -> None:
        """Raise the pair's issue (or, with ``placeholders`` None, clear it)."""
        _raise_or_clear(
            hass,
            f"{self.prefix}_{folder_id}_{peer_id}",
            self.key,
            placeholders,
            since_first=True,
            fixable=True,
            data={"entry_id": entry_id, "folder_id": folder_id, "peer_id": peer_id},
        )


# "The host refused us for quota": once the friend grants more space, the fix flow backs the
# folder up again.
quota_refused = _PairIssue("quota", "quota_exceeded")
# "This sync would change most files": the fix flow sends it (once, the guard lifted) or
# leaves it held.
mass_change = _PairIssue("mass_change", "mass_change")


def trash_fills_quota(
    hass: HomeAssistant, peer_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or clear) "our space at a friend is full, and much of it is trash".

    The owner's side: the host refused for quota while old versions (a mass change sent
    anyway, a big reorganisation) fill what it grants us, until its retention expires.
    Only the friend can help sooner (more space for a while): the text says so.
    """
    _raise_or_clear(
        hass,
        f"trash_fills_quota_{peer_id}",
        "trash_fills_quota",
        placeholders,
        since_first=True,
    )


def hosted_trash_full(
    hass: HomeAssistant, peer_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or clear) "a friend's space here is full, and much of it is trash".

    The host's side: the friend's backups to us wait until the trash empties, unless we
    grant them more space for a while.
    """
    _raise_or_clear(
        hass,
        f"hosted_trash_full_{peer_id}",
        "hosted_trash_full",
        placeholders,
        since_first=True,
        severity=ir.IssueSeverity.WARNING,
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


def plain_copies(
    hass: HomeAssistant, entry_id: str, folder_id: str, placeholders: dict[str, str] | None
) -> None:
    """Raise (or, with ``placeholders`` None, clear) "friends can read this folder's copies".

    A folder set up plain (before encryption existed, or unticked). Fixable: the fix flow
    sends every copy again encrypted; the plain one then goes to the friend's trash.
    """
    _raise_or_clear(
        hass,
        f"convert_plain_{folder_id}",
        "plain_copies",
        placeholders,
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id, "folder_id": folder_id},
    )


def verify_damage(
    hass: HomeAssistant,
    entry_id: str,
    folder_id: str,
    peer_id: str,
    placeholders: dict[str, str],
) -> None:
    """A verify found the friend's copy damaged (what, and how much the repair re-sent).

    Fixable: the fix flow only acknowledges it (the repair already ran; a disk that keeps
    damaging what it stores is the friend's to replace).
    """
    _create(
        hass,
        f"verify_damage_{folder_id}_{peer_id}",
        "verify_damage",
        placeholders,
        severity=ir.IssueSeverity.WARNING,
        fixable=True,
        data={"entry_id": entry_id, "folder_id": folder_id, "peer_id": peer_id},
    )


def clear_verify_damage(hass: HomeAssistant, folder_id: str, peer_id: str) -> None:
    """The user took note of the damage a verify found."""
    _delete(hass, f"verify_damage_{folder_id}_{peer_id}")


def clear_stale_folder_issues(hass: HomeAssistant, entry_id: str, keep: set[str]) -> None:
    """Forget the plain-copy and verify issues of folders (or pairs) that are gone.

    ``keep`` holds the issue ids that still stand for something configured.
    """
    registry = ir.async_get(hass)
    for (domain, issue_id), issue in list(registry.issues.items()):
        if (
            domain == DOMAIN
            and issue_id.startswith(("convert_plain_", "verify_damage_"))
            and (issue.data or {}).get("entry_id") == entry_id
            and issue_id not in keep
        ):
            _delete(hass, issue_id)


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
