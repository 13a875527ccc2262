"""How MyNAS writes times, sizes and lists in the texts people read (issues, responses).

Digits and unit symbols only, so that a value reads the same in every language of the
sentence around it.
"""

from __future__ import annotations

from datetime import datetime

from homeassistant.util import dt as dt_util

# Nothing in a list (a peer that none of our folders is copied to).
NONE = "-"

_UNITS = ("kB", "MB", "GB", "TB", "PB")


def since(when: datetime | None) -> str:
    """``2026-05-04 14:35``: when something began, in Home Assistant's time zone (now if None)."""
    return dt_util.as_local(when or dt_util.utcnow()).strftime("%Y-%m-%d %H:%M")


def names(items: list[str]) -> str:
    """Folder or peer names for a text: ``Documents, Photos`` (``-`` for none)."""
    return ", ".join(sorted(items, key=str.casefold)) or NONE


def size(count: int) -> str:
    """``5.2 MB``: decimal units, as Home Assistant shows data sizes and as quotas are granted."""
    if abs(count) < 1000:
        return f"{count} B"
    value = float(count)
    for unit in _UNITS:
        value /= 1000
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
