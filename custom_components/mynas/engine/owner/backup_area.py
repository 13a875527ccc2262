"""The backup area: archives of the host application kept at a peer (Home Assistant's own backups).

Our replica space at a peer holds one folder per protected folder (``<jail>/<folder>/``) and
this reserved area beside them, ``<jail>/.ha-backups/``, which no folder may be called
(``run.check_folder_name``). It holds flat, separate files, two per archive:

* ``<backup_id>.tar``: the archive, byte for byte as the application streamed it;
* ``<backup_id>.json``: ``{"format": 1, "backup_id", "size", "metadata"}``, where
  ``metadata`` is whatever the application keeps about the archive (for Home Assistant,
  ``AgentBackup.as_dict()``). It is written after the archive is durable, so an archive is
  listed only once it is complete.

They travel as any file of a replica does (``OPEN``/``DATA``/``CLOSE``, ``PUT``, ``READ``,
``LIST``, ``DELETE``: no frame of their own), so the host treats them as any replaced data:
counted in our quota, and an overwrite or a delete moves the old version to its trash,
which only the host purges after its retention (docs/architecture.md, invariants 3 and 4) —
a compromised node cannot destroy its backups at a friend's at once.

Encryption at rest: each file is an opaque blob, read and written whole, never patched in
place, and found by its name alone. Sealing them later (names and contents, as encrypted
replicas do) changes only how a name and its bytes are turned into a blob; ``format`` in
the metadata says which way a blob was written.

Uploads never resume: Home Assistant may encrypt its archive on the fly (with a fresh key
stream at every attempt), so the bytes of an earlier attempt may not fit the next. Each
upload announces a fresh modification time, which makes the host drop the partial of an
earlier attempt of the same archive instead of resuming from it.
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
from .client import PeerLink, Upload, connect_any
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
_FILE_MODE = 0o644

type OpenStream = Callable[[], Awaitable[AsyncIterator[bytes]]]
type BytesCallback = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class StoredBackup:
    """One archive in the backup area: its id, its size there, the metadata kept with it."""

    backup_id: str
    size: int
    metadata: dict[str, Any]


def check_backup_id(backup_id: str) -> str:
    """Return ``backup_id`` if it can name an archive's files; raise ValueError otherwise."""
    if not _BACKUP_ID.fullmatch(backup_id):
        raise ValueError(
            f"{backup_id!r} cannot name a backup: use 1 to 200 letters, digits, '_', '-' "
            "or '.', starting with a letter or a digit"
        )
    return backup_id


def _paths(backup_id: str) -> tuple[bytes, bytes]:
    """Return where an archive and its metadata live in our replica space."""
    name = check_backup_id(backup_id).encode()
    return (
        _AREA + b"/" + name + ARCHIVE_SUFFIX.encode(),
        _AREA + b"/" + name + METADATA_SUFFIX.encode(),
    )


def _backup_id_of(path: bytes, suffix: str) -> str | None:
    """Return the backup id that a file directly in the area names, or None."""
    folder, _, name = path.rpartition(b"/")
    if folder != _AREA or not name.endswith(suffix.encode()):
        return None
    try:
        return check_backup_id(name[: -len(suffix)].decode())
    except UnicodeDecodeError, ValueError:
        return None


