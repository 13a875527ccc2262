"""Fix flows: the one thing to do about an issue, from its dialog.

Check the backup disk again; try a silent peer again or change its address; back a folder
up again (once a friend granted more space, or the cause of an overdue backup is dealt
with); trust a peer's new key (only once confirmed); settle a removed peer's data; encrypt
a plain folder's copies (a conversion on each of its peers, shown as progress); take note
of the damage a verify found and repaired; keep the recovery kit outside the house (only
once confirmed).
"""

from __future__ import annotations

import asyncio
from typing import Any

from homeassistant.components.repairs import RepairsFlow, RepairsFlowResult
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.selector import BooleanSelector, TextSelector, TextSelectorConfig
import probatio as vol

from . import issues, texts
from .const import CONF_ADDRESSES, CONF_KIT_SAVED, CONF_NODE_NAME, CONF_PUBLIC_KEY, DOMAIN
from .coordinator import MyNasConfigEntry
from .engine import KeyFileError, canonical_key, fingerprint
from .hass_entry import key_path
from .models import SyncKind
from .orphans import CONF_KEPT_DATA
from .peer_flow import check_addresses, peer_port
from .recovery_kit import kit_of
from .sync_manager import SyncManager

CONF_CONFIRM = "confirm"
CONF_STORED = "stored"


def _entry(hass: HomeAssistant, entry_id: str) -> MyNasConfigEntry | None:
    entry = hass.config_entries.async_get_entry(entry_id)
    return entry if entry is not None and entry.domain == DOMAIN else None


def _issue_placeholders(hass: HomeAssistant, issue_id: str) -> dict[str, str]:
    """What the issue's text says (its fix flow's texts say the same)."""
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id)
    return dict(issue.translation_placeholders or {}) if issue else {}


def _loaded(entry: MyNasConfigEntry | None) -> MyNasConfigEntry | None:
    return entry if entry is not None and entry.state is ConfigEntryState.LOADED else None


class _StartsAtConfirm(RepairsFlow):
    """A fix flow whose first step is ``confirm`` (Home Assistant hands ``init`` the issue id)."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Start with the text: ``confirm``."""
        return await self.async_step_confirm()

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Say what to do; on submit, do it (each flow its own)."""
        raise NotImplementedError

    def _confirm_form(
        self,
        placeholders: dict[str, str],
        *,
        ticked: str | None = None,
        errors: dict[str, str] | None = None,
    ) -> RepairsFlowResult:
        """The ``confirm`` step: the text, and the box ``ticked`` names if one must be ticked."""
        schema = {vol.Required(ticked, default=False): BooleanSelector()} if ticked else {}
        return self.async_show_form(
            step_id="confirm",
            data_schema=vol.Schema(schema),
            errors=errors,
            description_placeholders=placeholders,
        )


class _IssueFlow(_StartsAtConfirm):
    """A fix flow of node ``entry_id``'s issue: its texts take the issue's placeholders."""

    def __init__(self, entry_id: str) -> None:
        """Fix an issue of node ``entry_id``."""
        self._entry_id = entry_id

    def _issue_open(self) -> bool:
        return ir.async_get(self.hass).async_get_issue(DOMAIN, self.issue_id) is not None

    def _placeholders(self) -> dict[str, str]:
        return _issue_placeholders(self.hass, self.issue_id)

    def _manager(self) -> SyncManager | None:
        """The node's sync manager, if the node is loaded (a fix needs it running)."""
        entry = _loaded(_entry(self.hass, self._entry_id))
        return None if entry is None else entry.runtime_data.manager

    def _offer(self, *options: str) -> RepairsFlowResult:
        """The first step as a menu of ``options``, with the issue's texts."""
        return self.async_show_menu(
            step_id="init",
            menu_options=list(options),
            description_placeholders=self._placeholders(),
        )


