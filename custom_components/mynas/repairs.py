"""Fix flows: trust a peer's new key (only once confirmed), settle a removed peer's data."""

from __future__ import annotations

from typing import Any

from homeassistant.components.repairs import RepairsFlow, RepairsFlowResult
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.selector import BooleanSelector
import probatio as vol

from . import issues
from .const import CONF_PUBLIC_KEY, DOMAIN
from .coordinator import MyNasConfigEntry
from .engine import canonical_key, fingerprint
from .orphans import CONF_KEPT_DATA

CONF_CONFIRM = "confirm"


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
                line = canonical_key(self._new_key)
                new_id = fingerprint(line)
                if any(
                    other.unique_id == new_id
                    for other in entry.subentries.values()
                    if other.subentry_id != self._peer_id
                ):
                    # Another peer is paired with that key: two peers cannot share one.
                    return self.async_abort(reason="key_in_use")
                # The peer is known by its key: its unique id (the fingerprint) follows it,
                # so pasting the friend's new invite code is then seen as a duplicate.
                self.hass.config_entries.async_update_subentry(
                    entry, subentry, data={**subentry.data, CONF_PUBLIC_KEY: line}, unique_id=new_id
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
    """Keep or delete what a removed peer stored here (deleting asks once more)."""

    def __init__(self, entry_id: str, jail: str) -> None:
        """Settle the data of ``jail`` in node ``entry_id``."""
        self._entry_id = entry_id
        self._jail = jail

    def _loaded_entry(self) -> MyNasConfigEntry | None:
        entry = _entry(self.hass, self._entry_id)
        return entry if entry is not None and entry.state is ConfigEntryState.LOADED else None

    def _placeholders(self) -> dict[str, str]:
        issue = ir.async_get(self.hass).async_get_issue(DOMAIN, self.issue_id)
        size = (issue.translation_placeholders or {}).get("size") if issue else None
        return {"jail": self._jail, "size": size or "?"}

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Ask: keep the data, or delete it (trash included)."""
        if self._loaded_entry() is None:
            return self.async_abort(reason="node_not_loaded")
        return self.async_show_menu(
            step_id="init",
            menu_options=["keep", "delete"],
            description_placeholders=self._placeholders(),
        )

    async def async_step_keep(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Keep the data; the question is not asked again."""
        entry = self._loaded_entry()
        if entry is None:
            return self.async_abort(reason="node_not_loaded")
        kept = [*entry.options.get(CONF_KEPT_DATA, []), self._jail]
        self.hass.config_entries.async_update_entry(
            entry, options={**entry.options, CONF_KEPT_DATA: sorted(set(kept))}
        )
        issues.clear_orphaned_data(self.hass, self._entry_id, self._jail)
        return self.async_create_entry(data={})

    async def async_step_delete(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Delete the data, once confirmed: it cannot be undone."""
        entry = self._loaded_entry()
        if entry is None:
            return self.async_abort(reason="node_not_loaded")
        if user_input is None:
            return self.async_show_form(
                step_id="delete",
                data_schema=vol.Schema({}),
                description_placeholders=self._placeholders(),
            )
        runtime = entry.runtime_data
        await runtime.node.remove_peer_data(self._jail)
        issues.clear_orphaned_data(self.hass, self._entry_id, self._jail)
        return self.async_create_entry(data={})


async def async_create_fix_flow(
    hass: HomeAssistant, issue_id: str, data: dict[str, str | int | float | None] | None
) -> RepairsFlow:
    """Create the fix flow of a fixable issue."""
    data = data or {}
    if issue_id.startswith("key_changed_"):
        return KeyChangedFlow(str(data["entry_id"]), str(data["peer_id"]), str(data["new_key"]))
    return OrphanedDataFlow(str(data["entry_id"]), str(data["jail"]))