class BackupArea:
    """The backup area at one peer, through an open ``PeerLink``."""

    def __init__(self, link: PeerLink) -> None:
        """Use ``link`` (the caller opens and closes it)."""
        self._link = link

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

        The host reserves the whole size in our quota before any byte is sent:
        QuotaExceeded comes before ``open_stream`` is called. BackupSizeMismatch if the
        stream brings more or fewer bytes than announced (nothing is kept then). An archive
        of the same id already there is replaced, its old version kept in the host's trash.
        """
        tar, meta = _paths(backup_id)
        if size < 0:
            raise ValueError(f"a backup cannot have {size} bytes")
        record = {"format": FORMAT, "backup_id": backup_id, "size": size, "metadata": metadata}
        blob = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        if len(blob) > MAX_METADATA:
            raise ValueError(f"the metadata of a backup takes at most {MAX_METADATA} bytes")
        upload = await _fresh_upload(self._link, tar, size)
        try:
            sent = await _send_stream(upload, size, await open_stream(), progress)
        except BaseException:
            with contextlib.suppress(MyNasError):
                await upload.discard()
            raise
        if sent != size:
            await upload.discard()
            raise BackupSizeMismatch(backup_id, size, sent)
        await upload.finish()
        mtime_ns = time.time_ns()
        await _acknowledged(lambda done: self._link.put(meta, mtime_ns, _FILE_MODE, blob, done))
        if progress is not None:
            progress(size)
        return StoredBackup(backup_id, size, metadata)

    async def delete(self, backup_id: str) -> None:
        """Move an archive and its metadata to the host's trash; BackupMissing if not there."""
        tar, meta = _paths(backup_id)
        missing = False
        for path in (meta, tar):  # the metadata first: a half-deleted archive is not listed
            try:
                await _acknowledged(functools.partial(self._link.delete, path))
            except HostRefused as err:
                if not err.nothing_there:
                    raise
                missing = missing or path == meta
        if missing:
            raise BackupMissing(backup_id)

    # --- reading --------------------------------------------------------------------------

    async def list(self) -> list[StoredBackup]:
        """Every complete archive in the area (with its metadata), by backup id."""
        archives, metadata = await self._entries()
        found = []
        for backup_id, path in sorted(metadata.items()):
            size = archives.get(backup_id)
            if size is None:
                continue  # metadata left by a delete cut short: no archive to offer
            stored = await self._read_metadata(backup_id, path, size)
            if stored is not None:
                found.append(stored)
        return found

    async def get(self, backup_id: str) -> StoredBackup:
        """One archive's metadata and size; BackupMissing if it is not (completely) there."""
        check_backup_id(backup_id)
        archives, metadata = await self._entries()
        size = archives.get(backup_id)
        path = metadata.get(backup_id)
        stored = (
            None
            if size is None or path is None
            else await self._read_metadata(backup_id, path, size)
        )
        if stored is None:
            raise BackupMissing(backup_id)
        return stored

    async def read(self, backup_id: str) -> AsyncGenerator[bytes]:
        """Yield an archive's bytes as the host sends them; BackupMissing if it is not there.

        Close the generator (``contextlib.aclosing``) when leaving it early.
        """
        tar, _ = _paths(backup_id)
        expected: Entry | None = None
        received = 0
        try:
            async with contextlib.aclosing(self._link.download(tar)) as items:
                async for item in items:
                    if isinstance(item, Entry):
                        if expected is not None or item.path != tar or item.kind is not Kind.FILE:
                            raise PathRefused(f"the peer sent {item.path!r}, not {tar!r}")
                        expected = item
                        continue
                    if expected is None or received + len(item) > expected.size:
                        raise PathRefused("the peer sent more of the backup than it announced")
                    received += len(item)
                    yield bytes(item)
        except HostRefused as err:
            if err.nothing_there:
                raise BackupMissing(backup_id) from None
            raise
        if expected is None:
            raise BackupMissing(backup_id)
        if received != expected.size:
            raise PathRefused("the peer sent less of the backup than it announced")

    async def _entries(self) -> tuple[dict[str, int], dict[str, bytes]]:
        """The area's archives (id: size) and metadata files (id: path)."""
        archives: dict[str, int] = {}
        metadata: dict[str, bytes] = {}
        try:
            async with contextlib.aclosing(self._link.list(_AREA)) as listing:
                async for item, _ in listing:
                    if item.kind is not Kind.FILE:
                        continue
                    if (backup_id := _backup_id_of(item.path, ARCHIVE_SUFFIX)) is not None:
                        archives[backup_id] = item.size
                    elif (
                        backup_id := _backup_id_of(item.path, METADATA_SUFFIX)
                    ) is not None and item.size <= MAX_METADATA:
                        metadata[backup_id] = item.path
        except HostRefused as err:
            if err.nothing_there:  # no backup was ever stored there
                return {}, {}
            raise
        return archives, metadata

    async def _read_metadata(self, backup_id: str, path: bytes, size: int) -> StoredBackup | None:
        """Read one metadata file; None (and a warning) if it is not what we write."""
        parts: list[bytes] = []
        total = 0
        try:
            async with contextlib.aclosing(self._link.download(path)) as items:
                async for item in items:
                    if isinstance(item, Entry):
                        continue
                    total += len(item)
                    if total > MAX_METADATA:
                        raise PathRefused(f"the metadata of {backup_id} is too large")
                    parts.append(bytes(item))
        except HostRefused as err:
            if err.nothing_there:  # deleted meanwhile
                return None
            raise
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
            _LOGGER.warning("Ignoring %s at the peer: not metadata this version wrote", path)
            return None
        return StoredBackup(backup_id, size, record["metadata"])


