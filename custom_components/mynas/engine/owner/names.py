"""Sealed names: what an encrypted replica's files and folders are called on the host.

Each path component is encrypted on its own with AES-SIV (deterministic authenticated
encryption: the same name in the same directory always gives the same stored name, which is
what lets a push address a file it sent before without a lookup table). The associated data
is the component's plain parent path inside the jail (``Docs/2024``; the folder's own name
has the jail root, ``b""``): a name moved by the host into another directory, or two entries
swapped, no longer decrypts there. The folder's own name is sealed too, so the host learns
no folder name either. Encoding: RFC 4648 base32, lower case, unpadded (``a-z2-7``): safe on
case-insensitive file systems and never starting with ``.``.

Long names. A sealed name is 16 bytes longer than the plain one and base32 makes 8
characters of 5 bytes: plain names up to 143 bytes fit in the 255 bytes ext4 allows. Longer
ones (a plain name may have 255 bytes) are split into *continuation* segments: every segment
but the last is a directory named ``~`` + 254 characters, the last segment is the entry
itself (``~aaaa…/bbbb…``). ``~`` is not a base32 character, so a continuation can never be
taken for a name. Why this rather than gocryptfs-style hashed names with the full name in
a side file: it keeps exactly one stored file per source file, so the host's quota, trash,
atomic rename and resumable uploads, and the restore of a sub-path, work unchanged; the cost
is one extra directory per long name on the host, which ``stored_top`` names so a deletion
sends the whole continuation to the trash. Two different long names never share a first
segment (it starts with the SIV tag). Stored paths must still fit the host's 4,096 bytes:
a deep tree of long names may not (such a file is refused by the host and reported).
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ..errors import MyNasError

MAX_NAME = 255  # bytes of one stored component (ext4, and the host's own limit)
CONTINUATION = b"~"
_SEGMENT = MAX_NAME - len(CONTINUATION)
_AD = b"mynas/v1/name\0"
_BASE32 = frozenset(b"abcdefghijklmnopqrstuvwxyz234567")
_CACHE = 4096  # sealed directory paths remembered (a scan visits one directory at a time)


class NameTampered(MyNasError):
    """A stored name that does not decrypt where it is: altered, moved, or not ours."""

    def __init__(self, stored: bytes) -> None:
        self.stored = stored
        shown = stored[:60].decode("ascii", "backslashreplace")
        super().__init__(
            f"the host holds a name that does not decrypt where it is ({shown}...): it was "
            "altered or moved on the host"
        )


def _encode(data: bytes) -> bytes:
    return base64.b32encode(data).rstrip(b"=").lower()


def _decode(token: bytes) -> bytes | None:
    """Return the bytes of a canonical token, None if it is not one."""
    if not token or not _BASE32.issuperset(token):
        return None
    try:
        data = base64.b32decode(token.upper() + b"=" * (-len(token) % 8))
    except binascii.Error:
        return None
    return data if _encode(data) == token else None


def split(token: bytes) -> bytes:
    """Return a sealed name as stored: one component, or continuations then the last."""
    parts = []
    while len(token) > MAX_NAME:
        parts.append(CONTINUATION + token[:_SEGMENT])
        token = token[_SEGMENT:]
    parts.append(token)
    return b"/".join(parts)


class NameCipher:
    """Seals and opens the names of one node's encrypted replicas."""

    def __init__(self, key: bytes) -> None:
        """Use the 64-byte AES-SIV names key (``keys.DataKeys.names``)."""
        self._siv = AESSIV(key)
        self._dirs: dict[bytes, bytes] = {}  # plain jail path -> stored path, for directories

    def seal(self, parent: bytes, name: bytes) -> bytes:
        """Return the stored form of ``name`` in plain jail directory ``parent`` (b"": root)."""
        return split(_encode(self._siv.encrypt(name, [_AD + parent])))

    def open(self, parent: bytes, token: bytes) -> bytes:
        """Return the plain name a sealed token (continuations joined) stands for in ``parent``.

        NameTampered if it does not decrypt there.
        """
        data = _decode(token)
        if data is None or len(data) <= 16:
            raise NameTampered(token)
        try:
            return self._siv.decrypt(data, [_AD + parent])
        except InvalidTag:
            raise NameTampered(token) from None

    def folder(self, folder: bytes) -> bytes:
        """Return the stored path of a folder (the first component(s) of its replica)."""
        return self.path(folder)

    def path(self, plain: bytes) -> bytes:
        """Return the stored jail path of a plain jail path (``Docs/2024/beach.jpg``)."""
        parent, _, name = plain.rpartition(b"/")
        if not parent:
            return self.seal(b"", name)
        stored_parent = self._dirs.get(parent)
        if stored_parent is None:
            stored_parent = self.path(parent)
            if len(self._dirs) >= _CACHE:
                self._dirs.clear()
            self._dirs[parent] = stored_parent
        return stored_parent + b"/" + self.seal(parent, name)

    def top(self, plain: bytes) -> bytes:
        """Return the stored path to delete for ``plain``: its first continuation, if any."""
        parent, _, name = plain.rpartition(b"/")
        first = self.seal(parent, name).partition(b"/")[0]
        return self.path(parent) + b"/" + first if parent else first


