"""What a peer may name on this host: peer names and jail-relative paths (syntax only).

Every path a peer sends is relative ``bytes``; ``check_path`` refuses traversal, absolute
paths, NUL, over-long names and paths, deep trees and any component starting with
``.mynas`` (docs/architecture.md, invariant 2). Nothing here looks at the disk: ``jailfs.JailFS``
does that, on every existing component, once a path has passed these rules.
"""

from __future__ import annotations

from typing import NoReturn
import unicodedata

from ..errors import PathRefused, ProtocolError
from ..storage_root import INTERNAL_DIR

MAX_NAME = 255
MAX_PATH = 4096
MAX_DEPTH = 256  # every walk here recurses; real backups are far shallower
MAX_PEER_NAME = 64

_INTERNAL = INTERNAL_DIR.encode()
_MTIME_RANGE = range(-(1 << 63), 1 << 63)


def validate_peer_name(name: str) -> str:
    """Return ``name`` if it can name a peer's folders on disk; raise ValueError otherwise."""
    if not 1 <= len(name) <= MAX_PEER_NAME:
        raise ValueError(f"a peer name has 1 to {MAX_PEER_NAME} characters, not {len(name)}")
    if name.startswith("."):
        raise ValueError(f"a peer name cannot start with '.': {name!r}")
    if "/" in name:
        raise ValueError(f"a peer name cannot contain '/': {name!r}")
    # isprintable() is False for NUL, control, format (bidi, zero-width) and surrogate
    # characters: names must look like what they are.
    if not name.isprintable():
        raise ValueError(f"a peer name cannot contain control or invisible characters: {name!r}")
    if len(name.encode()) > MAX_NAME:
        raise ValueError(f"a peer name takes at most {MAX_NAME} bytes in UTF-8: {name!r}")
    return name


def fold(name: str) -> str:
    """Return the form of a peer name under which two names would share a folder."""
    # Names that differ only in case or Unicode form would share a folder on some disks.
    return unicodedata.normalize("NFKC", name).casefold()


def check_path(rel: bytes) -> bytes:
    """Return ``rel`` if it is an acceptable jail-relative path; raise PathRefused otherwise.

    Purely syntactic: the disk is not looked at (``Jail.resolve`` does that).
    """
    if (
        # The common case in one pass of C: short enough that no component (nor the depth)
        # can be over a limit, and no empty component nor one that starts with '.'.
        0 < len(rel) <= MAX_NAME
        and b"\0" not in rel
        and b"//" not in rel
        and b"/." not in rel
        and rel[0] not in b"/."
        and rel[-1] != 0x2F  # '/'
    ):
        return rel
    if not rel:
        refuse(rel, "the path is empty")
    if len(rel) > MAX_PATH:
        refuse(rel, f"the path is longer than {MAX_PATH} bytes")
    if b"\0" in rel:
        refuse(rel, "the path contains a NUL byte")
    if rel.startswith(b"/"):
        refuse(rel, "absolute paths are not allowed")
    if rel.endswith(b"/"):
        refuse(rel, "the path ends with '/'")
    names = rel.split(b"/")
    if len(names) > MAX_DEPTH:
        refuse(rel, f"the path is more than {MAX_DEPTH} levels deep")
    for name in names:
        if not name:
            refuse(rel, "the path has an empty component ('//')")
        if name in (b".", b".."):
            refuse(rel, "'.' and '..' components are not allowed")
        if len(name) > MAX_NAME:
            refuse(rel, f"a component is longer than {MAX_NAME} bytes")
        if name.startswith(_INTERNAL):
            refuse(rel, f"names starting with {INTERNAL_DIR!r} are reserved")
    return rel


def is_internal(path: bytes, _is_dir: bool) -> bool:
    """Return whether the last component of ``path`` is a reserved name (``tree.walk``'s skip)."""
    return path.rpartition(b"/")[2].startswith(_INTERNAL)


def show(rel: bytes) -> str:
    """Return a short printable form of a peer path for messages and logs."""
    text = repr(rel[:120].decode("utf-8", "backslashreplace"))
    return text + "..." if len(rel) > 120 else text


def refuse(rel: bytes, why: str) -> NoReturn:
    """Raise PathRefused for ``rel``, saying why."""
    raise PathRefused(f"refused path {show(rel)}: {why}")


def check_mtime(rel: bytes, mtime_ns: int) -> None:
    """Raise ProtocolError if ``mtime_ns`` cannot be a file's modification time."""
    if mtime_ns not in _MTIME_RANGE:
        raise ProtocolError(f"modification time out of range for {show(rel)}: {mtime_ns}")


def file_mode(mode: int) -> int:
    """Return the mode a file sent with ``mode`` gets on this host."""
    # Only the owner-exec bit is kept, as information: no s-bits, sticky or odd permissions.
    return 0o755 if mode & 0o100 else 0o644
