"""Fix flows: trust a peer's new key (only once confirmed), settle a removed peer's data."""

from __future__ import annotations

from typing import Any

from homeassistant.components.repairs import RepairsFlow, RepairsFlowResult
from homeassistant.core import HomeAssistant
from homeassistant.helpers.selector import BooleanSelector
import probatio as vol

from . import issues
from .const import CONF_PUBLIC_KEY, DOMAIN
from .coordinator import MyNasConfigEntry
from .engine.identity import fingerprint, parse_public_key, public_key_line
from .orphans import CONF_KEPT_DATA

CONF_CONFIRM = "confirm"
CONF_DELETE = "delete"


def _entry(hass: HomeAssistant, entry_id: str) -> MyNasConfigEntry | None:
    entry = hass.config_entries.async_get_entry(entry_id)
    return entry if entry is not None and entry.domain == DOMAIN else None


class KeyChangedFlow(RepairsFlow):
    """Shows the pinned and the presented fingerprint; pins the new key only if confirmed."""

    def __init__(self, entry_id: str, peer_id: str, new_key: str) -> None:
        """Fix the key of ``peer_id`` in node ``entry_id``."""
        self._entry_id = entry_id
        self._peer_id = peer_id
        self._new_key = new_key

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Ask for an explicit confirmation."""
        entry = _entry(self.hass, self._entry_id)
        subentry = entry.subentries.get(self._peer_id) if entry else None
        if entry is None or subentry is None:
            return self.async_abort(reason="peer_gone")
        errors: dict[str, str] = {}
        if user_input is not None:
            if not user_input.get(CONF_CONFIRM):
                errors[CONF_CONFIRM] = "confirm_required"
            else:
                line = public_key_line(parse_public_key(self._new_key))
                self.hass.config_entries.async_update_subentry(
                    entry, subentry, data={**subentry.data, CONF_PUBLIC_KEY: line}
                )
                issues.clear_key_changed(self.hass, self._peer_id)
                return self.async_create_entry(data={})
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema({vol.Required(CONF_CONFIRM, default=False): BooleanSelector()}),
            errors=errors,
            description_placeholders={
                "peer": subentry.title,
                "old": fingerprint(subentry.data[CONF_PUBLIC_KEY]),
                "new": fingerprint(self._new_key),
            },
        )


class OrphanedDataFlow(RepairsFlow):
    """Keep or delete what a removed peer stored here."""

    def __init__(self, entry_id: str, jail: str) -> None:
        """Settle the data of ``jail`` in node ``entry_id``."""
        self._entry_id = entry_id
        self._jail = jail

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Ask: delete (trash included), or keep."""
        entry = _entry(self.hass, self._entry_id)
        if entry is None or not hasattr(entry, "runtime_data"):
            return self.async_abort(reason="node_not_loaded")
        if user_input is not None:
            if user_input[CONF_DELETE]:
                runtime = entry.runtime_data
                await runtime.engine.run(runtime.node.remove_peer_data(self._jail))
            else:
                kept = [*entry.options.get(CONF_KEPT_DATA, []), self._jail]
                self.hass.config_entries.async_update_entry(
                    entry, options={**entry.options, CONF_KEPT_DATA: sorted(set(kept))}
                )
            issues.clear_orphaned_data(self.hass, self._entry_id, self._jail)
            return self.async_create_entry(data={})
        return self.async_show_form(
            step_id="init",
            data_schema=vol.Schema({vol.Required(CONF_DELETE, default=False): BooleanSelector()}),
            description_placeholders={"jail": self._jail},
        )


async def async_create_fix_flow(
    hass: HomeAssistant, issue_id: str, data: dict[str, str | int | float | None] | None
) -> RepairsFlow:
    """Create the fix flow of a fixable issue."""
    data = data or {}
    if issue_id.startswith("key_changed_"):
        return KeyChangedFlow(str(data["entry_id"]), str(data["peer_id"]), str(data["new_key"]))
    return OrphanedDataFlow(str(data["entry_id"]), str(data["jail"]))
