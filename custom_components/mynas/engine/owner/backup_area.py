"""The backup area: archives of the host application kept at a peer (Home Assistant's own backups).

Our replica space at a peer holds one folder per protected folder and this reserved area
beside them, the folder ``.ha-backups`` — a name no protected folder may take
(``run.check_folder_name``). It holds flat, separate files, two per archive:

* ``<backup_id>.tar``: the archive, as the application streamed it;
* ``<backup_id>.json``: ``{"format": 1, "backup_id", "size", "metadata"}``, where
  ``metadata`` is whatever the application keeps about the archive (for Home Assistant,
  ``AgentBackup.as_dict()``). It is written after the archive is durable, so an archive is
  listed only once it is complete.

Sealed (the design's invariant 9: the host learns no name, no content): every name through
``names.NameCipher`` (the area's own name too, so the host cannot tell it from a folder),
every file through ``sealed.Sealer`` bound to its plain jail path
(``.ha-backups/<backup_id>.tar``), with the node's data keys (``keys.DataKeys``: from the key
file or the recovery code). The host sees a few files of some sizes, mtime 0, and when they
change; a byte flipped, a file truncated, or two backups swapped on its disk fail
authentication on the way back (``SealedFileError``) and are never handed out as good.
Sealing and opening run in worker threads, a chunk at a time.

They travel as any file of a replica does (``OPEN``/``DATA``/``CLOSE``, ``PUT``, ``READ``,
``LIST``, ``DELETE``: no frame of their own), so the host treats them as any replaced data:
counted in our quota, and an overwrite or a delete moves the old version to its trash,
which only the host purges after its retention (invariants 3 and 4) — a compromised node
cannot destroy its backups at a friend's at once.

Uploads never resume: each is sealed with a fresh random salt (and Home Assistant may
encrypt its archive on the fly, afresh at every attempt), so the bytes of an earlier attempt
cannot be reused. A partial an earlier attempt left at the host is dropped, not resumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
import contextlib
from dataclasses import dataclass
import functools
import json
import logging
import re
import time
from typing import Any

from ..errors import (
    BackupMissing,
    BackupSizeMismatch,
    HostRefused,
    MyNasError,
    PathRefused,
    ProtocolError,
)
from ..identity import Identity
from ..tree import Entry, Kind
from . import sealed
from .client import PeerLink, Upload, open_link
from .keys import DataKeys
from .names import NameCipher, NameTampered, StoredTree
from .run import PROGRESS_INTERVAL, RESERVED_FOLDER, PeerTarget

_LOGGER = logging.getLogger(__name__)

AREA = RESERVED_FOLDER
_AREA = AREA.encode()
FORMAT = 1
ARCHIVE_SUFFIX = ".tar"
METADATA_SUFFIX = ".json"
# What one archive's metadata may take (Home Assistant's is a few hundred bytes).
MAX_METADATA = 256 * 1024
_BACKUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
# What the host's copies show: the same for every file (the real ones are not worth keeping).
_HOST_MTIME = 0
_FILE_MODE = 0o644

type OpenStream = Callable[[], Awaitable[AsyncIterator[bytes]]]
type BytesCallback = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class StoredBackup:
    """One archive in the backup area: its id, its size there, the metadata kept with it."""

    backup_id: str
    size: int
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewBackup:
    """An archive to store: its id, the metadata kept with it, its exact size, its stream."""

    backup_id: str
    metadata: dict[str, Any]
    size: int
    open_stream: OpenStream


def check_backup_id(backup_id: str) -> str:
    """Return ``backup_id`` if it can name an archive's files; raise ValueError otherwise."""
    if not _BACKUP_ID.fullmatch(backup_id):
        raise ValueError(
            f"{backup_id!r} cannot name a backup: use 1 to 200 letters, digits, '_', '-' "
            "or '.', starting with a letter or a digit"
        )
    return backup_id


def _names(backup_id: str) -> tuple[bytes, bytes]:
    """Return the plain names of an archive and of its metadata in the area."""
    name = check_backup_id(backup_id).encode()
    return name + ARCHIVE_SUFFIX.encode(), name + METADATA_SUFFIX.encode()


def _backup_id_of(name: bytes, suffix: str) -> str | None:
    """Return the backup id that a plain file name of the area stands for, or None."""
    if not name.endswith(suffix.encode()):
        return None
    try:
        return check_backup_id(name[: -len(suffix)].decode())
    except UnicodeDecodeError, ValueError:
        return None


