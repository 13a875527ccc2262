"""Restore: copy a folder's replica (or a path in it) from a peer back onto this machine.

Needs nothing but the node's key and the peer's address and key (the house-fire case: no
index, no old config). The host is not trusted with our disk: every path it sends must be a
plain relative path inside what was asked, each file is written to a temporary name and
renamed into place, never through a symlink, and existing files are kept unless asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
import contextlib
import os
import stat
import time

from .. import tree
from ..errors import HostRefused, PathRefused, RestoreConflict
from ..identity import Identity
from ..protocol import FailCode
from .client import PeerLink, open_link
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
    remote_path,
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

    def __init__(self, target: bytes, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite

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

    def write_files(self, files: Iterable[tuple[tree.Entry, bytes, bytes]]) -> None:
        for entry, rel, data in files:
            tmp = self.open_temp(rel)
            try:
                _write_all(tmp[0], data)
            except BaseException:
                self.discard(tmp)
                raise
            self.install(tmp, entry, rel)

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


def _make_destination(path: bytes) -> bool:
    """Create the target directory; True if it was not there (blocking)."""
    created = not os.path.lexists(path)
    os.makedirs(path, exist_ok=True)
    return created


def _remove_if_empty(path: bytes) -> None:
    """Take back a target directory a failed restore created and left empty (blocking)."""
    with contextlib.suppress(OSError):  # not empty (what was written stays), or gone
        os.rmdir(path)


async def restore(
    identity: Identity,
    target: PeerTarget,
    folder: str,
    destination: str | os.PathLike[str],
    *,
    path: str | bytes = b"",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    limit: Throttle | None = None,
) -> RestoreResult:
    """Copy a folder's replica (or ``path`` inside it) from the host into ``destination``.

    Needs nothing but our key and the peer's address and key: no index, no old config (the
    house-fire case). Paths keep their place relative to the folder, mtimes are restored.
    Existing files are never overwritten unless ``overwrite``: RestoreConflict is raised
    before anything is written. PathRefused if the host sends anything else than what was
    asked. ``limit`` (the node's download limit) paces the bytes received.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    folder_name = check_folder_name(folder)
    sub = check_subpath(path)
    # Created once the host has said what it holds: a restore that fails before (the peer
    # down, nothing at that path) leaves no empty folder behind.
    dest = os.fsencode(await loop.run_in_executor(None, os.path.abspath, destination))
    writer = _LocalWriter(dest, overwrite)
    result = RestoreResult(folder)
    report = Reporter(Progress(Phase.RESTORING), progress)
    state = report.state
    remote_root = remote_path(folder_name, sub)
    prefix = folder_name + b"/"

    def relative(item_path: bytes) -> bytes:
        if item_path != remote_root and not item_path.startswith(remote_root + b"/"):
            raise PathRefused(f"the host sent {item_path!r}, outside what was asked")
        return item_path[len(prefix) :] if item_path != folder_name else b""

    link = await open_link(identity, target)
    try:
        # Totals for progress, and the overwrite check before a single byte is written.
        files: list[bytes] = []
        try:
            async with contextlib.aclosing(link.list(remote_root)) as listing:
                async for item, _ in listing:
                    rel = relative(item.path)
                    if item.kind is tree.Kind.FILE:
                        if not rel:
                            raise PathRefused("the host sent a file where the folder itself goes")
                        state.files_total += 1
                        state.bytes_total += item.size
                        if not overwrite:
                            files.append(rel)
        except HostRefused as err:
            if err.code == FailCode.MISSING:
                raise HostRefused(
                    err.code, f"the peer holds nothing at {os.fsdecode(remote_root)}"
                ) from None
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
        created = await loop.run_in_executor(None, _make_destination, dest)
        try:
            await _receive(link, remote_root, writer, relative, result, report, limit)
        except BaseException:
            if created:
                await asyncio.shield(loop.run_in_executor(None, _remove_if_empty, dest))
            raise
    finally:
        await link.close()
    result.seconds = time.monotonic() - started
    report.done()
    return result


async def _receive(
    link: PeerLink,
    remote_root: bytes,
    writer: _LocalWriter,
    relative: Callable[[bytes], bytes],
    result: RestoreResult,
    report: Reporter,
    limit: Throttle | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    state = report.state
    dirs: list[tuple[bytes, int]] = []
    pending: list[tuple[tree.Entry, bytes, bytes]] = []
    pending_size = 0
    current: tree.Entry | None = None
    current_rel = b""
    parts: list[bytes] = []
    received = 0
    large: tuple[int, bytes] | None = None

    async def flush() -> None:
        nonlocal pending, pending_size
        if pending:
            batch, pending, pending_size = pending, [], 0
            await loop.run_in_executor(None, writer.write_files, batch)

    async def complete() -> None:
        nonlocal current, large, pending_size
        assert current is not None
        if large is not None:
            tmp, large = large, None
            await loop.run_in_executor(None, writer.install, tmp, current, current_rel)
        else:
            pending.append((current, current_rel, b"".join(parts)))
            pending_size += current.size
            if len(pending) >= BATCH_FILES or pending_size >= BATCH_BYTES:
                await flush()
        result.files += 1
        result.bytes += current.size
        state.files_done += 1
        current = None

    try:
        async with contextlib.aclosing(link.download(remote_root)) as items:
            async for item in items:
                if isinstance(item, tree.Entry):
                    if current is not None:
                        raise PathRefused("the host sent a file shorter than announced")
                    rel = relative(item.path)
                    if item.kind is tree.Kind.DIR:
                        await loop.run_in_executor(None, writer.make_dir, rel)
                        dirs.append((rel, item.mtime_ns))
                        result.dirs += 1
                        continue
                    if not state.scan_complete:  # a single file: its totals come now
                        state.files_total, state.bytes_total = 1, item.size
                        state.scan_complete = True
                    current, current_rel, parts, received = item, rel, [], 0
                    if item.size > SMALL_FILE:
                        await flush()
                        large = await loop.run_in_executor(None, writer.open_temp, rel)
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
                        await loop.run_in_executor(None, writer.write, large, chunk)
                    else:
                        parts.append(chunk)
                    if received == current.size:
                        await complete()
                    report()
        if current is not None:
            raise PathRefused("the host sent a file shorter than announced")
        await flush()
        dirs.sort(key=lambda d: len(d[0]), reverse=True)
        await loop.run_in_executor(None, writer.set_dir_mtimes, dirs)
    finally:
        if large is not None:
            await loop.run_in_executor(None, writer.discard, large)
