"""What push, restore and verify share: the words of a run, its tuning, its results.

A run is one push, restore or verify of one folder with one peer (a ``PeerTarget``). While it
goes it reports a ``Progress`` (throttled by a ``Reporter``); at the end it returns a result
(``PushResult``, ``RestoreResult``, ``VerifyResult``, each a ``RunResult``) that the command
line prints as JSON and Home Assistant turns into events and sensors. The rules for folder
names and sub-paths live here too, since every run and the HA layer's input checks use them.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
import enum
import os
import time
from typing import TYPE_CHECKING, Any

from ..errors import SourceMissing

if TYPE_CHECKING:
    from .client import PeerLink

# --- tuning: every run's numbers, in one place -------------------------------------------

# Files up to this size travel whole in one PUT (the batched path) and come back whole on
# restore; larger ones stream in pieces.
SMALL_FILE = 1024 * 1024
# A worker thread hands its work to the event loop this many files (or bytes) at a time...
BATCH_FILES = 256
BATCH_BYTES = 4 * 1024 * 1024
# ... and may be this many batches ahead of it.
QUEUE_BATCHES = 4
# Progress reaches the callback at most this often (seconds); the final report always.
PROGRESS_INTERVAL = 0.25
# Errors (and verify's examples) kept word for word; more are only counted.
MAX_REPORTED = 100


class Phase(enum.StrEnum):
    """What a run is doing."""

    CONNECTING = "connecting"
    SCANNING = "scanning"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    RESTORING = "restoring"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """A peer to replicate to: its stable id (the index key), addresses and pinned key.

    ``dial``, when set, opens the link instead (``client.open_link``): a node's own way to
    the peer, learned addresses and reverse channels included.
    """

    id: str
    addresses: tuple[str, ...]
    public_key: str
    dial: Callable[[], Awaitable[PeerLink]] | None = field(default=None, compare=False)


@dataclass(slots=True)
class Progress:
    """Where a run stands. Totals grow while the scan is still running."""

    phase: Phase = Phase.CONNECTING
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    scan_complete: bool = False

    @property
    def percent(self) -> float | None:
        """Share of the bytes (or files) done, once the totals are known."""
        if not self.scan_complete:
            return None
        if self.bytes_total:
            return round(100.0 * self.bytes_done / self.bytes_total, 1)
        if self.files_total:
            return round(100.0 * self.files_done / self.files_total, 1)
        return 100.0


type ProgressCallback = Callable[[Progress], None]


class Reporter:
    """Hands a run's ``state`` to its callback, at most every PROGRESS_INTERVAL seconds."""

    __slots__ = ("_callback", "_last", "state")

    def __init__(self, state: Progress, callback: ProgressCallback | None) -> None:
        self.state = state
        self._callback = callback
        self._last = 0.0

    def __call__(self, *, force: bool = False) -> None:
        """Report now if the last report is old enough (or ``force``)."""
        if self._callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._callback(self.state)

    def done(self) -> None:
        """Report the end of the run (always)."""
        self.state.phase = Phase.DONE
        self.state.scan_complete = True
        self(force=True)


# --- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    """What every run reports: its folder and how long it took, as plain data."""

    folder: str
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data (the command line prints it as JSON)."""
        data: dict[str, Any] = asdict(self)
        data["seconds"] = round(data["seconds"], 3)
        return data

    @staticmethod
    def _keep(texts: list[str], text: str) -> None:
        """Keep ``text`` word for word while fewer than MAX_REPORTED are kept."""
        if len(texts) < MAX_REPORTED:
            texts.append(text)


@dataclass(slots=True)
class PushResult(RunResult):
    """What one push did."""

    files_sent: int = 0
    bytes_sent: int = 0
    files_deleted: int = 0
    dirs_updated: int = 0
    files_total: int = 0
    bytes_total: int = 0
    files_changed_during_read: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    # False when nothing had changed and the run did not connect (``connect_if_unchanged``).
    peer_contacted: bool = False
    # A conversion (``push.convert``) moved the plain copy to the host's trash.
    replaced_plain: bool = False

    def add_error(self, message: str) -> None:
        """Keep the first errors word for word, count them all."""
        self._keep(self.errors, message)
        self.error_count += 1


@dataclass(slots=True)
class RestoreResult(RunResult):
    """What a restore wrote, and the files it refused (they failed authentication)."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, path: builtins.bytes, why: str) -> None:
        """Count a file left out, keeping the first ones by name."""
        self.failed += 1
        self._keep(self.failures, f"{os.fsdecode(path)}: {why}")


@dataclass(slots=True)
class VerifyResult(RunResult):
    """What verify found (and repaired): three findings, told apart (see ``verify``).

    ``host_damaged``: the host's copy is not what was sent (or holds what never was);
    ``unsent``: local changes the next push sends; ``local_rot``: local files whose content
    changed while their size and mtime did not. ``checked`` counts the files whose host copy
    was compared with the index.
    """

    checked: int = 0
    host_damaged: int = 0
    unsent: int = 0
    local_rot: int = 0
    repaired: int = 0
    # True once a repair push went through without errors: the host holds what was sent.
    repair_complete: bool = False
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when the host holds what was sent and no local file rotted.

        Changes not sent yet do not count: they are the next push's ordinary work.
        """
        return not (self.host_damaged or self.local_rot)

    def note(self, kind: str, path: builtins.bytes, why: str) -> None:
        """Remember an example of a finding."""
        self._keep(self.examples, f"{kind}: {os.fsdecode(path)} ({why})")

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data, ``clean`` included."""
        return {**RunResult.as_dict(self), "clean": self.clean}


# --- names and paths -------------------------------------------------------------------------


# Beside the replicas, our space at a peer holds the backup area (``backup_area.AREA``):
# no folder may take its name (in any case: a friend's disk may ignore case).
RESERVED_FOLDER = ".ha-backups"


def check_folder_name(folder: str) -> bytes:
    """Return a folder name as the first path component of its replica, or raise ValueError."""
    raw = os.fsencode(folder)
    if (
        not raw
        or b"/" in raw
        or b"\0" in raw
        or raw in (b".", b"..")
        or raw.startswith(b".mynas")
        or len(raw) > 255
    ):
        raise ValueError(f"{folder!r} cannot name a folder: use a plain name without '/'")
    if folder.casefold() == RESERVED_FOLDER:
        raise ValueError(f"{folder!r} is reserved for Home Assistant's own backups")
    return raw


def check_subpath(path: str | bytes) -> bytes:
    """Return a sub-path of a folder as relative bytes, or raise ValueError."""
    raw = os.fsencode(path).strip(b"/")
    parts = raw.split(b"/") if raw else []
    if any(part in (b"", b".", b"..") or b"\0" in part for part in parts):
        raise ValueError(f"{os.fsdecode(raw)!r} is not a path inside the folder")
    return raw


def remote_path(folder: bytes, path: bytes) -> bytes:
    """Return where ``path`` of a folder is on the host (the folder itself for an empty path)."""
    return folder + b"/" + path if path else folder


def check_source(source: str | os.PathLike[str]) -> bytes:
    """Return the folder to back up as an absolute bytes path, or raise SourceMissing."""
    path = os.fsencode(os.path.abspath(source))
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise SourceMissing(os.fsdecode(path))
    return path