class SealedArea:
    """Where the area's files are stored at the peer, and how they are sealed (one node's keys)."""

    def __init__(self, keys: DataKeys) -> None:
        """Seal with ``keys`` (``DataKeys.of(identity)``)."""
        self._names = NameCipher(keys.names)
        self._contents = keys.contents
        self.root = self._names.folder(_AREA)

    @staticmethod
    def jail_path(name: bytes) -> bytes:
        """The plain jail path of one of the area's files (what its contents are bound to)."""
        return _AREA + b"/" + name

    def stored(self, name: bytes) -> bytes:
        """The jail path the host stores plain file ``name`` of the area at."""
        return self._names.path(self.jail_path(name))

    def top(self, name: bytes) -> bytes:
        """The jail path to delete to remove ``name`` (a long name's first continuation)."""
        return self._names.top(self.jail_path(name))

    def tree(self) -> StoredTree:
        """A reader of the area's listing back into plain names."""
        return StoredTree(self._names, _AREA)

    def sealer(self, name: bytes, size: int) -> sealed.Sealer:
        """A sealer of plain file ``name`` of ``size`` bytes (a fresh random salt)."""
        meta = sealed.Meta(_HOST_MTIME, _FILE_MODE, size)
        return sealed.Sealer(self._contents, self.jail_path(name), meta)

    def opener(self, name: bytes) -> sealed.Opener:
        """An opener of the stored file of plain file ``name``."""
        return sealed.Opener(self._contents, self.jail_path(name))


