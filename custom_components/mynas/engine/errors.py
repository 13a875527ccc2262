"""What can go wrong in MyNAS, as distinct types that say what happened.

Every message is a full sentence a person can act on. The Home Assistant layer maps these
types to translated errors and repair issues; the command line prints ``str(err)``.
"""

from __future__ import annotations

from .units import format_bytes


class MyNasError(Exception):
    """Base class of every error the engine raises on purpose."""


# --- the peer, as seen by the side that connects -----------------------------------------


class PeerError(MyNasError):
    """Something about talking to a peer."""


class HostKeyMismatch(PeerError):
    """The peer presented another host key than the pinned one; nothing was sent."""

    def __init__(
        self,
        address: str,
        expected: str,
        presented: str | None,
        presented_key: str | None = None,
    ) -> None:
        self.address = address
        self.expected = expected
        self.presented = presented
        # The full public key line, so the user can choose to trust it (after checking).
        self.presented_key = presented_key
        super().__init__(
            f"{address} presented host key {presented or 'unknown'}, not the pinned "
            f"{expected}: nothing was sent. If your friend really changed keys, confirm the "
            "new one; otherwise someone may be impersonating them."
        )


class AuthRefused(PeerError):
    """The peer does not accept our key: it has not added us (yet)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__(
            f"{address} refused our key: the other side has not added this node yet "
            "(paste our invite code there)."
        )


class PeerUnreachable(PeerError):
    """No connection: the peer is offline, the address is wrong or the port is closed."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot reach {address}: {reason}")


class ProtocolError(PeerError):
    """The other side broke the replication protocol."""


# --- space on the host ---------------------------------------------------------------------


class QuotaExceeded(MyNasError):
    """The host's quota for us is too small for what must be stored."""

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            f"quota exceeded: {format_bytes(needed)} needed, {format_bytes(available)} left"
        )


class PeerDiskFull(MyNasError):
    """The host's disk itself is full (its quota for us may still have room)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("the peer's disk is full" + (f": {detail}" if detail else ""))


class HostRefused(MyNasError):
    """The host refused one request (a path it won't accept, a file that isn't there...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)

    @property
    def nothing_there(self) -> bool:
        """True when the host holds nothing at the path asked for (no such folder or file)."""
        from .protocol import FailCode  # noqa: PLC0415 - protocol imports this module

        return self.code == FailCode.MISSING


class PathRefused(MyNasError):
    """A path a peer sent is not acceptable (traversal, symlink, internal name, too long...)."""


# --- this node -----------------------------------------------------------------------------


class SourceMissing(MyNasError):
    """The local folder to back up is missing, unreadable, or empty when it should not be."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"the folder to back up {reason}: {path}"
            if reason
            else f"the folder to back up is missing or unreadable: {path}"
        )


class RestoreConflict(MyNasError):
    """Restoring would overwrite existing files and overwriting was not asked for."""

    def __init__(self, target: str, example: str, count: int) -> None:
        self.target = target
        self.example = example
        self.count = count
        super().__init__(
            f"{count} file(s) already exist in {target} (for example {example}); "
            "nothing was overwritten. Restore into an empty folder or allow overwriting."
        )


class InvalidInvite(MyNasError):
    """An invite code that cannot be read: mistyped, truncated, or not a MyNAS code."""


class KeyFileError(MyNasError):
    """A key file is missing, unreadable, or not an Ed25519 key."""


# --- archives in the backup area (owner/backup_area.py) ----------------------------------


class BackupMissing(MyNasError):
    """The peer holds no (complete) backup of that id in our backup area."""

    def __init__(self, backup_id: str) -> None:
        self.backup_id = backup_id
        super().__init__(f"the peer holds no backup {backup_id}")


class BackupSizeMismatch(MyNasError):
    """A backup's stream brought another number of bytes than announced; nothing was kept."""

    def __init__(self, backup_id: str, announced: int, received: int) -> None:
        self.backup_id = backup_id
        self.announced = announced
        self.received = received
        brought = f"at least {received}" if received > announced else str(received)
        super().__init__(
            f"backup {backup_id} was announced as {announced} bytes but its stream brought "
            f"{brought}: nothing was kept at the peer"
        )


# --- a push that waits for the user (owner/feed.py) ------------------------------------


class MassChangeHeld(MyNasError):
    """A push would replace or delete too much of what the peer holds: nothing was sent.

    Ransomware, or a whole library moved by mistake, rewrites most files at once; sending
    that would fill the friend's trash with the old versions. The run waits until the user
    says to send it (a push with the guard lifted).
    """

    def __init__(
        self,
        folder: str,
        *,
        replaced: int,
        deleted: int,
        total: int,
        percent: int,
        examples: tuple[str, ...] = (),
    ) -> None:
        self.folder = folder
        self.replaced = replaced
        self.deleted = deleted
        self.total = total
        self.percent = percent
        self.examples = examples
        share = round(100 * (replaced + deleted) / total) if total else 0
        super().__init__(
            f"held: this sync of {folder} would replace {replaced} and delete {deleted} of "
            f"the {total} file(s) the peer holds ({share} %, more than {percent} %); "
            "nothing was sent — send it only if this change is wanted"
        )
