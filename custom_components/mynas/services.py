"""Services: sync, verify, restore, list folders, check reachability — with response data."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, overload

from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv, device_registry as dr, service
import probatio as vol

from . import texts
from .const import (
    DOMAIN,
    SERVICE_CHECK_REACHABILITY,
    SERVICE_LIST_FOLDERS,
    SERVICE_RESTORE,
    SERVICE_SYNC,
    SERVICE_VERIFY,
)
from .coordinator import MyNasConfigEntry
from .engine import HostRefused, MyNasError, RestoreConflict, check_folder_name, check_subpath
from .entity import device_identifier
from .models import SyncKind
from .restore_flow import held_folders
from .sync_manager import SyncManager

ATTR_ENTRY = "config_entry_id"
ATTR_FOLDER = "folder"
ATTR_PEER = "peer"
ATTR_WAIT = "wait"
ATTR_REPAIR = "repair"
ATTR_TARGET = "target"
ATTR_PATH = "path"
ATTR_OVERWRITE = "overwrite"

_BASE = {
    vol.Optional(ATTR_ENTRY): cv.string,
    vol.Optional(ATTR_FOLDER): cv.string,
    vol.Optional(ATTR_PEER): cv.string,
}
SYNC_SCHEMA = vol.Schema({**_BASE, vol.Optional(ATTR_WAIT, default=False): cv.boolean})
VERIFY_SCHEMA = vol.Schema({**_BASE, vol.Optional(ATTR_REPAIR, default=False): cv.boolean})
RESTORE_SCHEMA = vol.Schema(
    {
        vol.Optional(ATTR_ENTRY): cv.string,
        vol.Required(ATTR_FOLDER): cv.string,
        vol.Required(ATTR_PEER): cv.string,
        vol.Required(ATTR_TARGET): cv.string,
        vol.Optional(ATTR_PATH, default=""): cv.string,
        vol.Optional(ATTR_OVERWRITE, default=False): cv.boolean,
    }
)


CHECK_SCHEMA = vol.Schema({vol.Optional(ATTR_ENTRY): cv.string})
LIST_FOLDERS_SCHEMA = vol.Schema(
    {vol.Optional(ATTR_ENTRY): cv.string, vol.Optional(ATTR_PEER): cv.string}
)


def _invalid(key: str, **placeholders: str) -> ServiceValidationError:
    return ServiceValidationError(
        translation_domain=DOMAIN, translation_key=key, translation_placeholders=placeholders
    )


def _entry(hass: HomeAssistant, call: ServiceCall) -> MyNasConfigEntry:
    """The node a call is for: the one named, or the only loaded one."""
    entry: MyNasConfigEntry = service.async_get_config_entry(
        hass, DOMAIN, call.data.get(ATTR_ENTRY)
    )
    return entry


def _match(name: str | None, candidates: dict[str, str], key: str) -> list[str]:
    """Ids whose name (or id) is ``name``; all of them when ``name`` is None."""
    if name is None:
        return list(candidates)
    found = [
        item_id
        for item_id, title in candidates.items()
        if name in (item_id, title) or name.casefold() == title.casefold()
    ]
    if not found:
        raise _invalid(key, name=name, known=", ".join(sorted(candidates.values())) or "-")
    return found


@overload
def _named(hass: HomeAssistant, entry: MyNasConfigEntry, value: str) -> str: ...
@overload
def _named(hass: HomeAssistant, entry: MyNasConfigEntry, value: None) -> None: ...
def _named(hass: HomeAssistant, entry: MyNasConfigEntry, value: str | None) -> str | None:
    """A folder or peer as the call names it: the device picked in the form is its subentry.

    Automations may name it instead (the folder's or peer's name, or its subentry id).
    """
    if value is None or (device := dr.async_get(hass).async_get(value)) is None:
        return value
    return next(
        (
            subentry_id
            for subentry_id in entry.subentries
            if device_identifier(entry.entry_id, subentry_id) in device.identifiers
        ),
        value,
    )


def _pairs(
    entry: MyNasConfigEntry, manager: SyncManager, call: ServiceCall
) -> list[tuple[str, str]]:
    folders = _match(
        _named(call.hass, entry, call.data.get(ATTR_FOLDER)),
        {fid: setup.config.name for fid, setup in manager.folders.items()},
        "unknown_folder",
    )
    peers = _match(
        _named(call.hass, entry, call.data.get(ATTR_PEER)),
        {pid: peer.name for pid, peer in manager.peers.items()},
        "unknown_peer",
    )
    pairs = [pair for pair in manager.pairs if pair[0] in folders and pair[1] in peers]
    if not pairs:
        raise _invalid("nothing_to_sync")
    return pairs


async def _sync(call: ServiceCall) -> ServiceResponse:
    entry = _entry(call.hass, call)
    manager = entry.runtime_data.manager
    pairs = _pairs(entry, manager, call)
    tasks = [manager.start(pair, SyncKind.SYNC) for pair in pairs]
    if not call.data[ATTR_WAIT]:
        started: list[Any] = [_describe(manager, pair) for pair in pairs]
        return {"started": started}
    return {"results": await _results(manager, pairs, tasks)}


async def _verify(call: ServiceCall) -> ServiceResponse:
    entry = _entry(call.hass, call)
    manager = entry.runtime_data.manager
    pairs = _pairs(entry, manager, call)
    tasks = [manager.start(pair, SyncKind.VERIFY, repair=call.data[ATTR_REPAIR]) for pair in pairs]
    return {"results": await _results(manager, pairs, tasks)}


async def _results(
    manager: SyncManager,
    pairs: list[tuple[str, str]],
    tasks: list[asyncio.Task[dict[str, Any]]],
) -> list[Any]:
    """Each run's summary; a run cut short (the node stopped) says so instead."""
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    return [
        {**_describe(manager, pair), "status": "cancelled"}
        if isinstance(outcome, BaseException)
        else outcome
        for pair, outcome in zip(pairs, outcomes, strict=True)
    ]


