"""What a replica looks like on the host: a plain mirror, or sealed (encrypted).

A ``Layout`` answers, for one folder, every question a run asks about the host's copy:
where an entry is stored, what to delete to remove it, which mtime and mode the host's
file gets, and what bytes a small file is stored as. Push, restore and verify ask it and
never care which of the two it is.

- ``PlainLayout``: ``<jail>/<folder>/<path>``, the same bytes, mtimes and exec bits
  (readable with standard tools; for friends who want that, ``push --plain``).
- ``SealedLayout``: every name sealed (``names.py``), every file sealed (``sealed.py``),
  with its mtime and exec bit inside. The host's files all get mtime 0 and mode 0644, and
  its directories the time they last changed there: the host learns sizes, the number of
  files, the shape of the tree and when things change — no name, no content, no mtime.
  Directories' own mtimes are not kept (a restore gives them the restore's time).

A replica is one or the other for good: ``Index.sealed`` remembers which, and push refuses
to send the other way (``ReplicaKindMismatch``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MyNasError
from ..identity import Identity
from . import sealed as sealed_files
from .run import check_folder_name

if TYPE_CHECKING:
    from .keys import DataKeys
    from .names import NameCipher, StoredTree

# What a sealed replica's files look like on the host, whatever the plain file's.
SEALED_MTIME = 0
SEALED_MODE = 0o644


class ReplicaKindMismatch(MyNasError):
    """A push that would turn a plain replica into an encrypted one, or the reverse."""

    def __init__(self, folder: str, *, sealed: bool) -> None:
        self.folder = folder
        self.sealed = sealed
        if sealed:
            super().__init__(
                f"the peer holds an encrypted copy of {folder!r}: push it encrypted "
                "(without --plain); nothing was sent"
            )
        else:
            super().__init__(
                f"the peer holds a plain copy of {folder!r}: push it with --plain, or "
                "convert the copy first; nothing was sent"
            )


class PlainLayout:
    """A plain mirror: stored paths, bytes, mtimes and exec bits are the folder's own."""

    sealed = False

    def __init__(self, folder: str) -> None:
        """The replica of ``folder`` (a name ``check_folder_name`` accepts)."""
        self.name = folder
        self.folder = check_folder_name(folder)
        self.root = self.folder

    def stored(self, rel: bytes) -> bytes:
        """Return the jail path of the folder's entry ``rel`` (b"": the folder itself)."""
        return self.root + b"/" + rel if rel else self.root

    def top(self, rel: bytes) -> bytes:
        """Return the jail path to delete to remove entry ``rel``."""
        return self.stored(rel)

    def jail_path(self, rel: bytes) -> bytes:
        """Return the plain jail path of entry ``rel`` (what sealed contents are bound to)."""
        return self.folder + b"/" + rel if rel else self.folder

    @property
    def retention_name(self) -> str:
        """The host's name of the folder (its trash's retention is asked under it)."""
        return self.root.partition(b"/")[0].decode("utf-8", "surrogateescape")

    def host_mtime(self, mtime_ns: int) -> int:
        """Return the mtime the host's copy of a file gets."""
        return mtime_ns

    def host_mode(self, mode: int) -> int:
        """Return the mode the host's copy of a file gets."""
        return mode

    def dir_mtime(self, mtime_ns: int) -> int | None:
        """Return the mtime to give the host's copy of a directory (None: leave it)."""
        return mtime_ns

    def stored_size(self, size: int) -> int:
        """Return the host's size of a file of ``size`` bytes."""
        return size

    def plain_size(self, stored: int) -> int | None:
        """Return the file size a host's size stands for (None: no file gives it)."""
        return stored

    def seal(self, rel: bytes, mtime_ns: int, mode: int, data: bytes) -> bytes:
        """Return the bytes the host stores for small file ``rel`` holding ``data``."""
        return data


class SealedLayout(PlainLayout):
    """An encrypted replica: names and contents sealed with the node's data keys."""

    sealed = True

    def __init__(self, folder: str, keys: DataKeys) -> None:
        """The sealed replica of ``folder``, with ``keys``."""
        from .names import NameCipher  # noqa: PLC0415 - plain runs never load the ciphers

        super().__init__(folder)
        self.keys = keys
        self.names: NameCipher = NameCipher(keys.names)
        self.root = self.names.folder(self.folder)

    def stored(self, rel: bytes) -> bytes:
        """Return the sealed jail path of the folder's entry ``rel``."""
        return self.names.path(self.jail_path(rel))

    def top(self, rel: bytes) -> bytes:
        """Return the sealed jail path to delete: a long name's first continuation."""
        return self.names.top(self.jail_path(rel)) if rel else self.root

    def host_mtime(self, mtime_ns: int) -> int:
        """The host's files all get the same mtime: the real one is inside."""
        return SEALED_MTIME

    def host_mode(self, mode: int) -> int:
        """The host's files all get the same mode: the exec bit is inside."""
        return SEALED_MODE

    def dir_mtime(self, mtime_ns: int) -> int | None:
        """Directories keep the time they last changed on the host."""
        return None

    def stored_size(self, size: int) -> int:
        """Return the size of the sealed file of ``size`` plain bytes."""
        return sealed_files.stored_size(size)

    def plain_size(self, stored: int) -> int | None:
        """Return the plain size a sealed file of ``stored`` bytes holds."""
        return sealed_files.plain_size(stored)

    def seal(self, rel: bytes, mtime_ns: int, mode: int, data: bytes) -> bytes:
        """Return the sealed file of small file ``rel`` (a fresh random salt)."""
        meta = sealed_files.Meta(mtime_ns, mode, len(data))
        return sealed_files.seal(self.keys.contents, self.jail_path(rel), meta, data)

    def tree(self) -> StoredTree:
        """Return a reader of this replica's listing back into plain paths."""
        from .names import StoredTree  # noqa: PLC0415

        return StoredTree(self.names, self.folder)


def layout(identity: Identity, folder: str, *, sealed: bool) -> PlainLayout:
    """Return the layout of ``folder``'s replica, sealed with ``identity``'s keys or plain."""
    if not sealed:
        return PlainLayout(folder)
    from .keys import DataKeys  # noqa: PLC0415 - plain runs never derive keys

    return SealedLayout(folder, DataKeys.of(identity))


def other_root(identity: Identity, folder: str, *, sealed: bool) -> bytes:
    """Return where the replica of the other kind would be (push checks it is not there)."""
    return layout(identity, folder, sealed=not sealed).root
