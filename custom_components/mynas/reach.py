"""Can friends reach this node? The check, its repair issue, UPnP, and each peer's addresses.

Thin: the engine does the work (``ThreadedNode.check_reachability``: each friend dials back
our announced addresses; ``upnp_state``; ``peer_addresses``); this keeps the latest of each
for the entities (a coordinator fed by the engine's events, no polling) and turns a check
that finds us unreachable into a repair issue that says what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator

from .const import CONF_NODE_NAME, CONF_PORT, DOMAIN, LOGGER
from .coordinator import MyNasConfigEntry
from .engine import ThreadedNode

# Causes (the engine's ``reachability.Cause``) that get a repair issue, each its own text.
ISSUE_CAUSES = ("port_closed", "other_host", "no_inbound", "no_address")
# "not_checked": no check yet, or no friend could be asked (the engine's "unknown", which
# Home Assistant would show as its own "Unknown").
CAUSES = ("reachable", *ISSUE_CAUSES, "not_checked")
UPNP_STATES = ("off", "pending", "mapped", "refused", "no_router")


@dataclass(slots=True)
class ReachData:
    """The last reachability check, the UPnP mapping, and each peer's addresses."""

    report: dict[str, Any] | None = None
    upnp: dict[str, Any] | None = None
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)


class ReachCoordinator(DataUpdateCoordinator[ReachData]):
    """Follows the engine's reachability events; ``async_check`` runs a check."""

    config_entry: MyNasConfigEntry

    def __init__(self, hass: HomeAssistant, entry: MyNasConfigEntry, node: ThreadedNode) -> None:
        """Follow ``node``; nothing is polled."""
        super().__init__(hass, LOGGER, config_entry=entry, name=f"{DOMAIN} reachability")
        self._node = node

    async def _async_update_data(self) -> ReachData:
        data = self.data or ReachData()
        peers = {peer_id: await self._node.peer_addresses(peer_id) for peer_id in self._node.peers}
        return ReachData(data.report, await self._node.upnp_state(), peers)

    async def async_check(self) -> dict[str, Any]:
        """Ask every friend to dial our addresses back; return what they found."""
        report = (await self._node.check_reachability()).as_dict()
        self.apply_report(report)
        return report

    @callback
    def apply_report(self, report: dict[str, Any]) -> None:
        """A check finished: show it, and raise or clear its repair issue."""
        data = self.data or ReachData()
        self.async_set_updated_data(ReachData(report, data.upnp, data.peers))
        entry = self.config_entry
        reachability_issue(
            self.hass,
            entry.entry_id,
            entry.data[CONF_NODE_NAME],
            int(entry.data[CONF_PORT]),
            report,
        )

    @callback
    def on_event(self, kind: str, details: dict[str, Any]) -> None:
        """One of the engine's events (see ``hass_entry``)."""
        data = self.data or ReachData()
        if kind == "reachability":
            self.apply_report(details)
        elif kind == "upnp":
            self.async_set_updated_data(ReachData(data.report, details, data.peers))
        elif kind == "peer_addresses":
            peer_id = str(details.get("peer_id"))
            self.config_entry.async_create_background_task(
                self.hass, self._refresh_peer(peer_id), f"{DOMAIN} addresses of {peer_id}"
            )

    async def _refresh_peer(self, peer_id: str) -> None:
        if peer_id not in self._node.peers:
            return
        view = await self._node.peer_addresses(peer_id)
        data = self.data or ReachData()
        self.async_set_updated_data(
            ReachData(data.report, data.upnp, {**data.peers, peer_id: view})
        )


def reachability_issue(
    hass: HomeAssistant, entry_id: str, node: str, port: int, report: dict[str, Any]
) -> None:
    """Raise the issue that says why friends cannot reach us (or clear it)."""
    issue_id = f"reachability_{entry_id}"
    cause = str(report.get("cause"))
    if cause not in ISSUE_CAUSES:
        if cause == "reachable":
            ir.async_delete_issue(hass, DOMAIN, issue_id)
        return
    addresses = report.get("addresses") or []
    seen_from = report.get("seen_from") or []
    answered_by = report.get("answered_by") or []
    ir.async_create_issue(
        hass,
        DOMAIN,
        issue_id,
        is_fixable=False,
        is_persistent=False,
        severity=ir.IssueSeverity.WARNING,
        translation_key=f"reachability_{cause}",
        translation_placeholders={
            "node": node,
            "port": str(report.get("port") or port),
            "lan_address": str(report.get("lan_address") or "this machine's LAN address"),
            "public": ", ".join(seen_from or addresses) or "your public address",
            "answered_by": ", ".join(answered_by) or "-",
        },
    )