async def _fresh_upload(link: PeerLink, path: bytes, size: int) -> Upload:
    """Open an upload that starts from nothing (see the module docstring: never resume).

    A fresh modification time gives the upload a partial of its own at the host; one an
    earlier attempt left of the same archive is dropped there.
    """
    upload = await link.upload(path, size, time.time_ns(), _FILE_MODE)
    if upload.offset:
        await upload.discard()
        raise ProtocolError(f"the peer offered to resume a new upload of {path!r}")
    return upload


async def _send_stream(
    upload: Upload,
    size: int,
    stream: AsyncIterator[bytes],
    progress: BytesCallback | None,
) -> int:
    """Send ``stream`` in pieces of ``Upload.piece_size``; return how many bytes it held.

    Stops sending (and returns the count so far) as soon as the stream passes ``size``.
    """
    piece = upload.piece_size
    pending = bytearray()
    sent = 0
    last_report = time.monotonic()
    async for chunk in stream:
        if sent + len(pending) + len(chunk) > size:
            return sent + len(pending) + len(chunk)
        view = memoryview(chunk)
        if pending:
            take = min(piece - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) == piece:
                await upload.send(memoryview(pending))
                sent += piece
                pending = bytearray()
        while len(view) >= piece:
            await upload.send(view[:piece])
            sent += piece
            view = view[piece:]
        if view:
            pending += view
        if progress is not None and time.monotonic() - last_report >= PROGRESS_INTERVAL:
            last_report = time.monotonic()
            progress(sent)
    if pending:
        await upload.send(memoryview(pending))
        sent += len(pending)
    return sent


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
    backup_id: str,
    metadata: dict[str, Any],
    size: int,
    open_stream: OpenStream,
    *,
    progress: BytesCallback | None = None,
) -> StoredBackup:
    """Connect to the peer and store an archive in its backup area (``BackupArea.upload``)."""
    check_backup_id(backup_id)
    async with await connect_any(identity, target.addresses, target.public_key) as link:
        return await BackupArea(link).upload(backup_id, metadata, size, open_stream, progress)


async def listing(identity: Identity, target: PeerTarget) -> list[StoredBackup]:
    """Connect to the peer and list its backup area (``BackupArea.list``)."""
    async with await connect_any(identity, target.addresses, target.public_key) as link:
        return await BackupArea(link).list()


async def get(identity: Identity, target: PeerTarget, backup_id: str) -> StoredBackup:
    """Connect to the peer and describe one archive (``BackupArea.get``)."""
    check_backup_id(backup_id)
    async with await connect_any(identity, target.addresses, target.public_key) as link:
        return await BackupArea(link).get(backup_id)


async def delete(identity: Identity, target: PeerTarget, backup_id: str) -> None:
    """Connect to the peer and move one archive to its trash (``BackupArea.delete``)."""
    check_backup_id(backup_id)
    async with await connect_any(identity, target.addresses, target.public_key) as link:
        await BackupArea(link).delete(backup_id)


async def download(identity: Identity, target: PeerTarget, backup_id: str) -> AsyncGenerator[bytes]:
    """Connect to the peer and yield one archive's bytes; the connection ends with it.

    Close the generator (``contextlib.aclosing``) when leaving it early.
    """
    check_backup_id(backup_id)
    async with (
        await connect_any(identity, target.addresses, target.public_key) as link,
        contextlib.aclosing(BackupArea(link).read(backup_id)) as chunks,
    ):
        async for chunk in chunks:
            yield chunk
