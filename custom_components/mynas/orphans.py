"""Data a removed peer left on our disk: found at start, settled by the user (keep/delete).

A directory counts as a peer's jail only if MyNAS keeps state for it
(``.mynas/peers/<name>/``): a storage root may share its disk with the household's own
folders, and those must never be offered for deletion.
"""

from __future__ import annotations

from homeassistant.core import HomeAssistant

from . import issues, texts
from .const import CONF_STORAGE_ROOT
from .coordinator import MyNasConfigEntry
from .engine import jails_on_disk

CONF_KEPT_DATA = "kept_data"


async def async_check_orphans(hass: HomeAssistant, entry: MyNasConfigEntry) -> None:
    """Raise a keep-or-delete repair issue for each jail no configured peer owns."""
    configured = {peer.jail for peer in entry.runtime_data.node.peers.values()}
    kept = set(entry.options.get(CONF_KEPT_DATA, []))
    on_disk = await hass.async_add_executor_job(jails_on_disk, entry.data[CONF_STORAGE_ROOT])
    for jail, used in on_disk.items():
        if jail in configured or jail in kept:
            issues.clear_orphaned_data(hass, entry.entry_id, jail)
        else:
            issues.orphaned_data(hass, entry.entry_id, jail, texts.size(used))