class StorageFlow(_IssueFlow):
    """The backup disk is missing or another one is mounted: check it again now."""

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Say what to do; on submit, look at the disk again."""
        entry = _entry(self.hass, self._entry_id)
        if entry is None:
            return self.async_abort(reason="node_gone")
        errors: dict[str, str] = {}
        placeholders = self._placeholders()  # before the check may clear the issue
        if user_input is not None:
            if (loaded := _loaded(entry)) is not None:
                await loaded.runtime_data.node_data.async_refresh()
            else:  # waiting for its disk to start: start it now
                await self.hass.config_entries.async_reload(entry.entry_id)
            if not self._issue_open():
                return self.async_create_entry(data={})
            errors["base"] = "not_back"
        return self._confirm_form(placeholders, errors=errors)


class UnreachableFlow(_IssueFlow):
    """A peer does not answer: try it again now, or change its address."""

    def __init__(self, entry_id: str, peer_id: str) -> None:
        """Fix the silence of ``peer_id`` in node ``entry_id``."""
        super().__init__(entry_id)
        self._peer_id = peer_id

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Offer the two things there are to do."""
        return self._offer("retry", "address")

    async def async_step_retry(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Test the connection now: done once the peer answers."""
        manager = self._manager()
        if manager is None:
            return self.async_abort(reason="node_not_loaded")
        if self._peer_id not in manager.peers:
            return self.async_abort(reason="peer_gone")
        placeholders = self._placeholders()
        await manager.probe(self._peer_id)
        if not self._issue_open():
            return self.async_create_entry(data={})
        status = manager.data.peers.get(self._peer_id)
        return self.async_show_form(
            step_id="retry",
            data_schema=vol.Schema({}),
            description_placeholders={
                **placeholders,
                "error": (status.error if status else None) or texts.NONE,
            },
        )

    async def async_step_address(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Change the peer's addresses (the node restarts with them and tests at once)."""
        entry = _entry(self.hass, self._entry_id)
        subentry = entry.subentries.get(self._peer_id) if entry else None
        if entry is None or subentry is None:
            return self.async_abort(reason="peer_gone")
        port = peer_port(list(subentry.data[CONF_ADDRESSES]))
        errors: dict[str, str] = {}
        typed = "\n".join(subentry.data[CONF_ADDRESSES])
        if user_input is not None:
            typed = user_input[CONF_ADDRESSES]
            addresses, problem = check_addresses(typed, port)
            if problem:
                errors[CONF_ADDRESSES] = problem
            else:
                self.hass.config_entries.async_update_subentry(
                    entry, subentry, data={**subentry.data, CONF_ADDRESSES: addresses}
                )
                return self.async_create_entry(data={})
        return self.async_show_form(
            step_id="address",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_ADDRESSES, default=typed): TextSelector(
                        TextSelectorConfig(multiline=True)
                    )
                }
            ),
            errors=errors,
            description_placeholders={**self._placeholders(), "port": str(port)},
        )


