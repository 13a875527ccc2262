"""Home Assistant's backup platform: each paired peer is a backup location ("MyNAS: Bob").

Home Assistant's own backups (automations, dashboards, history, and MyNAS's key) go to a
friend's disk like any protected folder: into the backup area of our space there
(``<jail>/.ha-backups/``, engine ``owner/backup_area.py``), counted in the quota the friend
grants, and kept in the friend's trash when replaced or deleted. Every transfer runs on the
engine's loop (``ThreadedNode``): Home Assistant's loop only hands chunks over, and an
archive is streamed both ways, never held whole in memory.

One agent per peer of every loaded node; the agents change when a node loads or unloads,
which is also what adding, removing or renaming a peer does (the entry reloads), so the
listeners hear of each change from ``hass_entry``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
import contextlib
from typing import Any, NoReturn, override

from homeassistant.components.backup import (
    AgentBackup,
    BackupAgent,
    BackupAgentError,
    BackupNotFound,
    OnProgressCallback,
)
from homeassistant.components.backup.agent import BackupAgentUnreachableError
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant, callback

from .const import DOMAIN, LOGGER
from .coordinator import MyNasConfigEntry
from .engine import (
    AuthRefused,
    BackupMissing,
    HostKeyMismatch,
    MyNasError,
    NewBackup,
    PeerConfig,
    PeerDiskFull,
    PeerUnreachable,
    QuotaExceeded,
    SealedFileError,
    StoredBackup,
    ThreadedNode,
    format_bytes,
)
from .models import DATA_BACKUP_AGENT_LISTENERS


async def async_get_backup_agents(hass: HomeAssistant, **kwargs: Any) -> list[BackupAgent]:
    """One backup agent per peer of every loaded node."""
    entries: list[MyNasConfigEntry] = hass.config_entries.async_loaded_entries(DOMAIN)
    return [
        MyNasBackupAgent(entry, peer)
        for entry in entries
        for peer in entry.runtime_data.node.peers.values()
    ]


@callback
def async_register_backup_agents_listener(
    hass: HomeAssistant, *, listener: Callable[[], None], **kwargs: Any
) -> Callable[[], None]:
    """Have ``listener`` called when agents come or go (a node loads or unloads)."""
    hass.data.setdefault(DATA_BACKUP_AGENT_LISTENERS, []).append(listener)

    @callback
    def remove_listener() -> None:
        hass.data[DATA_BACKUP_AGENT_LISTENERS].remove(listener)
        if not hass.data[DATA_BACKUP_AGENT_LISTENERS]:
            del hass.data[DATA_BACKUP_AGENT_LISTENERS]

    return remove_listener


class MyNasBackupAgent(BackupAgent):
    """Home Assistant's backups kept at one peer."""

    domain = DOMAIN

    def __init__(self, entry: MyNasConfigEntry, peer: PeerConfig) -> None:
        """Keep backups at ``peer`` of the node ``entry``."""
        super().__init__()
        self._entry = entry
        self._peer_id = peer.id
        self._peer_name = peer.name
        self.name = peer.name
        self.unique_id = f"{entry.entry_id}_{peer.id}"

    # --- the five operations --------------------------------------------------------------

    @override
    async def async_upload_backup(
        self,
        *,
        open_stream: Callable[[], Coroutine[Any, Any, AsyncIterator[bytes]]],
        backup: AgentBackup,
        on_progress: OnProgressCallback,
        **kwargs: Any,
    ) -> None:
        """Stream a backup to the peer (the stream is opened once the peer has room for it)."""
        node = self._node()

        def progress(sent: int) -> None:
            on_progress(bytes_uploaded=sent)

        with self._translated(backup.backup_id, writing=True):
            await node.upload_backup(
                self._peer_id,
                NewBackup(backup.backup_id, backup.as_dict(), backup.size, open_stream),
                progress=progress,
            )

    @override
    async def async_download_backup(self, backup_id: str, **kwargs: Any) -> AsyncIterator[bytes]:
        """Stream a backup back from the peer; BackupNotFound if it is not there."""
        node = self._node()
        with self._translated(backup_id):
            chunks = await node.download_backup(self._peer_id, backup_id)
        return self._stream(backup_id, chunks)

    @override
    async def async_delete_backup(self, backup_id: str, **kwargs: Any) -> None:
        """Delete a backup at the peer (it stays in the peer's trash for its retention)."""
        node = self._node()
        with self._translated(backup_id):
            await node.delete_backup(self._peer_id, backup_id)

    @override
    async def async_list_backups(self, **kwargs: Any) -> list[AgentBackup]:
        """Every complete backup kept at the peer."""
        node = self._node()
        with self._translated(None):
            stored = await node.list_backups(self._peer_id)
        return [backup for item in stored if (backup := self._agent_backup(item)) is not None]

    @override
    async def async_get_backup(self, backup_id: str, **kwargs: Any) -> AgentBackup:
        """One backup kept at the peer; BackupNotFound if it is not there."""
        node = self._node()
        with self._translated(backup_id):
            stored = await node.get_backup(self._peer_id, backup_id)
        backup = self._agent_backup(stored)
        if backup is None:
            raise BackupNotFound(f"Backup {backup_id} not found")
        return backup

    # --- helpers --------------------------------------------------------------------------

    def _node(self) -> ThreadedNode:
        """The running node; unreachable while it is not loaded or no longer has the peer."""
        entry = self._entry
        if (
            entry.state is not ConfigEntryState.LOADED
            or self._peer_id not in (node := entry.runtime_data.node).peers
        ):
            raise BackupAgentUnreachableError(
                translation_domain=DOMAIN,
                translation_key="backup_node_not_running",
                translation_placeholders={"peer": self._peer_name},
            )
        return node

    def _agent_backup(self, stored: StoredBackup) -> AgentBackup | None:
        """Home Assistant's view of a stored backup (None, with a warning, if unreadable)."""
        try:
            backup = AgentBackup.from_dict({**stored.metadata, "size": stored.size})
        except KeyError, TypeError, ValueError:
            backup = None
        if backup is None or backup.backup_id != stored.backup_id:
            LOGGER.warning(
                "Ignoring backup %s kept at %s: its metadata is not Home Assistant's",
                stored.backup_id,
                self._peer_name,
            )
            return None
        return backup

    async def _stream(self, backup_id: str, chunks: AsyncGenerator[bytes]) -> AsyncGenerator[bytes]:
        """``chunks`` with the engine's errors translated (and closed however it ends)."""
        try:
            with self._translated(backup_id):
                async for chunk in chunks:
                    yield chunk
        finally:
            await chunks.aclose()

    @contextlib.contextmanager
    def _translated(self, backup_id: str | None, *, writing: bool = False) -> Iterator[None]:
        """Raise the engine's errors as Home Assistant's backup errors."""
        try:
            yield
        except BackupMissing as err:
            raise BackupNotFound(f"Backup {backup_id} not found at {self._peer_name}") from err
        except ValueError as err:  # an id that cannot name a backup there
            if not writing:
                raise BackupNotFound(f"Backup {backup_id} not found") from err
            self._fail("backup_bad_id", err, error=str(err))
        except PeerUnreachable as err:
            LOGGER.debug("%s is unreachable for backups: %s", self._peer_name, err)
            raise BackupAgentUnreachableError(
                translation_domain=DOMAIN,
                translation_key="backup_peer_unreachable",
                translation_placeholders={"peer": self._peer_name, "error": str(err)},
            ) from err
        except QuotaExceeded as err:
            self._fail(
                "backup_quota_full",
                err,
                needed=format_bytes(err.needed),
                available=format_bytes(err.available),
            )
        except PeerDiskFull as err:
            self._fail("backup_peer_disk_full", err)
        except HostKeyMismatch as err:
            self._fail("backup_key_mismatch", err)
        except AuthRefused as err:
            self._fail("backup_not_added", err)
        except SealedFileError as err:
            self._fail("backup_tampered", err, error=str(err))
        except MyNasError as err:
            self._fail("backup_failed", err, error=str(err))

    def _fail(self, key: str, err: Exception, **placeholders: str) -> NoReturn:
        raise BackupAgentError(
            translation_domain=DOMAIN,
            translation_key=key,
            translation_placeholders={"peer": self._peer_name, **placeholders},
        ) from err
