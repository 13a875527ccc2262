"""The storage root: the folder on the USB disk that MyNAS owns.

It carries a marker file (``.mynas/node.json``) naming the node, so a later start can tell
"the disk is missing or another disk is mounted here" from "this is our disk". It also
says what the disk already holds for peers (names taken, jails a removed peer left).
Everything in this module does blocking file I/O: call it from a worker thread, never from
an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
import enum
import json
import os
from pathlib import Path
import uuid

import psutil

INTERNAL_DIR = ".mynas"
MARKER_FILE = "node.json"
MARKER_FORMAT = 1


class RootProblem(enum.StrEnum):
    """Why a path cannot become (or no longer is) a usable storage root."""

    NOT_ABSOLUTE = "not_absolute"
    NOT_FOUND = "not_found"
    NOT_A_DIRECTORY = "not_a_directory"
    NOT_WRITABLE = "not_writable"
    SAME_DISK = "same_disk"
    MARKER_MISSING = "marker_missing"
    FOREIGN_MARKER = "foreign_marker"


class StorageRootError(Exception):
    """The storage root is unusable; ``problem`` says why in one word."""

    def __init__(self, problem: RootProblem, path: str | os.PathLike[str]) -> None:
        self.problem = problem
        self.path = os.fspath(path)
        super().__init__(f"{_DESCRIPTIONS[problem]}: {self.path}")


_DESCRIPTIONS = {
    RootProblem.NOT_ABSOLUTE: "storage root must be an absolute path",
    RootProblem.NOT_FOUND: "storage root does not exist (is the disk mounted?)",
    RootProblem.NOT_A_DIRECTORY: "storage root is not a directory",
    RootProblem.NOT_WRITABLE: "storage root is not writable",
    RootProblem.SAME_DISK: "storage root is on the same disk as the system, not a separate disk",
    RootProblem.MARKER_MISSING: (
        "storage root has no MyNAS marker: the disk is not mounted or another disk is there"
    ),
    RootProblem.FOREIGN_MARKER: "storage root belongs to another MyNAS node (another disk?)",
}


@dataclass(frozen=True, slots=True)
class Marker:
    """What the marker file records about the node that owns a storage root."""

    node_id: str
    node_name: str


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """Space on the filesystem holding the storage root, in bytes (as ``df`` reports it)."""

    total: int
    used: int
    free: int

    @property
    def percent(self) -> float:
        """Used share of the space open to users, like ``df``'s Use% (reserved blocks left out)."""
        available = self.used + self.free
        return round(100.0 * self.used / available, 1) if available else 0.0


def marker_path(root: str | os.PathLike[str]) -> Path:
    """Return the path of the marker file under ``root``."""
    return Path(root, INTERNAL_DIR, MARKER_FILE)


def new_node_id() -> str:
    """Return a fresh random node id."""
    return uuid.uuid4().hex


def check_new_root(root: str, config_dir: str | os.PathLike[str], *, allow_same_disk: bool) -> Path:
    """Validate a path the user offers as a storage root; return it resolved.

    Raises StorageRootError naming the first problem found. Being on the same filesystem
    as Home Assistant's config dir usually means the USB disk is not mounted and data
    would fill the SD card, so it is refused unless the user says they know.
    """
    path = Path(root)
    if not path.is_absolute():
        raise StorageRootError(RootProblem.NOT_ABSOLUTE, root)
    if not path.exists():
        raise StorageRootError(RootProblem.NOT_FOUND, root)
    if not path.is_dir():
        raise StorageRootError(RootProblem.NOT_A_DIRECTORY, root)
    path = path.resolve()
    if not _is_writable(path):
        raise StorageRootError(RootProblem.NOT_WRITABLE, root)
    if not allow_same_disk and same_filesystem(path, config_dir):
        raise StorageRootError(RootProblem.SAME_DISK, root)
    return path


def _is_writable(path: Path) -> bool:
    # os.access lies for root on read-only mounts; a real probe does not.
    probe = path / f".mynas-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def same_filesystem(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Return True when both paths live on the same filesystem."""
    return Path(a).stat().st_dev == Path(b).stat().st_dev