class BackupArea:
    """The backup area at one peer, through an open ``PeerLink``."""

    def __init__(self, link: PeerLink, keys: DataKeys) -> None:
        """Use ``link`` (the caller opens and closes it), sealing with ``keys``."""
        self._link = link
        self._area = SealedArea(keys)

    # --- writing --------------------------------------------------------------------------

    async def upload(
        self,
        backup_id: str,
        metadata: dict[str, Any],
        size: int,
        open_stream: OpenStream,
        progress: BytesCallback | None = None,
    ) -> StoredBackup:
        """Store an archive of exactly ``size`` bytes, then its metadata; return what is kept.

        The host reserves the whole (sealed) size in our quota before any byte is sent:
        QuotaExceeded comes before ``open_stream`` is called. BackupSizeMismatch if the
        stream brings more or fewer bytes than announced (nothing is kept then). An archive
        of the same id already there is replaced, its old version kept in the host's trash.
        """
        tar, meta = _names(backup_id)
        if size < 0:
            raise ValueError(f"a backup cannot have {size} bytes")
        record = {"format": FORMAT, "backup_id": backup_id, "size": size, "metadata": metadata}
        blob = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        if len(blob) > MAX_METADATA:
            raise ValueError(f"the metadata of a backup takes at most {MAX_METADATA} bytes")
        loop = asyncio.get_running_loop()
        sealed_blob = await loop.run_in_executor(None, self._seal_whole, meta, blob)
        stored_size = sealed.stored_size(size)
        upload = await _fresh_upload(self._link, self._area.stored(tar), stored_size)
        try:
            sealer = self._area.sealer(tar, size)
            stream = _sealed(await open_stream(), sealer, backup_id, progress)
            await _send_pieces(upload, stream)
        except BaseException:
            with contextlib.suppress(MyNasError):
                await upload.discard()
            raise
        await upload.finish()  # the sealer is exact; the host checks the size anyway
        stored = self._area.stored(meta)
        await _acknowledged(
            functools.partial(self._link.put, stored, _HOST_MTIME, _FILE_MODE, sealed_blob)
        )
        if progress is not None:
            progress(size)
        return StoredBackup(backup_id, size, metadata)

    def _seal_whole(self, name: bytes, data: bytes) -> bytes:
        sealer = self._area.sealer(name, len(data))
        return sealer.head + sealer.update(data)

    async def delete(self, backup_id: str) -> None:
        """Move an archive and its metadata to the host's trash; BackupMissing if not there."""
        tar, meta = _names(backup_id)
        missing = False
        for name in (meta, tar):  # the metadata first: a half-deleted archive is not listed
            try:
                await _acknowledged(functools.partial(self._link.delete, self._area.top(name)))
            except HostRefused as err:
                if not err.nothing_there:
                    raise
                missing = missing or name == meta
        if missing:
            raise BackupMissing(backup_id)

    # --- reading --------------------------------------------------------------------------

    async def list(self) -> list[StoredBackup]:
        """Every complete archive in the area (with its metadata), by backup id."""
        archives, metadata = await self._entries()
        found = []
        for backup_id in sorted(metadata):
            size = archives.get(backup_id)
            if size is None:
                continue  # metadata left by a delete cut short: no archive to offer
            stored = await self._read_metadata(backup_id, size)
            if stored is not None:
                found.append(stored)
        return found

    async def get(self, backup_id: str) -> StoredBackup:
        """One archive's metadata and size; BackupMissing if it is not (completely) there."""
        check_backup_id(backup_id)
        archives, metadata = await self._entries()
        size = archives.get(backup_id)
        stored = (
            None
            if size is None or backup_id not in metadata
            else await self._read_metadata(backup_id, size)
        )
        if stored is None:
            raise BackupMissing(backup_id)
        return stored

    async def read(self, backup_id: str) -> AsyncGenerator[bytes]:
        """Yield an archive's plain bytes, each chunk once authenticated.

        BackupMissing if it is not there; SealedFileError if the host's copy was altered
        (nothing of it is yielded past the first bad chunk). Close the generator
        (``contextlib.aclosing``) when leaving it early.
        """
        tar, _ = _names(backup_id)
        async for chunk in self._open(backup_id, tar):
            yield chunk

    async def _open(self, backup_id: str, name: bytes) -> AsyncGenerator[bytes]:
        """Yield the plain bytes of the area's file ``name``, as they are authenticated."""
        loop = asyncio.get_running_loop()
        stored = self._area.stored(name)
        opener = self._area.opener(name)
        seen = False
        try:
            async with contextlib.aclosing(self._link.download(stored)) as items:
                async for item in items:
                    if isinstance(item, Entry):
                        if seen or item.path != stored or item.kind is not Kind.FILE:
                            raise PathRefused(f"the peer sent {item.path!r}, not {stored!r}")
                        seen = True
                        continue
                    plain = await loop.run_in_executor(None, opener.update, bytes(item))
                    if plain:
                        yield plain
        except HostRefused as err:
            if err.nothing_there:
                raise BackupMissing(backup_id) from None
            raise
        if not seen:
            raise BackupMissing(backup_id)
        opener.finish()

    async def _entries(self) -> tuple[dict[str, int], set[str]]:
        """The area's archives (id: plain size) and the ids with a metadata file."""
        archives: dict[str, int] = {}
        metadata: set[str] = set()
        names = self._area.tree()
        try:
            async with contextlib.aclosing(self._link.list(self._area.root)) as listing:
                async for item, _ in listing:
                    try:
                        name = names.plain(item.path, item.kind is Kind.DIR)
                    except NameTampered:
                        _LOGGER.warning("Ignoring %r in the backup area: not ours", item.path)
                        continue
                    if item.kind is not Kind.FILE or name is None or b"/" in name:
                        continue
                    size = sealed.plain_size(item.size)
                    if (backup_id := _backup_id_of(name, ARCHIVE_SUFFIX)) is not None:
                        if size is not None:
                            archives[backup_id] = size
                    elif (
                        backup_id := _backup_id_of(name, METADATA_SUFFIX)
                    ) is not None and item.size <= sealed.stored_size(MAX_METADATA):
                        metadata.add(backup_id)
        except HostRefused as err:
            if err.nothing_there:  # no backup was ever stored there
                return {}, set()
            raise
        return archives, metadata

    async def _read_metadata(self, backup_id: str, size: int) -> StoredBackup | None:
        """Read one metadata file; None (and a warning) if it is not what we write."""
        _, name = _names(backup_id)
        parts: list[bytes] = []
        total = 0
        try:
            async with contextlib.aclosing(self._open(backup_id, name)) as chunks:
                async for chunk in chunks:
                    total += len(chunk)
                    if total > MAX_METADATA:
                        raise PathRefused(f"the metadata of {backup_id} is too large")
                    parts.append(chunk)
        except BackupMissing:  # deleted meanwhile
            return None
        except sealed.SealedFileError as err:
            _LOGGER.warning("Ignoring backup %s at the peer: %s", backup_id, err)
            return None
        try:
            record = json.loads(b"".join(parts))
        except ValueError, RecursionError:
            record = None
        if (
            not isinstance(record, dict)
            or record.get("format") != FORMAT
            or record.get("backup_id") != backup_id
            or not isinstance(record.get("metadata"), dict)
        ):
            _LOGGER.warning("Ignoring the metadata of %s at the peer: not what we write", backup_id)
            return None
        return StoredBackup(backup_id, size, record["metadata"])


