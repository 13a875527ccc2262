"""The node's configuration as the engine's types; the live state of pairs and peers.

``SyncContext`` is what the parts of a node's sync manager share: the node, what it
protects where, that state, and where its changes go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
import enum
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import ConfigEntry, ConfigSubentry
from homeassistant.util.hass_dict import HassKey

from .const import (
    CONF_ADDRESSES,
    CONF_BWLIMIT,
    CONF_DOWNLOAD_LIMIT,
    CONF_ENCRYPTED,
    CONF_EXCLUDE,
    CONF_HOURS,
    CONF_JAIL,
    CONF_NAME,
    CONF_PATH,
    CONF_PEERS,
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    CONF_RETENTION_DAYS,
    CONF_SCHEDULE,
    CONF_TIME,
    CONF_UPLOAD_LIMIT,
    CONF_WATCH,
    CONF_WATCH_MINUTES,
    DEFAULT_INTERVAL_HOURS,
    DEFAULT_WATCH_MINUTES,
    DOMAIN,
    SCHEDULE_DAILY,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)
from .engine import FolderConfig, PeerConfig, Progress, Reachability
from .schedule import Schedule, parse_time

if TYPE_CHECKING:
    from homeassistant.core import HomeAssistant

    from .engine import ThreadedNode
    from .persistence import SyncStore
    from .updates import EntityUpdates

# A folder × peer pair: (folder subentry id, peer subentry id).
type Pair = tuple[str, str]


def peer_config(subentry: ConfigSubentry) -> PeerConfig:
    """Return a peer subentry as the engine's PeerConfig."""
    data = subentry.data
    return PeerConfig(
        id=subentry.subentry_id,
        name=data[CONF_NAME],
        jail=data[CONF_JAIL],
        addresses=tuple(data[CONF_ADDRESSES]),
        public_key=data[CONF_PUBLIC_KEY],
        quota=int(data[CONF_QUOTA]),
    )


@dataclass(frozen=True, slots=True)
class FolderSetup:
    """A folder subentry: what to send, where to, and when."""

    config: FolderConfig
    peers: tuple[str, ...]
    schedule: Schedule
    # Back up after changes, at most once per this interval (None: on the schedule only).
    watch_interval: timedelta | None = None


def _bytes_per_second(mbps: Any) -> int | None:
    """MB/s as typed in a form (0 or nothing: no limit) as the engine's bytes/s."""
    return int(float(mbps or 0) * 1_000_000) or None