def filesystem_identity(root: str | os.PathLike[str]) -> str:
    """Return a stable id for the storage root: its filesystem's id plus its real path.

    statvfs's f_fsid comes from the filesystem UUID on ext4/btrfs/xfs, so the same disk keeps
    the same id across reboots and USB ports, unlike st_dev.
    """
    real = os.path.realpath(root)
    return f"{os.statvfs(real).f_fsid:x}:{real}"


def read_marker(root: str | os.PathLike[str]) -> Marker | None:
    """Return the marker of ``root``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(marker_path(root).read_text(encoding="utf-8"))
        return Marker(node_id=str(data["node_id"]), node_name=str(data["node_name"]))
    except OSError, ValueError, KeyError, TypeError:
        return None


def write_marker(root: str | os.PathLike[str], marker: Marker) -> None:
    """Write (or rewrite) the marker atomically and durably."""
    path = marker_path(root)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    payload = {"format": MARKER_FORMAT, "node_id": marker.node_id, "node_name": marker.node_name}
    write_file_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def claim_root(root: str | os.PathLike[str], node_name: str) -> Marker:
    """Make ``root`` ours: keep the node id of an existing marker (a reinstall), or create one."""
    existing = read_marker(root)
    marker = Marker(node_id=existing.node_id if existing else new_node_id(), node_name=node_name)
    if marker != existing:
        write_marker(root, marker)
    return marker


def check_root(root: str | os.PathLike[str], node_id: str) -> None:
    """Confirm ``root`` is still the disk this node set up; raise StorageRootError if not."""
    path = Path(root)
    if not path.is_dir():
        raise StorageRootError(RootProblem.NOT_FOUND, root)
    marker = read_marker(path)
    if marker is None:
        raise StorageRootError(RootProblem.MARKER_MISSING, root)
    if marker.node_id != node_id:
        raise StorageRootError(RootProblem.FOREIGN_MARKER, root)


def open_root(root: str | os.PathLike[str], node_id: str, node_name: str) -> None:
    """Check ``root`` at start and keep the marker's node name in step with the config."""
    check_root(root, node_id)
    marker = Marker(node_id=node_id, node_name=node_name)
    if read_marker(root) != marker:
        write_marker(root, marker)


def disk_usage(root: str | os.PathLike[str]) -> DiskUsage:
    """Return the usage of the filesystem holding ``root``, as ``df`` computes it."""
    usage = psutil.disk_usage(os.fspath(root))
    return DiskUsage(total=usage.total, used=usage.used, free=usage.free)


def measure_root(root: str | os.PathLike[str], node_id: str) -> DiskUsage:
    """Confirm ``root`` is still this node's disk (``check_root``), then measure it."""
    check_root(root, node_id)
    return disk_usage(root)


def names_on_disk(root: str | os.PathLike[str]) -> set[str]:
    """Names already used in ``root`` or in its per-peer internal folders.

    The jails, then each internal area (peers' state, trash, partial uploads...): a new
    peer must never get a name that would hand it what a removed peer left behind.
    """
    names: set[str] = set()
    internal = Path(root, INTERNAL_DIR)
    try:
        folders = [Path(root), *(area for area in internal.iterdir() if area.is_dir())]
        for folder in folders:
            names.update(child.name for child in folder.iterdir())
    except OSError:
        pass
    return names


def jails_on_disk(root: str | os.PathLike[str]) -> dict[str, int]:
    """Peers' jails under ``root`` and the space each used when last recorded.

    A directory counts as a jail only if MyNAS keeps state for it (``.mynas/peers/<name>/``,
    written by the hosted space): the household's own folders beside the jails never do.
    Damaged or missing state counts as nothing used.
    """
    peers_dir = Path(root, INTERNAL_DIR, "peers")
    found: dict[str, int] = {}
    if not peers_dir.is_dir():
        return found
    for state_dir in peers_dir.iterdir():
        if not (Path(root) / state_dir.name).is_dir():
            continue
        try:
            used = int(json.loads((state_dir / "state.json").read_text()).get("used", 0))
        except OSError, ValueError, AttributeError:
            used = 0
        found[state_dir.name] = used
    return found
