"""Starting and stopping a node: the work behind the entry points in ``__init__``."""

from __future__ import annotations

import errno
from functools import partial
from pathlib import Path
from typing import Any

from homeassistant.config_entries import (
    SIGNAL_CONFIG_ENTRY_CHANGED,
    ConfigEntry,
    ConfigEntryChange,
    ConfigEntryState,
)
from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import CALLBACK_TYPE, Event, HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryNotReady
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.util import dt as dt_util

from . import issues
from .const import (
    CONF_ADDRESSES,
    CONF_INBOUND,
    CONF_KEY_FILE,
    CONF_KIT_SAVED,
    CONF_MASS_CHANGE,
    CONF_NODE_ID,
    CONF_NODE_NAME,
    CONF_PORT,
    CONF_STORAGE_ROOT,
    CONF_UPNP,
    DEFAULT_MASS_CHANGE,
    DEFAULT_UPNP,
    DOMAIN,
    EVENT_UNKNOWN_KEY,
    LOGGER,
    SUBENTRY_FOLDER,
)
from .coordinator import MyNasConfigEntry, MyNasRuntimeData, NodeCoordinator, SyncCoordinator
from .engine import Inbound, StorageRootError, ThreadedNode, load_or_create_identity, open_root
from .entity import node_device, pair_unique_id_prefix, subentries
from .models import DATA_BACKUP_AGENT_LISTENERS, Pair, folders_of, node_limits, peers_of
from .orphans import async_check_orphans
from .reach import ReachCoordinator
from .sync_manager import SyncManager

PLATFORMS: list[Platform] = [Platform.BINARY_SENSOR, Platform.BUTTON, Platform.SENSOR]

# Friends reach the node from the Internet through the router: listen on every interface.
LISTEN_HOST = ""


def key_path(hass: HomeAssistant, entry: MyNasConfigEntry) -> Path:
    """Where the node's private key lives: in the config dir, mode 0600."""
    stored = entry.data.get(CONF_KEY_FILE)
    return (
        Path(stored)
        if stored
        else Path(hass.config.path(DOMAIN, f"{entry.data[CONF_NODE_ID]}.key"))
    )


async def async_start_node(hass: HomeAssistant, entry: MyNasConfigEntry) -> MyNasRuntimeData:
    """Check the node's disk, load its key, start its server; read its state once.

    Raises ConfigEntryNotReady while the disk is away or the port taken; stops what it
    started when it fails.
    """
    data = entry.data
    if not data.get(CONF_KIT_SAVED):
        # Whatever else happens: the kit matters most when the disk is gone.
        issues.recovery_kit(hass, entry.entry_id, data[CONF_NODE_NAME])
    root = data[CONF_STORAGE_ROOT]
    try:
        await hass.async_add_executor_job(open_root, root, data[CONF_NODE_ID], data[CONF_NODE_NAME])
    except StorageRootError as err:
        issues.storage_problem(
            hass,
            entry.entry_id,
            data[CONF_NODE_NAME],
            err.problem,
            err.path,
            [setup.config.name for setup in folders_of(entry).values()],
        )
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key=err.problem.value,
            translation_placeholders={"path": err.path},
        ) from err
    issues.storage_problem(hass, entry.entry_id, data[CONF_NODE_NAME], None, root)
    node_key, _ = await hass.async_add_executor_job(load_or_create_identity, key_path(hass, entry))

    upload_limit, download_limit = node_limits(entry.options)
    options = entry.options
    node = ThreadedNode(
        node_key,
        root,
        upload_limit=upload_limit,
        download_limit=download_limit,
        upnp=bool(options.get(CONF_UPNP, DEFAULT_UPNP)),
        inbound=Inbound(options.get(CONF_INBOUND, Inbound.AUTO)),
        mass_change_percent=int(options.get(CONF_MASS_CHANGE, DEFAULT_MASS_CHANGE)),
    )
    peers = peers_of(entry)
    folders = folders_of(entry)
    manager = SyncManager(
        hass,
        entry.entry_id,
        data[CONF_NODE_NAME],
        node,
        folders,
        peers,
        dict(entry.options),
        node_id=data[CONF_NODE_ID],
    )
    # Before the server listens: a peer that connects at once finds its state loaded.
    await manager.async_load()
    reach = ReachCoordinator(hass, entry, node)
    try:
        await node.start(
            LISTEN_HOST,
            data[CONF_PORT],
            peers.values(),
            on_event=partial(_on_server_event, hass, entry, manager, reach),
            addresses=options.get(CONF_ADDRESSES, []),
        )
    except OSError as err:
        if err.errno in (errno.EADDRINUSE, errno.EACCES):
            raise ConfigEntryNotReady(
                translation_domain=DOMAIN,
                translation_key="port_in_use",
                translation_placeholders={"port": str(data[CONF_PORT]), "error": str(err)},
            ) from err
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key="start_failed",
            translation_placeholders={"error": str(err)},
        ) from err

    try:
        # A removed folder or peer leaves its index behind; were it added again, that
        # index would claim files the host may no longer hold. Forget it: the next sync
        # then adopts what the host really has.
        await _forget_stale_pairs(
            node, {(f.config.name, peer) for f in folders.values() for peer in f.peers}
        )
        await manager.async_load_kinds()
    except BaseException:
        await node.stop()
        raise

    runtime = MyNasRuntimeData(
        node=node,
        node_data=NodeCoordinator(hass, entry, node, manager),
        syncs=SyncCoordinator(hass, entry, manager),
        manager=manager,
        reach=reach,
    )
    try:
        await runtime.node_data.async_config_entry_first_refresh()
        await runtime.reach.async_config_entry_first_refresh()
        await runtime.syncs.async_config_entry_first_refresh()
    except BaseException:
        await _stop(runtime)
        raise
    return runtime