class BackUpAgainFlow(_IssueFlow):
    """A folder is not (fully) copied: once the cause is dealt with, back it up now."""

    def __init__(self, entry_id: str, folder_id: str, peer_id: str | None) -> None:
        """Back ``folder_id`` up to ``peer_id`` (to all its peers when None)."""
        super().__init__(entry_id)
        self._folder_id = folder_id
        self._peer_id = peer_id

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Say what to do; on submit, start the sync (the issue comes back if it fails)."""
        manager = self._manager()
        if manager is None:
            return self.async_abort(reason="node_not_loaded")
        if user_input is not None:
            for pair in manager.pairs:
                if pair[0] == self._folder_id and self._peer_id in (None, pair[1]):
                    try:
                        manager.start(pair, SyncKind.SYNC)
                    except HomeAssistantError:  # the disk went away meanwhile: its issue says
                        return self.async_abort(reason="node_not_loaded")
            return self.async_create_entry(data={})
        return self._confirm_form(self._placeholders())


class MassChangeFlow(_IssueFlow):
    """A sync held as too large: send it now (the guard lifted once), or keep holding it."""

    def __init__(self, entry_id: str, folder_id: str, peer_id: str) -> None:
        """Decide about the held sync of ``folder_id`` to ``peer_id``."""
        super().__init__(entry_id)
        self._pair = (folder_id, peer_id)

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Say what the sync would do; offer to send it or not."""
        return self._offer("send", "not_now")

    async def async_step_send(self, user_input: dict[str, Any] | None = None) -> RepairsFlowResult:
        """Start the sync now, once, without the guard (the issue comes back if it fails)."""
        manager = self._manager()
        if manager is None:
            return self.async_abort(reason="node_not_loaded")
        if self._pair not in manager.pairs:
            return self.async_abort(reason="pair_gone")
        try:
            manager.start(self._pair, SyncKind.SYNC, guard=False)
        except HomeAssistantError:  # the disk went away meanwhile: its issue says
            return self.async_abort(reason="node_not_loaded")
        return self.async_create_entry(data={})

    async def async_step_not_now(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Keep holding: nothing is sent, and the issue stays."""
        return self.async_abort(reason="still_held", description_placeholders=self._placeholders())


class KeyChangedFlow(_StartsAtConfirm):
    """Shows the pinned and the presented fingerprint; pins the new key only if confirmed."""

    def __init__(self, entry_id: str, peer_id: str, new_key: str) -> None:
        """Fix the key of ``peer_id`` in node ``entry_id``."""
        self._entry_id = entry_id
        self._peer_id = peer_id
        self._new_key = new_key

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
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
        return self._confirm_form(
            {
                "since": texts.NONE,
                "folders": texts.NONE,
                **_issue_placeholders(self.hass, self.issue_id),
                "peer": subentry.title,
                "old": fingerprint(subentry.data[CONF_PUBLIC_KEY]),
                "new": fingerprint(self._new_key),
            },
            ticked=CONF_CONFIRM,
            errors=errors,
        )


class RecoveryKitFlow(_IssueFlow):
    """Show the recovery code and its QR code; done once the user says it is kept away."""

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Show the code; on submit, the box must be ticked (the issue stays otherwise)."""
        entry = _entry(self.hass, self._entry_id)
        if entry is None:
            return self.async_abort(reason="node_gone")
        errors: dict[str, str] = {}
        if user_input is not None:
            if user_input.get(CONF_STORED):
                # In the entry: the issue is not raised again, after a restart or a reload.
                self.hass.config_entries.async_update_entry(
                    entry, data={**entry.data, CONF_KIT_SAVED: True}
                )
                return self.async_create_entry(data={})
            errors[CONF_STORED] = "kit_not_stored"
        try:
            # Read from the key each time: the code is never stored anywhere else.
            code, qr = await self.hass.async_add_executor_job(kit_of, key_path(self.hass, entry))
        except KeyFileError:
            return self.async_abort(reason="key_unreadable")
        return self._confirm_form(
            {"node": entry.data[CONF_NODE_NAME], "code": code, "qr": qr},
            ticked=CONF_STORED,
            errors=errors,
        )


class OrphanedDataFlow(RepairsFlow):
    """Keep or delete what a removed peer stored here (deleting asks once more)."""

    def __init__(self, entry_id: str, jail: str) -> None:
        """Settle the data of ``jail`` in node ``entry_id``."""
        self._entry_id = entry_id
        self._jail = jail

    def _loaded_entry(self) -> MyNasConfigEntry | None:
        return _loaded(_entry(self.hass, self._entry_id))

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


class ConvertFlow(_IssueFlow):
    """A plain folder's copies: send each again encrypted, then the plain ones go to trash."""

    def __init__(self, entry_id: str, folder_id: str) -> None:
        """Encrypt the copies of ``folder_id`` in node ``entry_id``."""
        super().__init__(entry_id)
        self._folder_id = folder_id
        self._converting: asyncio.Task[list[Any]] | None = None
        self._shown: dict[str, str] = {}

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Say what a conversion does; on submit, start it on every peer of the folder."""
        manager = self._manager()
        if manager is None:
            return self.async_abort(reason="node_not_loaded")
        if self._folder_id not in manager.folders:
            return self.async_abort(reason="folder_gone")
        self._shown = self._placeholders()
        if user_input is None:
            return self._confirm_form(self._shown)
        pairs = [pair for pair in manager.pairs if pair[0] == self._folder_id]
        try:
            tasks = [manager.start(pair, SyncKind.CONVERT) for pair in pairs]
        except HomeAssistantError:  # the disk went away meanwhile: its issue says
            return self.async_abort(reason="node_not_loaded")
        self._converting = self.hass.async_create_task(
            _gather(tasks), name=f"mynas convert {self._folder_id}"
        )
        return await self.async_step_converting()

    async def async_step_converting(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Show progress while every copy is sent again encrypted."""
        assert self._converting is not None
        if not self._converting.done():
            return self.async_show_progress(
                step_id="converting",
                progress_action="converting",
                progress_task=self._converting,
                description_placeholders=self._shown,
            )
        return self.async_show_progress_done(next_step_id="finish")

    async def async_step_finish(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Done once every copy is encrypted and whole; else say what stopped it."""
        assert self._converting is not None
        results = self._converting.result()
        problems = [
            "cancelled"
            if isinstance(result, BaseException)
            else str(result.get("error") or "; ".join(result.get("errors") or []) or "-")
            for result in results
            if isinstance(result, BaseException) or result.get("status") != "success"
        ]
        if problems:
            # The folder stays plain and the issue stays: the next sync goes on with it.
            return self.async_abort(
                reason="convert_failed",
                description_placeholders={**self._shown, "error": problems[0]},
            )
        return self.async_create_entry(data={})


async def _gather(tasks: list[asyncio.Task[dict[str, Any]]]) -> list[Any]:
    """Every run's summary, or what it raised (a run cut short by a stop)."""
    return list(await asyncio.gather(*tasks, return_exceptions=True))


class VerifyDamageFlow(_IssueFlow):
    """A verify found damage at a friend's and repaired it: taken note of, the issue goes."""

    def __init__(self, entry_id: str, folder_id: str, peer_id: str) -> None:
        """The damage found on ``peer_id``'s copy of ``folder_id``."""
        super().__init__(entry_id)
        self._folder_id = folder_id
        self._peer_id = peer_id

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> RepairsFlowResult:
        """Say what was found and repaired; on submit, the issue goes."""
        if user_input is not None:
            issues.clear_verify_damage(self.hass, self._folder_id, self._peer_id)
            return self.async_create_entry(data={})
        return self._confirm_form(self._placeholders())


async def async_create_fix_flow(
    hass: HomeAssistant, issue_id: str, data: dict[str, str | int | float | None] | None
) -> RepairsFlow:
    """Create the fix flow of a fixable issue."""
    data = data or {}
    entry_id = str(data["entry_id"])
    if issue_id.startswith("storage_"):
        return StorageFlow(entry_id)
    if issue_id.startswith("unreachable_"):
        return UnreachableFlow(entry_id, str(data["peer_id"]))
    if issue_id.startswith("mass_change_"):
        return MassChangeFlow(entry_id, str(data["folder_id"]), str(data["peer_id"]))
    if issue_id.startswith("quota_"):
        return BackUpAgainFlow(entry_id, str(data["folder_id"]), str(data["peer_id"]))
    if issue_id.startswith("overdue_"):
        return BackUpAgainFlow(entry_id, str(data["folder_id"]), None)
    if issue_id.startswith("convert_plain_"):
        return ConvertFlow(entry_id, str(data["folder_id"]))
    if issue_id.startswith("verify_damage_"):
        return VerifyDamageFlow(entry_id, str(data["folder_id"]), str(data["peer_id"]))
    if issue_id.startswith("recovery_kit_"):
        return RecoveryKitFlow(entry_id)
    if issue_id.startswith("key_changed_"):
        return KeyChangedFlow(entry_id, str(data["peer_id"]), str(data["new_key"]))
    return OrphanedDataFlow(entry_id, str(data["jail"]))
