"""Restore: copy a folder's replica (or a path in it) from a peer back onto this machine.

Needs nothing but the node's key — or its recovery code, which rebuilds that key — and the
peer's address and key (the house-fire case: no index, no old config). The host is not
trusted with our disk: every path it sends must be a plain relative path inside what was
asked, each file is written to a temporary name and renamed into place, never through a
symlink, and existing files are kept unless asked.

An encrypted replica (found by its sealed folder name, or asked for) is opened as it
streams, in the worker threads that write: names through ``names.StoredTree``, contents
through ``sealed.Opener``. A file that fails authentication (altered, truncated, swapped,
or a name moved) is never written under its name — its temporary file is removed — and is
reported by name in ``RestoreResult.failed``; the others are restored. What restore cannot
tell without the index: a file the host deleted, or an older version of a file it put back
(both are authentic); ``verify`` against the index finds those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
import contextlib
import os
import stat
import time
from typing import Any

from .. import tree
from ..errors import HostRefused, MyNasError, PathRefused, RestoreConflict
from ..identity import Identity
from ..protocol import FailCode
from .client import PeerLink, open_link
from .replica import PlainLayout, SealedLayout, layout as make_layout
from .run import (
    BATCH_BYTES,
    BATCH_FILES,
    SMALL_FILE,
    PeerTarget,
    Phase,
    Progress,
    ProgressCallback,
    Reporter,
    RestoreResult,
    check_folder_name,
    check_subpath,
)
from .throttle import Throttle


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _LocalWriter:
    """Writes restored files under the target directory (blocking; worker threads only).

    Paths come from the host, which is not trusted with our disk: each must be a plain
    relative path, and a file is written to a temporary name and renamed, never through a
    symlink.
    """

    def __init__(self, target: bytes, overwrite: bool, layout: PlainLayout | None = None) -> None:
        self.target = target
        self.overwrite = overwrite
        self.layout = layout if isinstance(layout, SealedLayout) else None
        # Files that failed authentication: (plain path, why); only a sealed replica has any.
        self.failed: list[tuple[bytes, str]] = []

    def local(self, rel: bytes) -> bytes:
        """Return where ``rel`` goes; PathRefused unless it is a plain path under the target."""
        if rel.startswith(b"/") or rel.endswith(b"/"):
            raise PathRefused(f"the host sent {rel!r}, not a relative path")
        try:
            check_subpath(rel)
        except ValueError:
            raise PathRefused(f"the host sent {rel!r}, not a plain relative path") from None
        if not rel:
            return self.target
        # No existing component may be a symlink: the host must not steer writes elsewhere.
        current = self.target
        for part in rel.split(b"/")[:-1]:
            current = current + b"/" + part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(info.st_mode):
                raise PathRefused(f"{os.fsdecode(current)} is in the way (not a directory)")
        return self.target + b"/" + rel

    def make_dir(self, rel: bytes) -> None:
        path = self.local(rel)
        if os.path.islink(path):
            raise PathRefused(f"{os.fsdecode(path)} is a symlink")
        os.makedirs(path, exist_ok=True)

    def conflicts(self, rels: Iterable[bytes]) -> list[bytes]:
        return [rel for rel in rels if os.path.lexists(self.local(rel))]

    def write_files(self, files: Iterable[tuple[tree.Entry, bytes, bytes]]) -> tuple[int, int]:
        """Write small files; return how many were written and their bytes."""
        count = size = 0
        for listed, rel, stored in files:
            entry, data = listed, stored
            if self.layout is not None:
                opened = self._open_small(listed, rel, stored)
                if opened is None:
                    continue
                entry, data = opened
            tmp = self.open_temp(rel)
            try:
                _write_all(tmp[0], data)
            except BaseException:
                self.discard(tmp)
                raise
            self.install(tmp, entry, rel)
            count += 1
            size += len(data)
        return count, size

    def _open_small(
        self, entry: tree.Entry, rel: bytes, data: bytes
    ) -> tuple[tree.Entry, bytes] | None:
        """Open a small sealed file: its plain entry and bytes, None if it fails."""
        from . import sealed  # noqa: PLC0415 - with the layout, already loaded

        assert self.layout is not None
        try:
            meta, plain = sealed.open_sealed(
                self.layout.keys.contents, self.layout.jail_path(rel), data
            )
        except sealed.SealedFileError as err:
            self.failed.append((rel, err.why))
            return None
        return _plain_entry(entry, meta), plain

    def open_temp(self, rel: bytes) -> tuple[int, bytes]:
        if not rel:
            raise PathRefused("the host sent a file where the restored folder itself goes")
        path = self.local(rel)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)  # local() checked what exists of it
        tmp = os.path.join(parent, b".mynas-restore-" + os.urandom(6).hex().encode())
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        return fd, tmp

    def install(self, tmp: tuple[int, bytes], entry: tree.Entry, rel: bytes) -> None:
        """Give the temp file its mode and mtime and its final name (closes and consumes it)."""
        fd, tmp_path = tmp
        try:
            try:
                os.fchmod(fd, tree.portable_mode(entry.mode))
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            self._place(tmp_path, rel)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise

    def _place(self, tmp_path: bytes, rel: bytes) -> None:
        path = self.local(rel)
        if not self.overwrite and os.path.lexists(path):
            raise RestoreConflict(os.fsdecode(self.target), os.fsdecode(rel), 1)
        os.replace(tmp_path, path)

    @staticmethod
    def write(tmp: tuple[int, bytes], data: bytes) -> None:
        _write_all(tmp[0], data)

    def open_large(self, rel: bytes) -> _LargeFile:
        """Start writing a large file to a temporary name (opened as it comes if sealed)."""
        opener = None
        if self.layout is not None:
            from .sealed import Opener  # noqa: PLC0415

            opener = Opener(self.layout.keys.contents, self.layout.jail_path(rel))
        return _LargeFile(self.open_temp(rel), rel, opener)

    def write_large(self, large: _LargeFile, data: bytes) -> None:
        """Write the next bytes of a large file (a sealed one's plain bytes, once opened)."""
        if large.opener is None:
            _write_all(large.tmp[0], data)
            return
        if large.error is not None:
            return  # failed already: the rest of it is read and dropped
        try:
            _write_all(large.tmp[0], large.opener.update(data))
        except MyNasError as err:
            large.error = getattr(err, "why", str(err))

    def install_large(self, large: _LargeFile, entry: tree.Entry) -> bool:
        """Put a large file in place; False (temp removed, failure noted) if it fails."""
        if large.opener is not None:
            if large.error is None:
                try:
                    entry = _plain_entry(entry, large.opener.finish())
                except MyNasError as err:
                    large.error = getattr(err, "why", str(err))
            if large.error is not None:
                self.discard(large.tmp)
                self.failed.append((large.rel, large.error))
                return False
        self.install(large.tmp, entry, large.rel)
        return True

    @staticmethod
    def discard(tmp: tuple[int, bytes]) -> None:
        """Drop a temp file that ``install`` has not consumed."""
        with contextlib.suppress(OSError):
            os.close(tmp[0])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp[1])

    def set_dir_mtimes(self, dirs: list[tuple[bytes, int]]) -> None:
        for rel, mtime in dirs:
            path = self.local(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


class _LargeFile:
    """A large file being restored: its temporary file, and its opener if sealed."""

    __slots__ = ("error", "opener", "rel", "tmp")

    def __init__(self, tmp: tuple[int, bytes], rel: bytes, opener: Any) -> None:
        self.tmp = tmp
        self.rel = rel
        self.opener = opener
        self.error: str | None = None


def _plain_entry(entry: tree.Entry, meta: Any) -> tree.Entry:
    """The entry a sealed file stands for: its plain size, mtime and exec bit."""
    return tree.Entry(entry.path, tree.Kind.FILE, meta.size, meta.mtime_ns, meta.mode)


def _make_destination(destination: str | os.PathLike[str]) -> bytes:
    path = os.fsencode(os.path.abspath(destination))
    os.makedirs(path, exist_ok=True)
    return path


async def restore(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    destination: str | os.PathLike[str],
    *,
    path: str | bytes = b"",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    encrypted: bool | None = None,
    limit: Throttle | None = None,
) -> RestoreResult:
    """Copy a folder's replica (or ``path`` inside it) from the host into ``destination``.

    Needs nothing but our key and the peer's address and key: no index, no old config (the
    house-fire case). Paths keep their place relative to the folder, mtimes are restored.
    The replica is taken as encrypted if the host holds the folder's sealed name, else as
    plain (``encrypted`` forces one). Existing files are never overwritten unless
    ``overwrite``: RestoreConflict is raised before anything is written. PathRefused if the
    host sends anything else than what was asked. Files that fail authentication are left
    out and listed in the result's ``failures``.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    check_folder_name(folder)
    sub = check_subpath(path)
    dest = await loop.run_in_executor(None, _make_destination, destination)
    result = RestoreResult(folder)
    report = Reporter(Progress(Phase.RESTORING), progress)
    state = report.state
    link = await open_link(identity, target)
    try:
        layout = await _find_layout(link, identity, folder, encrypted)
        writer = _LocalWriter(dest, overwrite, layout)
        places = _Places(layout, sub)
        remote_root = places.remote_root
        # Totals for progress, and the overwrite check before a single byte is written.
        files: list[bytes] = []
        try:
            async with contextlib.aclosing(link.list(remote_root)) as listing:
                async for item, _ in listing:
                    try:
                        rel = places.relative(item.path, item.kind is tree.Kind.DIR)
                    except MyNasError as err:
                        if isinstance(err, PathRefused):
                            raise
                        continue  # a name that does not open: reported by the download
                    if rel is None or item.kind is not tree.Kind.FILE:
                        continue
                    if not rel:
                        raise PathRefused("the host sent a file where the folder itself goes")
                    state.files_total += 1
                    state.bytes_total += layout.plain_size(item.size) or 0
                    if not overwrite:
                        files.append(rel)
        except HostRefused as err:
            if err.code == FailCode.MISSING:
                asked = os.fsdecode(layout.jail_path(sub))
                raise HostRefused(err.code, f"the peer holds nothing at {asked}") from None
            if err.code != FailCode.PATH or not sub:
                raise
            # Not a directory: one file (READ says which, or why not). Totals come with it.
            files = [sub] if not overwrite else []
        else:
            state.scan_complete = True
        if files:
            conflicts = await loop.run_in_executor(None, writer.conflicts, files)
            if conflicts:
                raise RestoreConflict(os.fsdecode(dest), os.fsdecode(conflicts[0]), len(conflicts))
        files.clear()
        await _receive(link, _Places(layout, sub), writer, result, report, limit)
    finally:
        await link.close()
    for rel, why in writer.failed:
        result.fail(rel, why)
    result.seconds = time.monotonic() - started
    report.done()
    return result


async def _find_layout(
    link: PeerLink, identity: Identity, folder: str, encrypted: bool | None
) -> PlainLayout:
    """Return the layout of the replica: as asked, or the kind the host holds."""
    loop = asyncio.get_running_loop()
    sealed = await loop.run_in_executor(
        None, lambda: make_layout(identity, folder, sealed=encrypted is not False)
    )
    if encrypted is None and not await link.exists(sealed.root):
        return PlainLayout(folder)
    return sealed


class _Places:
    """Where a restore reads on the host, and where each entry it gets goes here."""

    def __init__(self, layout: PlainLayout, sub: bytes) -> None:
        self.layout = layout
        self.sub = sub
        self._names = layout.tree() if isinstance(layout, SealedLayout) else None
        if self._names is not None and sub:
            self.remote_root = self._names.start_at(sub)
        else:
            self.remote_root = layout.stored(sub)

    def relative(self, item_path: bytes, is_dir: bool) -> bytes | None:
        """Return where a listed entry goes, relative to the folder (None: no entry).

        PathRefused for a path outside what was asked; NameTampered (sealed) for a name
        that does not open.
        """
        root = self.remote_root
        if item_path != root and not item_path.startswith(root + b"/"):
            raise PathRefused(f"the host sent {item_path!r}, outside what was asked")
        if self._names is None:
            prefix = self.layout.root + b"/"
            return item_path[len(prefix) :] if item_path != self.layout.root else b""
        rel = self._names.plain(item_path, is_dir)
        sub = self.sub
        if rel is not None and sub and rel != sub and not rel.startswith(sub + b"/"):
            raise PathRefused(f"the host sent {item_path!r}, outside what was asked")
        return rel


async def _receive(
    link: PeerLink,
    places: _Places,
    writer: _LocalWriter,
    result: RestoreResult,
    report: Reporter,
    limit: Throttle | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    state = report.state
    layout = places.layout
    dirs: list[tuple[bytes, int]] = []
    pending: list[tuple[tree.Entry, bytes, bytes]] = []
    pending_size = 0
    current: tree.Entry | None = None
    current_rel: bytes | None = b""  # None: a file whose name does not open (dropped)
    parts: list[bytes] = []
    received = 0
    large: _LargeFile | None = None

    async def flush() -> None:
        nonlocal pending, pending_size
        if pending:
            batch, pending, pending_size = pending, [], 0
            written, size = await loop.run_in_executor(None, writer.write_files, batch)
            result.files += written
            result.bytes += size

    async def complete() -> None:
        nonlocal current, large, pending_size
        assert current is not None
        entry, current = current, None
        state.files_done += 1
        # Progress counts plain bytes, as its total does: a sealed file's overhead goes.
        state.bytes_done -= entry.size - (layout.plain_size(entry.size) or 0)
        if current_rel is None:
            return
        if large is not None:
            tmp, large = large, None
            if await loop.run_in_executor(None, writer.install_large, tmp, entry):
                result.files += 1
                result.bytes += layout.plain_size(entry.size) or 0
        else:
            pending.append((entry, current_rel, b"".join(parts)))
            pending_size += entry.size
            if len(pending) >= BATCH_FILES or pending_size >= BATCH_BYTES:
                await flush()

    try:
        async with contextlib.aclosing(link.download(places.remote_root)) as items:
            async for item in items:
                if isinstance(item, tree.Entry):
                    if current is not None:
                        raise PathRefused("the host sent a file shorter than announced")
                    is_dir = item.kind is tree.Kind.DIR
                    try:
                        rel = places.relative(item.path, is_dir)
                    except MyNasError as err:
                        if isinstance(err, PathRefused):
                            raise
                        writer.failed.append((_shown(item.path), "its name does not open"))
                        rel = None
                        if is_dir:
                            continue
                    if is_dir:
                        if rel is not None:
                            await loop.run_in_executor(None, writer.make_dir, rel)
                            dirs.append((rel, item.mtime_ns))
                            result.dirs += 1
                        continue
                    if not state.scan_complete:  # a single file: its totals come now
                        state.files_total = 1
                        state.bytes_total = layout.plain_size(item.size) or 0
                        state.scan_complete = True
                    current, current_rel, parts, received = item, rel, [], 0
                    if item.size > SMALL_FILE and rel is not None:
                        await flush()
                        large = await loop.run_in_executor(None, writer.open_large, rel)
                    elif item.size == 0:
                        await complete()
                else:
                    chunk = bytes(item)
                    if current is None or received + len(chunk) > current.size:
                        raise PathRefused("the host sent more data than announced")
                    received += len(chunk)
                    state.bytes_done += len(chunk)
                    if limit is not None:
                        # Not reading on holds the host back (SSH flow control).
                        await limit.consume(len(chunk))
                    if large is not None:
                        await loop.run_in_executor(None, writer.write_large, large, chunk)
                    elif current_rel is not None:
                        parts.append(chunk)
                    if received == current.size:
                        await complete()
                    report()
        if current is not None:
            raise PathRefused("the host sent a file shorter than announced")
        await flush()
        if not layout.sealed:  # a sealed replica keeps no directory mtimes
            dirs.sort(key=lambda d: len(d[0]), reverse=True)
            await loop.run_in_executor(None, writer.set_dir_mtimes, dirs)
    finally:
        if large is not None:
            await loop.run_in_executor(None, writer.discard, large.tmp)


def _shown(stored: bytes) -> bytes:
    """A stored (sealed) path as reported when its name does not open."""
    return b"(sealed) " + stored.rpartition(b"/")[2][:40]
