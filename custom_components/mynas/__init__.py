"""MyNAS: a friend-to-friend backup network of Home Assistant nodes and their USB disks.

Home Assistant's entry points are all here, as Home Assistant (and hassfest) expect them;
their work is done in ``hass_entry``. This module imports nothing of Home Assistant when it
is imported: ``import custom_components.mynas.engine`` — the command line, the benchmark —
runs this file first, and Home Assistant's helpers would add 0.6 s and 65 MB to every such
process. Each entry point has ``hass_entry`` imported in Home Assistant's import executor
(never in its event loop) the first time it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .const import DOMAIN

if TYPE_CHECKING:
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.device_registry import DeviceEntry
    from homeassistant.helpers.typing import ConfigType

    from .coordinator import MyNasConfigEntry


def _config_entry_only(config: dict[str, Any]) -> dict[str, Any]:
    """Home Assistant's ``config_entry_only_config_schema``: MyNAS is set up in the UI only."""
    # Loaded by Home Assistant long before it validates any configuration.
    from homeassistant.helpers import config_validation as cv  # noqa: PLC0415

    result: dict[str, Any] = cv.config_entry_only_config_schema(DOMAIN)(config)
    return result


CONFIG_SCHEMA = _config_entry_only


async def _load_hass_entry(hass: HomeAssistant) -> None:
    """Import ``hass_entry`` off the event loop (a no-op once it is loaded)."""
    from homeassistant.helpers.importlib import async_import_module  # noqa: PLC0415

    await async_import_module(hass, f"{__name__}.hass_entry")


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the services (they check at call time which nodes are loaded)."""
    await _load_hass_entry(hass)
    from .services import async_setup_services  # noqa: PLC0415 - loaded with hass_entry

    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: MyNasConfigEntry) -> bool:
    """Start the node: check its disk, load its key, start its server, entities and schedule."""
    await _load_hass_entry(hass)
    from .hass_entry import async_run_node, async_start_node  # noqa: PLC0415

    entry.runtime_data = await async_start_node(hass, entry)
    await async_run_node(hass, entry)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: MyNasConfigEntry) -> bool:
    """Stop the node."""
    from .hass_entry import async_stop_node  # noqa: PLC0415 - loaded by async_setup_entry

    return await async_stop_node(hass, entry)


async def async_remove_entry(hass: HomeAssistant, entry: MyNasConfigEntry) -> None:
    """The node is deleted: drop what Home Assistant kept of its pairs and peers.

    The key stays in the config dir: with it, a rebuilt node gets its backups back.
    """
    await _load_hass_entry(hass)
    from .persistence import async_remove  # noqa: PLC0415 - loaded with hass_entry

    await async_remove(hass, entry.entry_id)


async def async_remove_config_entry_device(
    hass: HomeAssistant, entry: MyNasConfigEntry, device: DeviceEntry
) -> bool:
    """Let the user delete a device only when no part of the node stands behind it.

    The node's device goes with the node, a peer's or a folder's with its subentry (remove
    the peer or the folder instead); a device left over from either may go.
    """
    from .entity import device_identifier  # noqa: PLC0415 - loaded with hass_entry

    current = {device_identifier(entry.entry_id)} | {
        device_identifier(entry.entry_id, subentry_id) for subentry_id in entry.subentries
    }
    return not device.identifiers & current