def _describe(manager: SyncManager, pair: tuple[str, str]) -> dict[str, str]:
    return {"folder": manager.folders[pair[0]].config.name, "peer": manager.peers[pair[1]].name}


def _target_state(hass: HomeAssistant, target: str) -> str | None:
    """An error key if ``target`` can't take a restore; "non_empty" if it holds files."""
    path = Path(target)
    if not path.is_absolute():
        return "target_not_absolute"
    if not hass.config.is_allowed_path(target):
        return "target_not_allowed"
    if path.exists() and not path.is_dir():
        return "target_not_a_directory"
    if path.is_dir() and any(path.iterdir()):
        return "target_not_empty"
    return None


async def _restore(call: ServiceCall) -> ServiceResponse:
    hass = call.hass
    entry = _entry(hass, call)
    runtime = entry.runtime_data
    manager = runtime.manager
    folder_name = _named(hass, entry, call.data[ATTR_FOLDER])
    if folder_name in manager.folders:  # picked in the form: its name
        folder_name = manager.folders[folder_name].config.name
    sub_path = call.data[ATTR_PATH]
    peer_ids = _match(
        _named(hass, entry, call.data[ATTR_PEER]),
        {pid: peer.name for pid, peer in manager.peers.items()},
        "unknown_peer",
    )
    try:
        check_folder_name(folder_name)
    except ValueError as err:
        raise _invalid("unknown_folder", name=folder_name, known=_known(manager)) from err
    try:
        check_subpath(sub_path)
    except ValueError as err:
        raise _invalid("invalid_restore_path", path=sub_path) from err
    target = call.data[ATTR_TARGET]
    problem = await hass.async_add_executor_job(_target_state, hass, target)
    if problem == "target_not_empty" and call.data[ATTR_OVERWRITE]:
        problem = None
    if problem:
        raise _invalid(problem, target=target)
    # The folder may be one this node no longer protects (a rebuilt node): use the name.
    known = {setup.config.name for setup in manager.folders.values()}
    name = next((n for n in known if n.casefold() == folder_name.casefold()), folder_name)
    peer_name = manager.peers[peer_ids[0]].name
    try:
        result = await runtime.node.restore(
            name, peer_ids[0], target, path=sub_path, overwrite=call.data[ATTR_OVERWRITE]
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this call itself is cancelled
        # The node stopped under the restore (what was written stays).
        raise _failed(RuntimeError(f"{entry.title} stopped during the restore")) from None
    except RestoreConflict as err:
        raise _invalid("target_not_empty", target=target) from err
    except HostRefused as err:
        if not err.nothing_there:
            raise _failed(err) from err
        raise _invalid(
            "restore_nothing", peer=peer_name, path="/".join(p for p in (name, sub_path) if p)
        ) from err
    except (MyNasError, OSError) as err:
        raise _failed(err) from err
    # What was asked, said back, then what was written (and its size, as people read it).
    return {
        "folder": result.folder,
        "path": sub_path,
        "peer": peer_name,
        "target": target,
        "files": result.files,
        "dirs": result.dirs,
        "bytes": result.bytes,
        "size": texts.size(result.bytes),
        # Files of an encrypted copy that failed authentication: never written.
        "failed": result.failed,
        "failures": result.failures,
        "seconds": round(result.seconds, 3),
    }


async def _list_folders(call: ServiceCall) -> ServiceResponse:
    """The folders each friend (or the one named) keeps for us: name, size, files, date.

    Sizes are as stored there. One friend named: its failure is this call's error; for
    all friends, one that cannot answer says why in its own entry.
    """
    hass = call.hass
    entry = _entry(hass, call)
    runtime = entry.runtime_data
    manager = runtime.manager
    named = call.data.get(ATTR_PEER)
    peer_ids = _match(
        _named(hass, entry, named),
        {pid: peer.name for pid, peer in manager.peers.items()},
        "unknown_peer",
    )

    async def one(peer_id: str) -> dict[str, Any]:
        peer = manager.peers[peer_id].name
        try:
            holdings = await runtime.node.list_folders(peer_id)
        except (MyNasError, OSError) as err:
            if named is not None:
                raise HomeAssistantError(
                    translation_domain=DOMAIN,
                    translation_key="list_failed",
                    translation_placeholders={"peer": peer, "error": str(err)},
                ) from err
            return {"peer": peer, "error": str(err), "folders": [], "more": False}
        return {"peer": peer, **held_folders(holdings)}

    return {"peers": list(await asyncio.gather(*(one(peer_id) for peer_id in peer_ids)))}


async def _check_reachability(call: ServiceCall) -> ServiceResponse:
    """Ask every friend to dial our addresses back; answer with what each found."""
    entry = _entry(call.hass, call)
    try:
        return await entry.runtime_data.reach.async_check()
    except MyNasError as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="check_failed",
            translation_placeholders={"error": str(err)},
        ) from err


def _known(manager: SyncManager) -> str:
    return ", ".join(sorted(setup.config.name for setup in manager.folders.values())) or "-"


def _failed(err: Exception) -> HomeAssistantError:
    return HomeAssistantError(
        translation_domain=DOMAIN,
        translation_key="restore_failed",
        translation_placeholders={"error": str(err)},
    )


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register the services once for all nodes."""
    hass.services.async_register(
        DOMAIN, SERVICE_SYNC, _sync, schema=SYNC_SCHEMA, supports_response=SupportsResponse.OPTIONAL
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_VERIFY,
        _verify,
        schema=VERIFY_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_CHECK_REACHABILITY,
        _check_reachability,
        schema=CHECK_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_LIST_FOLDERS,
        _list_folders,
        schema=LIST_FOLDERS_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
    # Restore writes files wherever Home Assistant may: for administrators only.
    service.async_register_admin_service(
        hass,
        DOMAIN,
        SERVICE_RESTORE,
        _restore,
        schema=RESTORE_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
