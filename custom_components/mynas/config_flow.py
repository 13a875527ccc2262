"""Config flow for MyNAS: set up this node; its options (invite code, addresses, alerts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homeassistant.config_entries import (
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryFlow,
    OptionsFlowWithReload,
)
from homeassistant.core import callback
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
)
import probatio as vol

from . import our_invite
from .const import (
    CONF_ADDRESSES,
    CONF_ALLOW_SAME_DISK,
    CONF_DOWNLOAD_LIMIT,
    CONF_INBOUND,
    CONF_KEY_FILE,
    CONF_MASS_CHANGE,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_OVERDUE_HOURS,
    CONF_PORT,
    CONF_RECOVERY_CODE,
    CONF_RESTORE_KEY,
    CONF_STORAGE_ROOT,
    CONF_UNREACHABLE_HOURS,
    CONF_UPLOAD_LIMIT,
    CONF_UPNP,
    CONF_VERIFY_DAYS,
    DEFAULT_MASS_CHANGE,
    DEFAULT_OVERDUE_HOURS,
    DEFAULT_PORT,
    DEFAULT_UNREACHABLE_HOURS,
    DEFAULT_UPNP,
    DEFAULT_VERIFY_DAYS,
    DOMAIN,
    INBOUND_CHOICES,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)
from .coordinator import MyNasConfigEntry
from .engine import (
    MAX_ADDRESSES,
    MAX_NODE_NAME_LENGTH,
    Identity,
    KeyFileError,
    RecoveryCodeError,
    StorageRootError,
    check_new_root,
    claim_root,
    copy_key,
    filesystem_identity,
    identity_from_recovery_code,
    install_identity,
    load_identity,
    load_or_create_identity,
)
from .folder_flow import FolderSubentryFlow
from .peer_flow import PeerSubentryFlow
from .restore_flow import RestoreSteps

CONF_INVITE_CODE = "invite_code"

PORT_SELECTOR = vol.All(
    NumberSelector(NumberSelectorConfig(min=1, max=65535, step=1, mode=NumberSelectorMode.BOX)),
    vol.Coerce(int),
)


def _user_schema(defaults: dict[str, Any]) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_NODE_NAME, default=defaults.get(CONF_NODE_NAME, "")): TextSelector(),
            vol.Required(
                CONF_STORAGE_ROOT, default=defaults.get(CONF_STORAGE_ROOT, "")
            ): TextSelector(),
            vol.Required(CONF_PORT, default=defaults.get(CONF_PORT, DEFAULT_PORT)): PORT_SELECTOR,
            vol.Required(
                CONF_ALLOW_SAME_DISK, default=defaults.get(CONF_ALLOW_SAME_DISK, False)
            ): BooleanSelector(),
            vol.Required(
                CONF_UPNP, default=defaults.get(CONF_UPNP, DEFAULT_UPNP)
            ): BooleanSelector(),
            vol.Optional(
                CONF_RESTORE_KEY,
                description={"suggested_value": defaults.get(CONF_RESTORE_KEY)},
            ): TextSelector(),
            # Shown again with an error, so that a typo can be corrected; never stored.
            vol.Optional(
                CONF_RECOVERY_CODE,
                description={"suggested_value": defaults.get(CONF_RECOVERY_CODE)},
            ): TextSelector(),
        }
    )


def _reconfigure_schema(defaults: dict[str, Any]) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_NODE_NAME, default=defaults[CONF_NODE_NAME]): TextSelector(),
            vol.Required(CONF_PORT, default=defaults[CONF_PORT]): PORT_SELECTOR,
        }
    )


def _validate_root(root: str, config_dir: str, allow_same_disk: bool) -> tuple[str, str]:
    """Validate a storage root (blocking); return its resolved path and its unique id."""
    path = check_new_root(root, config_dir, allow_same_disk=allow_same_disk)
    return str(path), filesystem_identity(path)


def _check_name(name: str) -> dict[str, str]:
    """Errors for a node name: it is needed, and must fit in an invite code."""
    errors: dict[str, str] = {}
    if not name:
        errors[CONF_NODE_NAME] = "name_required"
    elif len(name) > MAX_NODE_NAME_LENGTH or not name.isprintable():
        errors[CONF_NODE_NAME] = "bad_name"
    return errors


def _install_key(key_file: Path, restore_from: str | None, recovered: Identity | None) -> str:
    """Create the node's key, or put a previous node's key into place (blocking).

    The previous key comes from its saved file (``restore_from``) or from its recovery code
    (``recovered``). Returns the public key line. Reusing a previous node's key is how a
    household gets its replicas back after losing a node: friends still trust that key, and
    the data keys of encrypted replicas derive from it.
    """
    if restore_from:
        copy_key(restore_from, key_file)
    elif recovered is not None:
        install_identity(recovered, key_file)
    node, _ = load_or_create_identity(key_file)
    return node.public_line


class MyNasConfigFlow(ConfigFlow, domain=DOMAIN):
    """Set up this Home Assistant as a MyNAS node."""

    VERSION = 1
    MINOR_VERSION = 1

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: MyNasConfigEntry) -> MyNasOptionsFlow:
        """Options: the invite code, the addresses in it, the overdue threshold."""
        return MyNasOptionsFlow()

    @classmethod
    @callback
    def async_get_supported_subentry_types(
        cls, config_entry: MyNasConfigEntry
    ) -> dict[str, type[ConfigSubentryFlow]]:
        """Peers (paired by invite code) and folders (protected on those peers)."""
        return {SUBENTRY_PEER: PeerSubentryFlow, SUBENTRY_FOLDER: FolderSubentryFlow}

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the node's name, its storage root and its port."""
        errors: dict[str, str] = {}
        if user_input is not None:
            name = user_input[CONF_NODE_NAME].strip()
            restore_key = (user_input.get(CONF_RESTORE_KEY) or "").strip() or None
            code = (user_input.get(CONF_RECOVERY_CODE) or "").strip()
            recovered: Identity | None = None
            errors.update(_check_name(name))
            if restore_key and code:
                errors["base"] = "key_and_code"
            elif restore_key:
                try:
                    # Read the old key before anything is written to the disk.
                    await self.hass.async_add_executor_job(load_identity, restore_key)
                except KeyFileError:
                    errors[CONF_RESTORE_KEY] = "bad_key"
            elif code:
                try:
                    recovered = await self.hass.async_add_executor_job(
                        identity_from_recovery_code, code
                    )
                except RecoveryCodeError:  # its message names a character of the code: not logged
                    errors[CONF_RECOVERY_CODE] = "bad_recovery_code"
            if not errors:
                try:
                    path, unique_id = await self.hass.async_add_executor_job(
                        _validate_root,
                        user_input[CONF_STORAGE_ROOT].strip(),
                        self.hass.config.config_dir,
                        user_input[CONF_ALLOW_SAME_DISK],
                    )
                except StorageRootError as err:
                    errors[CONF_STORAGE_ROOT] = err.problem.value
                else:
                    # One node per Home Assistant (single_config_entry); its id is its disk's.
                    await self.async_set_unique_id(unique_id)
                    marker = await self.hass.async_add_executor_job(claim_root, path, name)
                    key_file = Path(self.hass.config.path(DOMAIN, f"{marker.node_id}.key"))
                    try:
                        public_key = await self.hass.async_add_executor_job(
                            _install_key, key_file, restore_key, recovered
                        )
                    except KeyFileError:
                        # Differs from the key this node already has: never written over.
                        if restore_key:
                            errors[CONF_RESTORE_KEY] = "bad_key"
                        elif recovered is not None:
                            errors[CONF_RECOVERY_CODE] = "other_key_here"
                        else:
                            errors["base"] = "node_key_unreadable"
                    else:
                        return self.async_create_entry(
                            title=name,
                            data={
                                CONF_NODE_NAME: name,
                                CONF_STORAGE_ROOT: path,
                                CONF_PORT: user_input[CONF_PORT],
                                CONF_NODE_ID: marker.node_id,
                                CONF_KEY_FILE: str(key_file),
                                CONF_NODE_PUBLIC_KEY: public_key,
                            },
                            options={CONF_UPNP: user_input[CONF_UPNP]},
                        )
        return self.async_show_form(
            step_id="user",
            data_schema=_user_schema(user_input or {}),
            errors=errors,
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change the node's name or port; the storage root stays (it is the entry's identity)."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            name = user_input[CONF_NODE_NAME].strip()
            errors.update(_check_name(name))
            if not errors:
                return self.async_update_reload_and_abort(
                    entry,
                    title=name,
                    data_updates={CONF_NODE_NAME: name, CONF_PORT: user_input[CONF_PORT]},
                )
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=_reconfigure_schema(user_input or dict(entry.data)),
            errors=errors,
        )