def node_limits(options: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The node-wide (upload, download) limits in bytes/s from the node's options."""
    return (
        _bytes_per_second(options.get(CONF_UPLOAD_LIMIT)),
        _bytes_per_second(options.get(CONF_DOWNLOAD_LIMIT)),
    )


def folder_setup(subentry: ConfigSubentry) -> FolderSetup:
    """Return a folder subentry as the engine's FolderConfig plus its peers and schedule."""
    data = subentry.data
    config = FolderConfig(
        id=subentry.subentry_id,
        name=data[CONF_NAME],
        path=data[CONF_PATH],
        exclude=tuple(data.get(CONF_EXCLUDE) or ()),
        bwlimit=_bytes_per_second(data.get(CONF_BWLIMIT)),
        retention_days=data.get(CONF_RETENTION_DAYS),
        # Set up before encryption existed: plain (until converted).
        encrypted=bool(data.get(CONF_ENCRYPTED, False)),
    )
    if data.get(CONF_SCHEDULE) == SCHEDULE_DAILY:
        schedule = Schedule(SCHEDULE_DAILY, at=parse_time(data[CONF_TIME]))
    else:
        hours = int(data.get(CONF_HOURS) or DEFAULT_INTERVAL_HOURS)
        schedule = Schedule("interval", every=timedelta(hours=hours))
    watch = (
        timedelta(minutes=int(data.get(CONF_WATCH_MINUTES) or DEFAULT_WATCH_MINUTES))
        if data.get(CONF_WATCH)
        else None
    )
    return FolderSetup(config, tuple(data.get(CONF_PEERS) or ()), schedule, watch)


def peers_of(entry: ConfigEntry[Any]) -> dict[str, PeerConfig]:
    """Every paired peer of a node entry, by subentry id."""
    return {
        sub.subentry_id: peer_config(sub)
        for sub in entry.subentries.values()
        if sub.subentry_type == SUBENTRY_PEER
    }


def folders_of(entry: ConfigEntry[Any]) -> dict[str, FolderSetup]:
    """Every protected folder of a node entry, by subentry id."""
    return {
        sub.subentry_id: folder_setup(sub)
        for sub in entry.subentries.values()
        if sub.subentry_type == SUBENTRY_FOLDER
    }


def pairs_of(folders: dict[str, FolderSetup], peers: dict[str, PeerConfig]) -> list[Pair]:
    """Every (folder id, peer id) that should be synced: each folder on each of its peers."""
    return [
        (folder_id, peer_id)
        for folder_id, setup in folders.items()
        for peer_id in setup.peers
        if peer_id in peers
    ]


# Who to tell when backup agents (one per peer of a loaded node) come or go (backup.py).
# Here, not in const: const is imported by the engine's command line, free of Home Assistant.
DATA_BACKUP_AGENT_LISTENERS: HassKey[list[Callable[[], None]]] = HassKey(
    f"{DOMAIN}.backup_agent_listeners"
)


class SyncKind(enum.StrEnum):
    """What a run of a pair does: send what changed, or compare the copy with the folder."""

    SYNC = "sync"
    VERIFY = "verify"
    # Send a plain replica again encrypted, then the plain copy goes to the host's trash.
    CONVERT = "convert"


class Encryption(enum.StrEnum):
    """What a friend's copy of a folder is (or will be, before the first sync)."""

    ENCRYPTED = "encrypted"
    PLAIN = "plain"
    # Being sent again encrypted: until that copy is whole, the plain one stays.
    CONVERTING = "converting"


class ErrorKind(enum.StrEnum):
    """What went wrong with a pair, as a household member says it (the details go apart)."""

    UNREACHABLE = "unreachable"  # the friend's node does not answer
    NOT_ADDED = "not_added"  # it answers, but has not added this node yet
    KEY_CHANGED = "key_changed"  # another key answers: nothing is sent
    NO_ROOM = "no_room"  # the quota they grant us, or their disk, is full
    DISK_MISSING = "disk_missing"  # this node's backup disk is away
    FOLDER_MISSING = "folder_missing"  # the folder to back up is missing or empty
    FILES_SKIPPED = "files_skipped"  # the sync went through, some files could not be sent
    HELD = "held"  # it would replace or delete most files there: waiting for the user
    FAILED = "failed"  # anything else: the details say what


class SyncState(enum.StrEnum):
    """What a folder × peer pair is doing."""

    IDLE = "idle"
    SCANNING = "scanning"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    ERROR = "error"


@dataclass(slots=True)
class PairStatus:
    """Live and remembered state of one folder × peer pair."""

    state: SyncState = SyncState.IDLE
    progress: Progress | None = None
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    # The first attempt ever: a pair that never succeeded is overdue counted from here.
    first_attempt: datetime | None = None
    failures: int = 0
    last_files_sent: int | None = None
    last_bytes_sent: int | None = None
    last_duration: float | None = None
    last_error: str | None = None
    last_error_kind: ErrorKind | None = None
    quota_refused: bool = False
    # Whether the friend's copy is sealed: as the index knows it, else as the folder is set
    # up (what the first sync makes). Read from the index at start and after every run.
    sealed: bool = False
    # A conversion was started and its plain copy is not gone yet: the next sync goes on.
    converting: bool = False
    # The last verify that ran to its end, and what it found and repaired.
    last_verify: datetime | None = None
    last_verify_checked: int | None = None
    last_verify_damaged: int | None = None
    last_verify_repaired: int | None = None
    # When the scheduled verify comes next (None: never, or not before a first sync).
    next_verify: datetime | None = None

    @property
    def encryption(self) -> Encryption:
        """What the friend's copy is."""
        if self.converting:
            return Encryption.CONVERTING
        return Encryption.ENCRYPTED if self.sealed else Encryption.PLAIN

    def as_stored(self) -> dict[str, Any]:
        """What survives a restart."""
        return {
            "converting": self.converting,
            "last_verify": _iso(self.last_verify),
            "last_verify_checked": self.last_verify_checked,
            "last_verify_damaged": self.last_verify_damaged,
            "last_verify_repaired": self.last_verify_repaired,
            "last_success": _iso(self.last_success),
            "last_attempt": _iso(self.last_attempt),
            "first_attempt": _iso(self.first_attempt),
            "failures": self.failures,
            "last_files_sent": self.last_files_sent,
            "last_bytes_sent": self.last_bytes_sent,
            "last_duration": self.last_duration,
            "last_error": self.last_error,
            "last_error_kind": self.last_error_kind.value if self.last_error_kind else None,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> PairStatus:
        """Rebuild from what ``as_stored`` returned."""
        last_error = data.get("last_error")
        try:
            kind: ErrorKind | None = ErrorKind(str(data.get("last_error_kind")))
        except ValueError:  # stored by an older version, or no error
            kind = ErrorKind.FAILED if last_error else None
        status = cls(
            last_success=_parse(data.get("last_success")),
            last_attempt=_parse(data.get("last_attempt")),
            first_attempt=_parse(data.get("first_attempt")),
            failures=int(data.get("failures") or 0),
            last_files_sent=data.get("last_files_sent"),
            last_bytes_sent=data.get("last_bytes_sent"),
            last_duration=data.get("last_duration"),
            last_error=last_error,
            last_error_kind=kind,
            converting=bool(data.get("converting")),
            last_verify=_parse(data.get("last_verify")),
            last_verify_checked=data.get("last_verify_checked"),
            last_verify_damaged=data.get("last_verify_damaged"),
            last_verify_repaired=data.get("last_verify_repaired"),
        )
        if status.failures:
            status.state = SyncState.ERROR
        return status


@dataclass(slots=True)
class PeerStatus:
    """What we know of a peer's reachability and of our space on its disk."""

    reachability: Reachability | None = None
    last_seen: datetime | None = None
    # Since when every attempt to reach the peer failed (None while it answers).
    down_since: datetime | None = None
    last_probe: datetime | None = None
    used_there: int | None = None
    quota_there: int | None = None
    error: str | None = None
    presented_key: str | None = None

    def as_stored(self) -> dict[str, Any]:
        """What survives a restart."""
        return {
            "reachability": self.reachability.value if self.reachability else None,
            "error": self.error,
            "last_seen": _iso(self.last_seen),
            "down_since": _iso(self.down_since),
            "used_there": self.used_there,
            "quota_there": self.quota_there,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> PeerStatus:
        """Rebuild from what ``as_stored`` returned.

        The last test's outcome comes back too: after a restart (or a reload, at every
        change of a peer or folder) the peer's entities show what was last known until the
        next test, instead of going through "unknown".
        """
        try:
            reachability: Reachability | None = Reachability(str(data.get("reachability")))
        except ValueError:  # not stored (an older version) or not known here
            reachability = None
        return cls(
            reachability=reachability,
            error=data.get("error"),
            last_seen=_parse(data.get("last_seen")),
            down_since=_parse(data.get("down_since")),
            used_there=data.get("used_there"),
            quota_there=data.get("quota_there"),
        )


@dataclass(slots=True)
class SyncData:
    """Everything the sync entities show: pairs by (folder id, peer id), peers by id."""

    pairs: dict[Pair, PairStatus] = field(default_factory=dict)
    peers: dict[str, PeerStatus] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SyncContext:
    """What the parts of one node's sync manager share (each keeps its own collaborators)."""

    hass: HomeAssistant
    entry_id: str
    node: ThreadedNode
    folders: dict[str, FolderSetup]
    peers: dict[str, PeerConfig]
    data: SyncData
    # Where changes of ``data`` go: saved for the next start, told to the entities.
    store: SyncStore
    updates: EntityUpdates

    @property
    def pairs(self) -> list[Pair]:
        """Every (folder id, peer id) that should be synced."""
        return pairs_of(self.folders, self.peers)


def pair_key(folder_id: str, peer_id: str) -> str:
    """The storage key of a pair."""
    return f"{folder_id}|{peer_id}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
