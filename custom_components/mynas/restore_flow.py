"""After a fire: what friends hold for us, and restoring it all onto the storage disk.

The node's options offer "Restore from a friend": pick the friend, see the folders kept
there (``ThreadedNode.list_folders``: names read back with this node's keys, so a node
rebuilt from its key or recovery code needs no memory of them), and restore every folder
chosen into a new folder beside the storage root, on the same disk:
``<disk>/MyNAS restore <date>/<folder>``. That target is MyNAS's own disk, so no
``allowlist_external_dirs`` is needed (the ``mynas.restore`` service, which writes
wherever it is told, still checks the allowlist). The restores run one after the other
while the dialog shows their progress; the last step says what came back.

``held_folders`` shapes the same listing for the ``mynas.list_folders`` service.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import ConfigEntryState, ConfigFlowResult, OptionsFlow
from homeassistant.helpers.selector import (
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
)
from homeassistant.util import dt as dt_util
import probatio as vol

from . import texts
from .const import CONF_STORAGE_ROOT
from .engine import Holdings, MyNasError, Progress

if TYPE_CHECKING:
    from .coordinator import MyNasConfigEntry

CONF_PEER = "peer"
CONF_FOLDERS = "folders"
# The folder a restore from the dialog writes into, beside the storage root.
RESTORE_DIR = "MyNAS restore {date}"


def held_folders(holdings: Holdings) -> dict[str, Any]:
    """The folders kept at a peer as a service answers them (sizes as stored there)."""
    return {
        "folders": [
            {
                "name": item.name,
                "encrypted": item.encrypted,
                "files": item.files,
                "stored_bytes": item.stored_bytes,
                "stored_size": texts.size(item.stored_bytes),
                "last_update": _when(item.last_update),
                "home_assistant_backups": item.backups,
            }
            for item in holdings.folders
        ],
        "more": holdings.more,
    }


def _when(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt_util.utc_from_timestamp(timestamp).isoformat()


def restore_root(storage_root: str, now: datetime) -> Path:
    """A new folder beside the storage root for this restore (blocking: looks at the disk)."""
    base = Path(storage_root).parent
    name = RESTORE_DIR.format(date=dt_util.as_local(now).strftime("%Y-%m-%d"))
    path, count = base / name, 1
    while path.exists():
        count += 1
        path = base / f"{name} ({count})"
    return path


def _listing(holdings: Holdings) -> str:
    """The folders kept at a friend, one line each, for the dialog's text."""
    lines = []
    for item in holdings.folders:
        if item.backups:
            continue  # said apart (``_backups``)
        changed = (
            texts.NONE
            if item.last_update is None
            else texts.since(dt_util.utc_from_timestamp(item.last_update))
        )
        lines.append(
            f"- **{item.name}**: {item.files} · {texts.size(item.stored_bytes)} · {changed}"
        )
    return "\n".join(lines) or texts.NONE


def _backups(holdings: Holdings) -> str:
    """The size of Home Assistant's own backups kept at the friend (``-``: none)."""
    kept = [item.stored_bytes for item in holdings.folders if item.backups]
    return texts.size(sum(kept)) if kept else texts.NONE


