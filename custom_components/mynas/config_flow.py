"""Config flow for MyNAS: set up this node (name, storage root on the USB disk, port)."""

from __future__ import annotations

from typing import Any

from homeassistant.config_entries import ConfigFlow, ConfigFlowResult
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    TextSelector,
)
import probatio as vol

from .const import (
    CONF_ALLOW_SAME_DISK,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_PORT,
    CONF_STORAGE_ROOT,
    DEFAULT_PORT,
    DOMAIN,
)
from .engine import storage_root

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
    path = storage_root.check_new_root(root, config_dir, allow_same_disk=allow_same_disk)
    return str(path), storage_root.filesystem_identity(path)


class MyNasConfigFlow(ConfigFlow, domain=DOMAIN):
    """Set up this Home Assistant as a MyNAS node."""

    VERSION = 1
    MINOR_VERSION = 1

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the node's name, its storage root and its port."""
        errors: dict[str, str] = {}
        if user_input is not None:
            name = user_input[CONF_NODE_NAME].strip()
            if not name:
                errors[CONF_NODE_NAME] = "name_required"
            else:
                try:
                    path, unique_id = await self.hass.async_add_executor_job(
                        _validate_root,
                        user_input[CONF_STORAGE_ROOT].strip(),
                        self.hass.config.config_dir,
                        user_input[CONF_ALLOW_SAME_DISK],
                    )
                except storage_root.StorageRootError as err:
                    errors[CONF_STORAGE_ROOT] = err.problem.value
                else:
                    await self.async_set_unique_id(unique_id)
                    self._abort_if_unique_id_configured()
                    marker = await self.hass.async_add_executor_job(
                        storage_root.claim_root, path, name
                    )
                    return self.async_create_entry(
                        title=name,
                        data={
                            CONF_NODE_NAME: name,
                            CONF_STORAGE_ROOT: path,
                            CONF_PORT: user_input[CONF_PORT],
                            CONF_NODE_ID: marker.node_id,
                        },
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
            if not name:
                errors[CONF_NODE_NAME] = "name_required"
            else:
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