class MyNasOptionsFlow(RestoreSteps, OptionsFlowWithReload):
    """Show our invite code; set the addresses it carries, the alerts, the bandwidth limits.

    And restore what a friend keeps for us (``restore_flow``): it changes no option.
    """

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Offer the five things there are to do."""
        return self.async_show_menu(
            step_id="init",
            menu_options=["invite", "settings", "bandwidth", "verify", "restore"],
        )

    async def async_step_invite(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Show the code to send to a friend (nothing to change here)."""
        entry = self.config_entry
        code = our_invite.our_code(self.hass, dict(entry.data), dict(entry.options))
        if user_input is not None:
            return self.async_create_entry(data=dict(entry.options))
        return self.async_show_form(
            step_id="invite",
            data_schema=vol.Schema(
                {
                    vol.Optional(CONF_INVITE_CODE, default=code): TextSelector(
                        TextSelectorConfig(multiline=True, read_only=True)
                    )
                }
            ),
            description_placeholders={"code": code},
        )

    async def async_step_settings(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Set the addresses friends use to reach us, and when to alert."""
        entry = self.config_entry
        errors: dict[str, str] = {}
        if user_input is not None:
            try:
                addresses = our_invite.canonical_addresses(
                    user_input.get(CONF_ADDRESSES), int(entry.data[CONF_PORT])
                )
            except ValueError:
                errors[CONF_ADDRESSES] = "bad_address"
            else:
                if len(addresses) > MAX_ADDRESSES:
                    errors[CONF_ADDRESSES] = "too_many_addresses"
                else:
                    return self.async_create_entry(
                        data={
                            **entry.options,
                            CONF_ADDRESSES: addresses,
                            CONF_OVERDUE_HOURS: user_input[CONF_OVERDUE_HOURS],
                            CONF_UNREACHABLE_HOURS: user_input[CONF_UNREACHABLE_HOURS],
                            CONF_UPNP: user_input[CONF_UPNP],
                            CONF_INBOUND: user_input[CONF_INBOUND],
                            CONF_MASS_CHANGE: user_input[CONF_MASS_CHANGE],
                        }
                    )
        if user_input is None:
            typed = "\n".join(entry.options.get(CONF_ADDRESSES, []))
            hours = entry.options.get(CONF_OVERDUE_HOURS, DEFAULT_OVERDUE_HOURS)
            silent = entry.options.get(CONF_UNREACHABLE_HOURS, DEFAULT_UNREACHABLE_HOURS)
            upnp = entry.options.get(CONF_UPNP, DEFAULT_UPNP)
            inbound = entry.options.get(CONF_INBOUND, INBOUND_CHOICES[0])
            held = entry.options.get(CONF_MASS_CHANGE, DEFAULT_MASS_CHANGE)
        else:  # show the answers again with the error: nothing typed is lost
            typed = user_input.get(CONF_ADDRESSES) or ""
            hours = user_input[CONF_OVERDUE_HOURS]
            silent = user_input[CONF_UNREACHABLE_HOURS]
            upnp, inbound = user_input[CONF_UPNP], user_input[CONF_INBOUND]
            held = user_input[CONF_MASS_CHANGE]
        return self.async_show_form(
            step_id="settings",
            data_schema=vol.Schema(
                {
                    vol.Optional(
                        CONF_ADDRESSES, description={"suggested_value": typed}
                    ): TextSelector(TextSelectorConfig(multiline=True)),
                    vol.Required(CONF_OVERDUE_HOURS, default=hours): _hours(minimum=1),
                    # 0: at the first contact that fails (for those who want to know at once).
                    vol.Required(CONF_UNREACHABLE_HOURS, default=silent): _hours(minimum=0),
                    vol.Required(CONF_UPNP, default=upnp): BooleanSelector(),
                    vol.Required(CONF_INBOUND, default=inbound): SelectSelector(
                        SelectSelectorConfig(
                            options=list(INBOUND_CHOICES),
                            translation_key=CONF_INBOUND,
                            mode=SelectSelectorMode.DROPDOWN,
                        )
                    ),
                    # 0: never hold (every change goes through unasked).
                    vol.Required(CONF_MASS_CHANGE, default=held): _whole(0, 100, "%"),
                }
            ),
            errors=errors,
            description_placeholders={
                "default": our_invite.default_address(self.hass, int(entry.data[CONF_PORT]))
            },
        )

    async def async_step_bandwidth(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Limit what all syncs together send and all restores together receive."""
        entry = self.config_entry
        if user_input is not None:
            return self.async_create_entry(
                data={
                    **entry.options,
                    CONF_UPLOAD_LIMIT: float(user_input[CONF_UPLOAD_LIMIT]),
                    CONF_DOWNLOAD_LIMIT: float(user_input[CONF_DOWNLOAD_LIMIT]),
                }
            )
        upload = entry.options.get(CONF_UPLOAD_LIMIT, 0)
        download = entry.options.get(CONF_DOWNLOAD_LIMIT, 0)
        return self.async_show_form(
            step_id="bandwidth",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_UPLOAD_LIMIT, default=upload): _rate(),
                    vol.Required(CONF_DOWNLOAD_LIMIT, default=download): _rate(),
                }
            ),
        )

    async def async_step_verify(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """How often every copy is verified at the friend's, and repaired (0: never)."""
        entry = self.config_entry
        if user_input is not None:
            return self.async_create_entry(
                data={**entry.options, CONF_VERIFY_DAYS: int(user_input[CONF_VERIFY_DAYS])}
            )
        days = entry.options.get(CONF_VERIFY_DAYS, DEFAULT_VERIFY_DAYS)
        return self.async_show_form(
            step_id="verify",
            data_schema=vol.Schema(
                {vol.Required(CONF_VERIFY_DAYS, default=days): _whole(0, 365, "d")}
            ),
        )


def _rate() -> vol.All[float]:
    """MB/s, 0 for no limit (as a folder's own limit)."""
    return vol.All(
        NumberSelector(
            NumberSelectorConfig(
                min=0, max=10_000, step=0.1, mode=NumberSelectorMode.BOX, unit_of_measurement="MB/s"
            )
        ),
        vol.Coerce(float),
    )


def _hours(*, minimum: int) -> vol.All[int]:
    """A whole number of hours, up to 30 days."""
    return _whole(minimum, 24 * 30, "h")


def _whole(minimum: int, maximum: int, unit: str) -> vol.All[int]:
    """A whole number typed in a box, from ``minimum`` to ``maximum``, in ``unit``."""
    return vol.All(
        NumberSelector(
            NumberSelectorConfig(
                min=minimum,
                max=maximum,
                step=1,
                mode=NumberSelectorMode.BOX,
                unit_of_measurement=unit,
            )
        ),
        vol.Coerce(int),
    )