class RestoreSteps(OptionsFlow):
    """The options flow's restore dialog: friend, folders, progress, result."""

    _restore_peer: str
    _restore_holdings: Holdings
    _restore_task: asyncio.Task[dict[str, str]] | None = None
    _restore_outcome: dict[str, str]

    def _loaded(self) -> MyNasConfigEntry | None:
        entry: MyNasConfigEntry = self.config_entry
        return entry if entry.state is ConfigEntryState.LOADED else None

    async def async_step_restore(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Pick the friend whose copies to look at."""
        entry = self._loaded()
        if entry is None:
            return self.async_abort(reason="node_not_loaded")
        peers = entry.runtime_data.manager.peers
        if not peers:
            return self.async_abort(reason="no_peers")
        errors: dict[str, str] = {}
        placeholders = {"error": texts.NONE}
        if user_input is not None:
            peer_id = user_input[CONF_PEER]
            try:
                self._restore_holdings = await entry.runtime_data.node.list_folders(peer_id)
            except (MyNasError, OSError) as err:
                errors["base"] = "list_failed"
                placeholders["error"] = str(err)
            else:
                self._restore_peer = peer_id
                return await self.async_step_restore_folders()
        return self.async_show_form(
            step_id="restore",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_PEER): SelectSelector(
                        SelectSelectorConfig(
                            options=[
                                SelectOptionDict(value=peer_id, label=peer.name)
                                for peer_id, peer in peers.items()
                            ],
                            mode=SelectSelectorMode.DROPDOWN,
                        )
                    )
                }
            ),
            errors=errors,
            description_placeholders=placeholders,
        )

    async def async_step_restore_folders(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show what the friend keeps; restore the folders chosen (all, unless told)."""
        entry = self._loaded()
        if entry is None:
            return self.async_abort(reason="node_not_loaded")
        holdings = self._restore_holdings
        peer = entry.runtime_data.manager.peers[self._restore_peer].name
        names = sorted(
            {item.name for item in holdings.folders if not item.backups}, key=str.casefold
        )
        if not names:
            return self.async_abort(reason="nothing_kept", description_placeholders={"peer": peer})
        root = entry.data[CONF_STORAGE_ROOT]
        target = await self.hass.async_add_executor_job(restore_root, root, dt_util.utcnow())
        if user_input is not None and user_input.get(CONF_FOLDERS):
            chosen = [name for name in names if name in user_input[CONF_FOLDERS]]
            self._restore_task = self.hass.async_create_task(
                self._restore_all(entry, chosen, target), eager_start=False
            )
            return await self.async_step_restore_run()
        return self.async_show_form(
            step_id="restore_folders",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_FOLDERS, default=names): SelectSelector(
                        SelectSelectorConfig(
                            options=names, multiple=True, mode=SelectSelectorMode.LIST
                        )
                    )
                }
            ),
            errors={"base": "choose_one"} if user_input is not None else {},
            description_placeholders={
                "peer": peer,
                "folders": _listing(holdings),
                "backups": _backups(holdings),
                "target": str(target),
                "more": texts.NONE if not holdings.more else "…",
            },
        )

    async def async_step_restore_run(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show progress while the restores run; then the result."""
        task = self._restore_task
        assert task is not None
        if not task.done():
            return self.async_show_progress(
                step_id="restore_run", progress_action="restoring", progress_task=task
            )
        self._restore_outcome = task.result()
        return self.async_show_progress_done(next_step_id="restore_done")

    async def async_step_restore_done(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Say what came back (or what went wrong)."""
        outcome = self._restore_outcome
        return self.async_abort(
            reason="restore_failed" if "error" in outcome else "restored",
            description_placeholders=outcome,
        )

    async def _restore_all(
        self, entry: MyNasConfigEntry, folders: list[str], target: Path
    ) -> dict[str, str]:
        """Restore each folder into ``target``/<folder>; the result's placeholders."""
        node = entry.runtime_data.node
        weights = {item.name: max(1, item.stored_bytes) for item in self._restore_holdings.folders}
        total = sum(weights.get(name, 1) for name in folders)
        done = files = size = failed = 0
        restored: list[str] = []

        def moved(progress: Progress) -> None:
            self.async_update_progress(min(1.0, (done + progress.bytes_done) / total))

        sink = node.relay(moved)
        try:
            for name in folders:
                result = await node.restore(
                    name, self._restore_peer, os.fspath(target / name), progress=sink
                )
                files += result.files
                size += result.bytes
                failed += result.failed
                restored.append(name)
                done += weights.get(name, 1)
                self.async_update_progress(min(1.0, done / total))
        except (MyNasError, OSError) as err:
            return {
                "error": str(err),
                "target": str(target),
                "folders": texts.names(restored),
            }
        return {
            "folders": texts.names(restored),
            "target": str(target),
            "files": str(files),
            "size": texts.size(size),
            "failed": str(failed),
        }