class StoredTree:
    """Turns a sealed replica's listing back into plain paths, entry by entry.

    The host lists in canonical order, so a directory always comes before what it holds: a
    stack of the directories above the current entry is all that is remembered.
    """

    def __init__(self, cipher: NameCipher, folder: bytes) -> None:
        """Read the listing of the replica of plain ``folder``."""
        self._cipher = cipher
        self.folder = folder
        self.root = cipher.folder(folder)
        # (stored path, plain folder-relative path, sealed token so far: continuations)
        self._stack: list[tuple[bytes, bytes, bytes]] = []

    def _jail(self, rel: bytes) -> bytes:
        return self.folder + b"/" + rel if rel else self.folder

    def start_at(self, rel: bytes) -> bytes:
        """Read a listing of sub-path ``rel``; return its stored path.

        The listing does not hold ``rel``'s parents: they are put on the stack here.
        """
        self._stack.clear()
        parent, _, name = rel.rpartition(b"/")
        plain = b""
        for part in parent.split(b"/") if parent else []:
            plain = plain + b"/" + part if plain else part
            self._stack.append((self._cipher.path(self._jail(plain)), plain, b""))
        stored_parent = self._stack[-1][0] if self._stack else self.root
        segments = self._cipher.seal(self._jail(parent), name).split(b"/")
        if len(segments) > 1:  # the entry's own continuations
            prefix = stored_parent + b"/" + b"/".join(segments[:-1])
            pending = b"".join(segment[len(CONTINUATION) :] for segment in segments[:-1])
            self._stack.append((prefix, parent, pending))
        return stored_parent + b"/" + b"/".join(segments)

    def plain(self, stored: bytes, is_dir: bool) -> bytes | None:
        """Return the folder-relative plain path of a listed jail path.

        ``b""`` is the folder itself; None is a continuation directory (no entry of its
        own). NameTampered if the name does not decrypt in its place.
        """
        if stored == self.root:
            return b""
        if not stored.startswith(self.root + b"/"):
            raise NameTampered(stored)
        stack = self._stack
        while stack and not stored.startswith(stack[-1][0] + b"/"):
            stack.pop()
        parent_stored, parent_plain, pending = stack[-1] if stack else (self.root, b"", b"")
        name = stored[len(parent_stored) + 1 :]
        if b"/" in name:
            raise NameTampered(stored)  # its directory was never listed
        if name.startswith(CONTINUATION):
            if not is_dir:
                raise NameTampered(stored)
            stack.append((stored, parent_plain, pending + name[len(CONTINUATION) :]))
            return None
        where = self.folder + b"/" + parent_plain if parent_plain else self.folder
        plain_name = self._cipher.open(where, pending + name)
        if b"/" in plain_name or plain_name in (b".", b".."):
            raise NameTampered(stored)
        path = parent_plain + b"/" + plain_name if parent_plain else plain_name
        if is_dir:
            stack.append((stored, path, b""))
        return path
