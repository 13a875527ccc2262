"""Read-only SFTP on a peer's own jail, for browsing and downloading a replica by hand.

``SFTPServer(chroot=...)`` is not a jail (see docs/architecture.md, invariant 2), so nothing here
touches the filesystem through asyncssh's defaults: every path goes through
``Jail.resolve`` (which refuses symlinks and internal names), files open with
``O_NOFOLLOW``, and everything that would change the disk is refused. Blocking calls run in
worker threads so one slow disk read never stalls the server's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
import io
import itertools
import os
import posixpath
import stat
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh

from ..errors import PathRefused

if TYPE_CHECKING:
    from .jail import Jail

_NO_WRITES = "this replica is read-only over SFTP"
# Files and directory listings one SFTP session may hold open at once: each holds a file
# descriptor of the host's process, and asyncssh itself sets no limit.
MAX_HANDLES = 64
# Directory entries read (and held) at a time for a listing.
_LIST_CHUNK = 128


def _refuse() -> NoReturn:
    raise asyncssh.SFTPPermissionDenied(_NO_WRITES)


class ReadOnlySFTPServer(asyncssh.SFTPServer):
    """Serves one jail, read-only, to a peer authenticated by its key."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], jail: Jail) -> None:
        """Serve ``jail`` on ``chan``."""
        super().__init__(chan)
        self._jail = jail
        self._handles = 0

    def _take_handle(self) -> None:
        if self._handles >= MAX_HANDLES:
            raise asyncssh.SFTPFailure(
                f"too many open files and directories (at most {MAX_HANDLES}): close some"
            )
        self._handles += 1

    def _give_handle(self) -> None:
        self._handles -= 1

    async def _open_file(self, path: bytes) -> io.FileIO:
        local = await self._local(path)
        self._take_handle()
        try:
            # A file object, not a bare fd: asyncssh's "ranges" extension (which its own
            # client's get() uses) seeks in it.
            return io.FileIO(await self._run(_open_regular, local), "rb")
        except BaseException:
            self._give_handle()
            raise

    # --- paths -----------------------------------------------------------------------------

    @staticmethod
    def _relative(path: bytes) -> bytes:
        """Turn an SFTP path (absolute, or relative to "/") into a jail-relative path."""
        # Lexical normalisation is what "cd .." expects; it can never climb above "/".
        return posixpath.normpath(b"/" + path).lstrip(b"/")

    def _resolve(self, path: bytes) -> bytes:
        rel = self._relative(path)
        return os.fsencode(self._jail.root) if not rel else self._jail.resolve(rel)

    async def _local(self, path: bytes) -> bytes:
        # resolve() lstats every component: disk I/O, so off the event loop too.
        return await self._run(self._resolve, path)

    async def _run[T](self, func: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, func, *args)
        except FileNotFoundError:
            raise asyncssh.SFTPNoSuchFile("no such file") from None
        except NotADirectoryError:
            raise asyncssh.SFTPNoSuchFile("not a directory") from None
        except PermissionError as err:
            raise asyncssh.SFTPPermissionDenied(str(err)) from None
        except PathRefused as err:
            raise asyncssh.SFTPPermissionDenied(str(err)) from None

    def map_path(self, path: bytes) -> bytes:
        """Map a client path to the local path inside the jail (refusing symlinks)."""
        try:
            return self._resolve(path)
        except PathRefused as err:
            raise asyncssh.SFTPPermissionDenied(str(err)) from None

    def reverse_map_path(self, path: bytes) -> bytes:
        """Map a local path back to what the client sees."""
        root = os.fsencode(self._jail.root)
        if path == root:
            return b"/"
        if path.startswith(root + b"/"):
            return path[len(root) :]
        raise asyncssh.SFTPNoSuchFile("no such file")

    async def realpath(self, path: bytes) -> bytes:
        """Return the canonical form of a path; never consults the filesystem."""
        return b"/" + self._relative(path)

    # --- reading ---------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        """Open a regular file for reading; any write, create or truncate flag is refused."""
        if pflags & ~asyncssh.FXF_READ:
            _refuse()
        return await self._open_file(path)

    async def open56(
        self,
        path: bytes,
        desired_access: int,
        flags: int,
        attrs: asyncssh.SFTPAttrs,
    ) -> object:
        """SFTP v5/6 open: reading only."""
        readonly = asyncssh.ACE4_READ_DATA | asyncssh.ACE4_READ_ATTRIBUTES
        if desired_access & ~readonly or (flags & asyncssh.FXF_ACCESS_DISPOSITION) != (
            asyncssh.FXF_OPEN_EXISTING
        ):
            _refuse()
        return await self._open_file(path)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        """Read from an open file in a worker thread."""
        assert isinstance(file_obj, io.FileIO)
        return await self._run(os.pread, file_obj.fileno(), min(size, 1 << 20), offset)

    async def close(self, file_obj: object) -> None:
        """Close an open file."""
        assert isinstance(file_obj, io.FileIO)
        self._give_handle()
        file_obj.close()

    async def fsync(self, file_obj: object) -> None:
        """Nothing to do: nothing was written through SFTP."""

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        """Attributes of an open file."""
        assert isinstance(file_obj, io.FileIO)
        return asyncssh.SFTPAttrs.from_local(await self._run(os.fstat, file_obj.fileno()))

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        """Attributes of a path (never following a symlink: resolve refused them)."""
        local = await self._local(path)
        return asyncssh.SFTPAttrs.from_local(await self._run(os.lstat, local))

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        """Attributes of a path."""
        return await self.stat(path)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """List a directory: its files and directories (symlinks and specials are hidden).

        Read a chunk at a time, so an open listing holds one chunk, never a whole directory
        (a peer can fill one with millions of names); it counts as an open handle until the
        client closes it (the generator is then finalized).
        """
        local = await self._local(path)
        self._take_handle()
        try:
            listing = await self._run(os.scandir, local)
            try:
                for name in (b".", b".."):
                    yield asyncssh.SFTPName(
                        name, attrs=asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY)
                    )
                while (chunk := await self._run(_list_some, listing)) is not None:
                    for name, info in chunk:
                        yield asyncssh.SFTPName(name, attrs=asyncssh.SFTPAttrs.from_local(info))
            finally:
                listing.close()
        finally:
            self._give_handle()

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        """Report the peer's quota as the size of this "filesystem"."""
        usage = self._jail.usage()
        block = 4096
        free = max(0, usage.quota - usage.used) // block
        return asyncssh.SFTPVFSAttrs(
            bsize=block,
            frsize=block,
            blocks=usage.quota // block,
            bfree=free,
            bavail=free,
            files=0,
            ffree=0,
            favail=0,
            fsid=0,
            flags=asyncssh.FXE_STATVFS_ST_RDONLY,
            namemax=255,
        )

    async def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        """Report the quota, as statvfs."""
        return await self.statvfs(b"/")

    # --- everything that would change the disk is refused ----------------------------------

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        """Refused: read-only."""
        _refuse()

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Refused: read-only."""
        _refuse()

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Refused: read-only."""
        _refuse()

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        """Refused: read-only."""
        _refuse()

    def remove(self, path: bytes) -> None:
        """Refused: read-only."""
        _refuse()

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Refused: read-only."""
        _refuse()

    def rmdir(self, path: bytes) -> None:
        """Refused: read-only."""
        _refuse()

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Refused: read-only."""
        _refuse()

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Refused: read-only."""
        _refuse()

    def readlink(self, path: bytes) -> bytes:
        """Refused: there are no symlinks in a jail, and none are revealed."""
        _refuse()

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """Refused: a link could point out of the jail."""
        _refuse()

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        """Refused: a hard link could pull outside files in."""
        _refuse()

    def lock(self, file_obj: object, offset: int, length: int, flags: int) -> None:
        """Refused: nothing to lock in a read-only replica."""
        _refuse()

    def unlock(self, file_obj: object, offset: int, length: int) -> None:
        """Refused: nothing to lock in a read-only replica."""
        _refuse()


def _open_regular(local: bytes) -> int:
    # O_NONBLOCK: opening a FIFO swapped in since the path was checked must not hang.
    fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathRefused("not a regular file")
    os.set_blocking(fd, True)
    return fd


def _list_some(
    listing: Iterator[os.DirEntry[bytes]],
) -> list[tuple[bytes, os.stat_result]] | None:
    """Return the files and directories among a listing's next entries; None at its end.

    Nothing else is shown: links, special files and internal names are skipped.
    """
    result = []
    seen = 0
    for item in itertools.islice(listing, _LIST_CHUNK):
        seen += 1
        if item.name.startswith(b".mynas"):
            continue
        try:
            info = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since the directory was read
        if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
            result.append((item.name, info))
    return result if seen else None
