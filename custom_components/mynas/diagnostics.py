"""Diagnostics: configuration and live state, with keys, addresses and paths redacted."""

from __future__ import annotations

from typing import Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant

from . import const
from .coordinator import MyNasConfigEntry

TO_REDACT = {
    const.CONF_ADDRESSES,
    const.CONF_EXCLUDE,
    const.CONF_KEY_FILE,
    const.CONF_NODE_PUBLIC_KEY,
    const.CONF_PATH,
    const.CONF_PUBLIC_KEY,
    const.CONF_RECOVERY_CODE,
    const.CONF_STORAGE_ROOT,
    "presented_key",
    "error",
    "last_error",
}


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: MyNasConfigEntry
) -> dict[str, Any]:
    """Return what helps to debug a node, and nothing that identifies or exposes it."""
    config = {
        "entry": {"data": dict(entry.data), "options": dict(entry.options)},
        "subentries": [
            {"type": sub.subentry_type, "title": sub.title, "data": dict(sub.data)}
            for sub in entry.subentries.values()
        ],
    }
    if entry.state is not ConfigEntryState.LOADED:
        # Not running (disk missing, port taken...): the configuration only.
        return async_redact_data({**config, "state": entry.state.value}, TO_REDACT)
    runtime = entry.runtime_data
    manager = runtime.manager
    pairs = {
        f"{manager.folders[f].config.name} -> {manager.peers[p].name}": {
            "state": status.state.value,
            "last_success": status.last_success.isoformat() if status.last_success else None,
            "last_attempt": status.last_attempt.isoformat() if status.last_attempt else None,
            "running": manager.running((f, p)),
            "failures": status.failures,
            "last_files_sent": status.last_files_sent,
            "last_bytes_sent": status.last_bytes_sent,
            "last_duration": status.last_duration,
            "last_error": status.last_error,
            "overdue": manager.is_overdue((f, p)),
            "encryption": status.encryption.value,
            "last_verify": status.last_verify.isoformat() if status.last_verify else None,
            "last_verify_damaged": status.last_verify_damaged,
            "next_verify": status.next_verify.isoformat() if status.next_verify else None,
        }
        for (f, p), status in manager.data.pairs.items()
        if f in manager.folders and p in manager.peers
    }
    peers = {
        manager.peers[peer_id].name: {
            "reachability": status.reachability.value if status.reachability else None,
            "last_seen": status.last_seen.isoformat() if status.last_seen else None,
            "down_since": status.down_since.isoformat() if status.down_since else None,
            "used_there": status.used_there,
            "quota_there": status.quota_there,
            "error": status.error,
            "presented_key": status.presented_key,
        }
        for peer_id, status in manager.data.peers.items()
        if peer_id in manager.peers
    }
    node_data = runtime.node_data.data
    return async_redact_data(
        {
            **config,
            "state": entry.state.value,
            "storage_ok": manager.storage_ok,
            "disk": {
                "total": node_data.disk.total,
                "used": node_data.disk.used,
                "free": node_data.disk.free,
            },
            "hosted": {
                manager.peers[peer_id].name: {"used": usage.used, "quota": usage.quota}
                for peer_id, usage in node_data.hosted.items()
                if peer_id in manager.peers
            },
            "server": await runtime.node.snapshot(),
            "pairs": pairs,
            "peers": peers,
        },
        TO_REDACT,
    )