async def _fresh_upload(link: PeerLink, path: bytes, size: int) -> Upload:
    """Open an upload that starts from nothing (see the module docstring: never resume).

    A partial that an earlier, broken attempt left at the host is dropped there first.
    """
    upload = await link.upload(path, size, _HOST_MTIME, _FILE_MODE)
    if upload.offset:
        await upload.discard()
        upload = await link.upload(path, size, _HOST_MTIME, _FILE_MODE)
        if upload.offset:
            await upload.discard()
            raise ProtocolError(f"the peer keeps offering to resume the upload of {path!r}")
    return upload


async def _sealed(
    stream: AsyncIterator[bytes],
    sealer: sealed.Sealer,
    backup_id: str,
    progress: BytesCallback | None,
) -> AsyncGenerator[bytes]:
    """Yield ``stream`` sealed, chunk by chunk in worker threads; its size must be exact.

    BackupSizeMismatch if the stream brings another size than the sealer was made for;
    ``progress(plain bytes read)`` now and then.
    """
    loop = asyncio.get_running_loop()
    size = sealer.meta.size
    yield sealer.head
    read = 0
    last_report = time.monotonic()
    async for chunk in stream:
        read += len(chunk)
        if read > size:
            raise BackupSizeMismatch(backup_id, size, read)
        if chunk and (out := await loop.run_in_executor(None, sealer.update, chunk)):
            yield out
        if progress is not None and time.monotonic() - last_report >= PROGRESS_INTERVAL:
            last_report = time.monotonic()
            progress(read)
    if read != size:
        raise BackupSizeMismatch(backup_id, size, read)
    if not sealer.done:  # an empty archive: its one (empty) last chunk
        yield sealer.update(b"")


async def _send_pieces(upload: Upload, stream: AsyncIterator[bytes]) -> None:
    """Send ``stream`` in pieces of ``Upload.piece_size`` (whole SSH packets)."""
    piece = upload.piece_size
    pending = bytearray()
    async for chunk in stream:
        view = memoryview(chunk)
        if pending:
            take = min(piece - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) == piece:
                await upload.send(memoryview(pending))
                pending = bytearray()
        while len(view) >= piece:
            await upload.send(view[:piece])
            view = view[piece:]
        if view:
            pending += view
    if pending:
        await upload.send(memoryview(pending))


async def _acknowledged(
    request: Callable[[Callable[[MyNasError | None], None]], Awaitable[None]],
) -> None:
    """Send a request answered through a callback, and wait for its answer."""
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(error: MyNasError | None) -> None:
        if answer.done():
            return
        if error is None:
            answer.set_result(None)
        else:
            answer.set_exception(error)

    await request(done)
    await answer


# --- one connection per operation (what Node runs, under its per-peer rules) ---------------


async def upload(
    identity: Identity,
    target: PeerTarget,
    backup: NewBackup,
    *,
    progress: BytesCallback | None = None,
) -> StoredBackup:
    """Connect to the peer and store an archive in its backup area (``BackupArea.upload``)."""
    check_backup_id(backup.backup_id)
    async with await open_link(identity, target) as link:
        area = BackupArea(link, DataKeys.of(identity))
        return await area.upload(
            backup.backup_id, backup.metadata, backup.size, backup.open_stream, progress
        )


async def listing(identity: Identity, target: PeerTarget) -> list[StoredBackup]:
    """Connect to the peer and list its backup area (``BackupArea.list``)."""
    async with await open_link(identity, target) as link:
        return await BackupArea(link, DataKeys.of(identity)).list()


async def get(identity: Identity, target: PeerTarget, backup_id: str) -> StoredBackup:
    """Connect to the peer and describe one archive (``BackupArea.get``)."""
    check_backup_id(backup_id)
    async with await open_link(identity, target) as link:
        return await BackupArea(link, DataKeys.of(identity)).get(backup_id)


async def delete(identity: Identity, target: PeerTarget, backup_id: str) -> None:
    """Connect to the peer and move one archive to its trash (``BackupArea.delete``)."""
    check_backup_id(backup_id)
    async with await open_link(identity, target) as link:
        await BackupArea(link, DataKeys.of(identity)).delete(backup_id)


async def download(identity: Identity, target: PeerTarget, backup_id: str) -> AsyncGenerator[bytes]:
    """Connect to the peer and yield one archive's bytes; the connection ends with it.

    Close the generator (``contextlib.aclosing``) when leaving it early.
    """
    check_backup_id(backup_id)
    async with (
        await open_link(identity, target) as link,
        contextlib.aclosing(BackupArea(link, DataKeys.of(identity)).read(backup_id)) as chunks,
    ):
        async for chunk in chunks:
            yield chunk