async def async_run_node(hass: HomeAssistant, entry: MyNasConfigEntry) -> None:
    """With ``entry.runtime_data`` set: add the devices and entities, then start the schedule."""
    runtime = entry.runtime_data
    manager = runtime.manager
    try:
        # Peers' and folders' devices hang off the node's: it must exist before their entities.
        dr.async_get(hass).async_get_or_create(config_entry_id=entry.entry_id, **node_device(entry))
        _remove_stale_pair_entities(hass, entry, manager.pairs)
        await async_check_orphans(hass, entry)
        await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    except BaseException:
        await _stop(runtime)
        raise
    manager.async_start()

    @callback
    def _on_hass_stop(_event: Event) -> None:
        hass.async_create_task(_stop(runtime), eager_start=True)

    entry.async_on_unload(hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, _on_hass_stop))
    entry.async_on_unload(_reload_on_subentry_change(hass, entry))
    # Each peer is a backup location (backup.py): loading or unloading changes the agents.
    entry.async_on_unload(entry.async_on_state_change(partial(_notify_backup_listeners, hass)))


def _remove_stale_pair_entities(
    hass: HomeAssistant, entry: MyNasConfigEntry, pairs: list[Pair]
) -> None:
    """Forget the entities of folder × peer pairs that are gone.

    Removing a peer removes its device and its own entities, but a pair's entities live on
    the folder's device: without this they would stay registered, unavailable, for good.
    The same holds for a peer taken off a folder.
    """
    registry = er.async_get(hass)
    folders = subentries(entry, SUBENTRY_FOLDER)
    keep = tuple(pair_unique_id_prefix(entry.entry_id, *pair) for pair in pairs)
    for entity in er.async_entries_for_config_entry(registry, entry.entry_id):
        if entity.config_subentry_id in folders and not entity.unique_id.startswith(keep):
            registry.async_remove(entity.entity_id)


@callback
def _notify_backup_listeners(hass: HomeAssistant) -> None:
    """Tell Home Assistant's backup manager that the agents changed."""
    for listener in hass.data.get(DATA_BACKUP_AGENT_LISTENERS, []):
        listener()


def _subentries(entry: MyNasConfigEntry) -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {
        sub_id: (sub.subentry_type, sub.title, dict(sub.data))
        for sub_id, sub in entry.subentries.items()
    }


def _reload_on_subentry_change(hass: HomeAssistant, entry: MyNasConfigEntry) -> CALLBACK_TYPE:
    """Restart the node with its new peers and folders when a subentry changes.

    Not an update listener: options reload through ``OptionsFlowWithReload`` (which refuses
    update listeners), the node's reconfigure flow reloads by itself, and an options change
    alone (a removed peer's data kept) needs no restart.
    """
    loaded_with = _subentries(entry)

    @callback
    def changed(change: ConfigEntryChange, changed_entry: ConfigEntry) -> None:
        if (
            change is ConfigEntryChange.UPDATED
            and changed_entry.entry_id == entry.entry_id
            and entry.state is ConfigEntryState.LOADED
            and _subentries(entry) != loaded_with
        ):
            hass.config_entries.async_schedule_reload(entry.entry_id)

    return async_dispatcher_connect(hass, SIGNAL_CONFIG_ENTRY_CHANGED, changed)


@callback
def _on_server_event(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    manager: SyncManager,
    reach: ReachCoordinator,
    kind: str,
    details: dict[str, Any],
) -> None:
    """Turn one of the engine's events into state or an HA event."""
    if kind in ("reachability", "upnp", "peer_addresses"):
        reach.on_event(kind, details)
        return
    if kind == "unknown_key":
        LOGGER.warning(
            "A node with unknown key %s tried to connect from %s: if it is a friend, "
            "pair with their invite code",
            details.get("fingerprint"),
            details.get("address"),
        )
        hass.bus.async_fire(
            EVENT_UNKNOWN_KEY,
            {"entry_id": entry.entry_id, "fingerprint": details.get("fingerprint")},
        )
    elif kind == "peer_connected":
        for peer_id, peer in manager.peers.items():
            if peer.jail == details.get("peer"):
                manager.contact(peer_id, dt_util.utcnow())


async def _forget_stale_pairs(node: ThreadedNode, keep: set[tuple[str, str]]) -> None:
    """Drop the index of every (folder name, peer id) not configured any more."""
    stale = [pair for pair in await node.known_pairs() if pair not in keep]
    if stale:
        LOGGER.debug("Forgetting the index of %d removed folder/peer pairs", len(stale))
        await node.forget_pairs(stale)


async def _stop(runtime: MyNasRuntimeData) -> None:
    """Stop the coordinators, the scheduler, then the node and its thread (idempotent)."""
    await runtime.node_data.async_shutdown()
    await runtime.syncs.async_shutdown()
    await runtime.reach.async_shutdown()
    await runtime.manager.async_stop()
    await runtime.node.stop()


async def async_stop_node(hass: HomeAssistant, entry: MyNasConfigEntry) -> bool:
    """Remove the node's entities, then stop it."""
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        await _stop(entry.runtime_data)
    return unloaded
