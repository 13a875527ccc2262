"""Attack suite for the node's SSH server: every invariant of docs/architecture.md is a target.

A live NodeServer on 127.0.0.1 is attacked as a hostile (or compromised, or buggy) friend
would, through

* the MyNAS protocol: ``client.connect`` and hand-crafted frames written straight onto a
  ``mynas@1`` channel (so malformed and hostile frames are tried, not just what our client
  sends);
* asyncssh's SFTP client;
* OpenSSH's own ``ssh`` and ``sftp`` binaries.

After an attack the disk is checked, not only the answer: a snapshot of everything under the
test's tmp_path (other jails, a folder outside the storage root, the host's internal state)
must be unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
import stat
import struct
import time
from typing import Any, cast

import asyncssh
from asyncssh.packet import String
import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.errors import (
    AuthRefused,
    HostRefused,
    MyNasError,
    PeerUnreachable,
    QuotaExceeded,
)
from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.host.server import NodeServer, PeerGrant
from custom_components.mynas.engine.host.sftp import ReadOnlySFTPServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client
from custom_components.mynas.engine.protocol import MAX_FRAME, Close, Frame

from ..conftest import DEFAULT_QUOTA, ServerFactory, address, wait_until
from ..openssh_support import OpenSSH
from .ssh_support import connected, sftp_session, ssh_connect

HOST = "127.0.0.1"
MTIME = 1_700_000_000_123_456_789
KIB = 1 << 10
MIB = 1 << 20
BLOCK = 4096
SECRET = b"outside the storage root: must never be read"
BOB_SECRET = b"bob's own file: alice must never see it"
# Plenty of failed logins before any slow-down, so tests that fail on purpose stay fast.
LENIENT = Limits(free_failures=1000)


# --- helpers ----------------------------------------------------------------------------------


def blocks(size: int) -> int:
    """What a file of ``size`` bytes costs on the host (whole 4 KiB blocks, at least one)."""
    return max(1, -(-size // BLOCK)) * BLOCK


def disk_charge(storage: Path, peer: str) -> int:
    """Recount, independently of the host's quota code, what the disk holds for ``peer``."""
    total = 0
    for top in (storage / peer, storage / ".mynas" / "trash" / peer):
        total += _charge_below(top)
    return total + _charge_below(storage / ".mynas" / "partial" / peer)


def _charge_below(top: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(info.st_mode):
                total += BLOCK
            elif stat.S_ISREG(info.st_mode):
                total += blocks(info.st_size)
    return total


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under ``root``: type, size, mtime, content hash or link target."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                seen[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                seen[rel] = ("file", info.st_size, info.st_mtime_ns, info.st_mode, digest)
            else:
                seen[rel] = ("dir", info.st_mtime_ns, info.st_mode)
    return seen


def world(tmp_path: Path) -> dict[str, tuple[Any, ...]]:
    """What an attack must leave alone: the storage root, the keys, a folder outside.

    Not the whole tmp_path: Home Assistant's test config may live there and change. Nor the
    mtime of the host's scratch folders for batch temp files: a refused PUT may have had its
    temp file written and removed there (its path is checked on disk only at the rename);
    what they hold still counts, so a temp file left behind is still seen.
    """
    seen = {}
    for top in ("storage", "keys", "outside"):
        seen.update({f"{top}/{rel}": info for rel, info in snapshot(tmp_path / top).items()})
    for rel, info in seen.items():
        if rel.startswith("storage/.mynas/tmp/") and info[0] == "dir":
            seen[rel] = ("dir", info[2])
    return seen


def trash_contents(storage: Path, peer: str) -> list[bytes]:
    """The contents of every file in a peer's trash, sorted."""
    found = []
    for dirpath, _, filenames in os.walk(storage / ".mynas" / "trash" / peer):
        found.extend(Path(dirpath, name).read_bytes() for name in filenames)
    return sorted(found)


class Events:
    """Collects what NodeServer's ``on_event`` reports, and lets a test await it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.seen.append((kind, data))
        self._changed.set()

    def count(self, kind: str) -> int:
        return sum(1 for seen, _ in self.seen if seen == kind)

    async def wait(self, kind: str, count: int = 1, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count(kind) < count:
                self._changed.clear()
                await self._changed.wait()


def _field(path: bytes) -> bytes:
    return struct.pack(">H", len(path)) + path


def raw_frame(kind: int, body: bytes) -> bytes:
    """A frame built by hand: no client-side check on its size or contents."""
    return struct.pack(">IB", len(body) + 1, kind) + body


def hostile_requests(req: int, path: bytes) -> dict[str, bytes]:
    """Every path-taking request of the protocol, aimed at ``path``."""
    return {
        "PUT": raw_frame(Frame.PUT, struct.pack(">IqH", req, MTIME, 0o644) + _field(path) + b"x"),
        "OPEN": raw_frame(Frame.OPEN, struct.pack(">IQqH", req, 4, MTIME, 0o644) + _field(path)),
        "DELETE": raw_frame(Frame.DELETE, struct.pack(">I", req) + _field(path)),
        "MKDIR": raw_frame(Frame.MKDIR, struct.pack(">Iq", req, MTIME) + _field(path)),
        "UTIME": raw_frame(Frame.UTIME, struct.pack(">Iq", req, MTIME) + _field(path)),
        "LIST": raw_frame(Frame.LIST, struct.pack(">IB", req, 1) + _field(path)),
        "READ": raw_frame(Frame.READ, struct.pack(">I", req) + _field(path)),
        "RETENTION": protocol.query(
            req, {"op": "retention", "folder": os.fsdecode(path), "days": 1}
        ),
    }


class Raw:
    """A ``mynas@1`` channel driven frame by frame."""

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        writer: asyncssh.SSHWriter[bytes],
        reader: asyncssh.SSHReader[bytes],
    ) -> None:
        self.conn = conn
        self.writer = writer
        self.reader = reader
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def open(
        cls,
        server: NodeServer,
        who: Identity,
        *,
        hello: bool = True,
        conn: asyncssh.SSHClientConnection | None = None,
    ) -> Raw:
        conn = conn or await ssh_connect(server, who)
        writer, reader, _ = await conn.open_session(subsystem=protocol.SUBSYSTEM, encoding=None)
        raw = cls(conn, writer, reader)
        if hello:
            raw.send(protocol.hello())
            kind, body = await raw.recv()
            assert kind is Frame.WELCOME
            raw.welcome = json.loads(body)
        return raw

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def recv(self, timeout: float = 10.0) -> tuple[Frame, bytes]:
        return await asyncio.wait_for(protocol.read_frame(self.reader), timeout)

    async def until_ok(self, req: int) -> dict[int, tuple[Frame, bytes]]:
        """Collect answers (by request id) until OK names ``req``."""
        answers: dict[int, tuple[Frame, bytes]] = {}
        while True:
            kind, body = await self.recv()
            if kind is Frame.OK:
                ids = protocol.parse_ok(body)
                for done in ids:
                    answers[done] = (kind, body)
                if req in ids:
                    return answers
            elif kind in (Frame.ENTRY, Frame.DATA):
                answers.setdefault(protocol.request_id(body), (kind, body))
            else:
                answers[protocol.request_id(body)] = (kind, body)

    async def sync(self, req: int) -> dict[int, tuple[Frame, bytes]]:
        self.send(protocol.sync(req))
        return await self.until_ok(req)

    async def ended(self, timeout: float = 10.0) -> bytes:
        """Wait until the server closes the channel; return whatever it sent before."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()


def fail_info(answer: tuple[Frame, bytes]) -> dict[str, Any]:
    kind, body = answer
    assert kind is Frame.FAIL, f"expected FAIL, got {kind.name}"
    return protocol.parse_fail(body)[1]


async def push_files(
    link: client.PeerLink, files: dict[bytes, bytes]
) -> dict[bytes, MyNasError | None]:
    """PUT files through our own client; return each file's outcome."""
    results: dict[bytes, MyNasError | None] = {}
    for path, data in files.items():

        def done(error: MyNasError | None, path: bytes = path) -> None:
            results[path] = error

        await link.put(path, MTIME, 0o644, data, done)
    await link.sync()
    return results


async def upload(link: client.PeerLink, path: bytes, data: bytes, mtime_ns: int = MTIME) -> None:
    """Send a file through OPEN/DATA/CLOSE (the large-file path), from wherever it resumes."""
    req, offset = await link.open_upload(path, len(data), mtime_ns, 0o644)
    for start in range(offset, len(data), protocol.CHUNK):
        await link.send_data(req, data[start : start + protocol.CHUNK])
    await link.close_upload(req, Close.FINISH)


async def connect(server: NodeServer, who: Identity) -> client.PeerLink:
    return await client.connect(who, address(server), server.identity.public_line)


async def list_jail(link: client.PeerLink, path: bytes = b"") -> list[bytes]:
    return [item.path async for item, _ in link.list(path)]


# --- a furnished host -------------------------------------------------------------------------


ALICE_FILES = {
    "notes.txt": b"alice's notes",
    "photos/cat.jpg": b"\xff\xd8 a cat",
    "dir/inner.txt": b"inside dir",
}


@pytest.fixture
def furnished(tmp_path: Path, storage_dir: Path) -> Path:
    """Fill the host's disk: alice's and bob's files, a folder outside, and admin's links.

    The symlinks are what a host's admin (or a restored backup) might leave in a jail: every
    one points out of it. Peers themselves can never make links.
    """
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    alice = storage_dir / "alice"
    for rel, data in ALICE_FILES.items():
        (alice / rel).parent.mkdir(parents=True, exist_ok=True)
        (alice / rel).write_bytes(data)
    (storage_dir / "bob").mkdir(exist_ok=True)
    (storage_dir / "bob" / "private.txt").write_bytes(BOB_SECRET)
    (alice / "escape").symlink_to(outside)  # absolute, to a directory
    (alice / "filelink").symlink_to(outside / "secret.txt")  # to a file
    (alice / "rel").symlink_to("../bob")  # relative, to the neighbour's jail
    (alice / "dir" / "up").symlink_to("../..")  # up to the storage root
    (alice / "photos" / "loop").symlink_to("loop")  # a loop
    os.mkfifo(alice / "fifo")  # a special file (opening it would hang a reader)
    (alice / "dir" / ".mynas-old").write_bytes(b"host's own")  # an internal name
    return outside


LINKS = [b"escape", b"filelink", b"rel", b"dir/up", b"photos/loop", b"fifo"]
THROUGH_LINKS = [
    b"escape/secret.txt",
    b"escape/new.txt",
    b"rel/private.txt",
    b"dir/up/bob/private.txt",
    b"dir/up/.mynas/trash",
    b"photos/loop/x",
]
SYNTACTIC = [
    b"..",
    b"../bob/private.txt",
    b"../../outside/secret.txt",
    b"../.mynas/trash/alice",
    b"dir/../../bob/private.txt",
    b"dir/../notes.txt",
    b"/etc/passwd",
    b"/",
    b"./notes.txt",
    b"dir/.",
    b"dir//inner.txt",
    b"dir/",
    b"notes.txt\0.jpg",
    b"\0",
    b".mynas",
    b".mynas/trash/alice",
    b".mynasfoo",
    b"dir/.mynas-tmp",
    b"x" * 256,
    b"/".join([b"d"] * 2100),  # 4199 bytes: over the 4096-byte path limit
    b"/".join([b"d"] * 300),  # deeper than any walk allows
]


# --- (1) traversal through every path-taking operation -----------------------------------


async def test_protocol_traversal_refused_by_every_operation(
    server: NodeServer, alice_id: Identity, furnished: Path, tmp_path: Path
) -> None:
    """`..`, absolute, NUL, internal names, over-long paths, links: all refused, disk intact."""
    hostile = [*SYNTACTIC, str(furnished / "secret.txt").encode(), *LINKS, *THROUGH_LINKS]
    before = world(tmp_path)
    raw = await Raw.open(server, alice_id)
    sent: dict[int, tuple[str, bytes]] = {}
    req = 0
    for path in hostile:
        for op in hostile_requests(0, path):
            if op == "RETENTION" and path in LINKS:
                continue  # a folder name only: retention never touches the disk
            req += 1
            sent[req] = (op, path)
            raw.send(hostile_requests(req, path)[op])
    answers = await raw.sync(req + 1)
    wrong = [
        (op, path[:40], answers.get(number))
        for number, (op, path) in sent.items()
        if answers.get(number, (None,))[0] is not Frame.FAIL
        or fail_info(answers[number])["code"] != "path"
    ]
    assert not wrong
    await raw.close()
    assert world(tmp_path) == before
    assert server.jail("alice").quota.reserved == 0


async def test_protocol_list_and_read_skip_links_inside_the_jail(
    server: NodeServer, alice_id: Identity, furnished: Path
) -> None:
    """LIST and READ of a tree that holds links show the tree's own files, never a link."""
    async with await connect(server, alice_id) as link:
        everything = await list_jail(link)
        assert sorted(everything) == sorted(
            [b"dir", b"dir/inner.txt", b"notes.txt", b"photos", b"photos/cat.jpg"]
        )
        assert await list_jail(link, b"dir") == [b"dir/inner.txt"]
        hashed = [(item.path, digest) async for item, digest in link.list(with_hash=True)]
        assert all(digest for path, digest in hashed if path.endswith((b".txt", b".jpg")))
        got: list[bytes] = []
        content = b""
        async for kind, value in link.read(b"dir"):
            if kind is Frame.ENTRY:
                got.append(value[0].path)
            else:
                content += bytes(value)
        assert got == [b"dir", b"dir/inner.txt"]
        assert content == b"inside dir"
        for path in LINKS + THROUGH_LINKS:
            with pytest.raises(HostRefused) as refused:
                async for _ in link.read(path):
                    pass
            assert refused.value.code == "path", path


SFTP_HOSTILE = [
    b"..",
    b"/..",
    b"../bob",
    b"/../bob/private.txt",
    b"../../outside/secret.txt",
    b"/../.mynas/trash/alice",
    b"/.mynas",
    b".mynas/peers/alice/state.json",
    b"/etc/passwd",
    b"notes.txt\0.jpg",
    b"x" * 300,
    b"/" + b"/".join([b"d"] * 2100),
]


async def test_sftp_traversal_stays_in_the_jail(
    server: NodeServer, alice_id: Identity, furnished: Path, tmp_path: Path
) -> None:
    """Every path-taking SFTP request: nothing outside alice's own jail is ever reached."""
    before = world(tmp_path)
    outside = [os.fsencode(furnished / "secret.txt"), os.fsencode(furnished)]
    async with sftp_session(server, alice_id) as sftp:
        own_root = sorted(await sftp.listdir(b"/"))
        assert own_root == sorted([b".", b"..", b"notes.txt", b"photos", b"dir"])
        for path in [*SFTP_HOSTILE, *outside]:
            for name, call in _sftp_reads(sftp, path).items():
                try:
                    result = await call()
                except asyncssh.SFTPError:
                    continue
                _assert_inside(name, path, result, own_root)
        await _sftp_readlink_refused(sftp, [b"/notes.txt", b"/escape", b"/filelink"])
    assert world(tmp_path) == before


def _sftp_reads(sftp: asyncssh.SFTPClient, path: bytes) -> dict[str, Callable[[], Awaitable[Any]]]:
    async def read() -> bytes:
        async with sftp.open(path, "rb") as handle:
            return bytes(await handle.read())

    return {
        "stat": lambda: sftp.stat(path),
        "lstat": lambda: sftp.lstat(path),
        "listdir": lambda: sftp.listdir(path),
        "open": read,
        "realpath": lambda: sftp.realpath(path),
        "exists": lambda: sftp.isdir(path),
        "statvfs": lambda: sftp.statvfs(path),
    }


def _assert_inside(name: str, path: bytes, result: Any, own_root: list[bytes]) -> None:
    where = f"{name} {path[:60]!r}"
    if isinstance(result, bytes) and name == "open":
        assert result not in (SECRET, BOB_SECRET), where
    elif isinstance(result, bytes):  # realpath: lexical, always inside "/"
        assert result.startswith(b"/"), where
        assert b".." not in result.split(b"/"), where
    elif isinstance(result, list):  # a listing: only ever alice's own root ("/.." is "/")
        assert sorted(result) == own_root, where
    elif isinstance(result, asyncssh.SFTPAttrs):
        # "/.." and ".." are the jail root itself; nothing else outside exists for alice.
        assert path.strip(b"/.") == b"", where


async def _sftp_readlink_refused(sftp: asyncssh.SFTPClient, paths: list[bytes]) -> None:
    for path in paths:
        with pytest.raises(asyncssh.SFTPError):
            await sftp.readlink(path)


async def test_sftp_refuses_every_link_already_in_the_jail(
    server: NodeServer, alice_id: Identity, furnished: Path, tmp_path: Path
) -> None:
    """stat/lstat/open/listdir through or onto a link: permission denied, never followed."""
    before = world(tmp_path)
    async with sftp_session(server, alice_id) as sftp:
        for path in LINKS + THROUGH_LINKS:
            for name, call in _sftp_reads(sftp, b"/" + path).items():
                if name in ("realpath", "statvfs"):
                    continue  # lexical / the quota: they never look at the path
                if name == "exists":
                    assert not await call(), path
                    continue
                with pytest.raises(asyncssh.SFTPError) as refused:
                    await call()
                # Permission denied, not "no such file": the link was seen and refused.
                assert refused.value.code == asyncssh.FX_PERMISSION_DENIED, (name, path)
        # A listing never shows a link, a FIFO, an internal name or anything behind them.
        assert sorted(await sftp.listdir(b"/dir")) == [b".", b"..", b"inner.txt"]
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.stat(b"/dir/.mynas-old")
        assert sorted(await sftp.listdir(b"/photos")) == [b".", b"..", b"cat.jpg"]
    assert world(tmp_path) == before


# --- (2) links and writes through SFTP ---------------------------------------------------


async def test_sftp_refuses_links_and_every_write(
    server: NodeServer, alice_id: Identity, furnished: Path, tmp_path: Path
) -> None:
    """symlink, hard link, rename, remove, rmdir, mkdir, setstat, writes, creates: refused."""
    before = world(tmp_path)
    async with sftp_session(server, alice_id) as sftp:
        attempts: dict[str, Callable[[], Awaitable[Any]]] = {
            "symlink out": lambda: sftp.symlink(str(furnished), "/out"),
            # The two-step escape of a dangling link: a dangling relative link, then its target.
            "symlink dangling": lambda: sftp.symlink("foo/../../out", "/dir/out"),
            "symlink root": lambda: sftp.symlink("/", "/dir/foo"),
            "hardlink": lambda: sftp.link("/notes.txt", "/hard.txt"),
            "hardlink in": lambda: sftp.link(str(furnished / "secret.txt"), "/s.txt"),
            "rename": lambda: sftp.rename("/notes.txt", "/moved.txt"),
            "rename dir up": lambda: sftp.rename("/dir", "/photos/dir"),
            "posix-rename": lambda: sftp.posix_rename("/notes.txt", "/dir/inner.txt"),
            "remove": lambda: sftp.remove("/notes.txt"),
            "remove link": lambda: sftp.remove("/escape"),
            "rmdir": lambda: sftp.rmdir("/dir"),
            "rmdir root": lambda: sftp.rmdir("/"),
            "mkdir": lambda: sftp.mkdir("/newdir"),
            "chmod": lambda: sftp.chmod("/notes.txt", 0o4777),
            "chmod root": lambda: sftp.chmod("/", 0o777),
            "chown": lambda: sftp.chown("/notes.txt", 0, 0),
            "utime": lambda: sftp.utime("/notes.txt", (0, 0)),
            "truncate": lambda: sftp.truncate("/notes.txt", 0),
            "lsetstat": lambda: sftp.setstat(
                "/escape", asyncssh.SFTPAttrs(permissions=0o777), follow_symlinks=False
            ),
            "create": lambda: _sftp_write(sftp, "/new.txt", "wb"),
            "overwrite": lambda: _sftp_write(sftp, "/notes.txt", "wb"),
            "append": lambda: _sftp_write(sftp, "/notes.txt", "ab"),
            "update": lambda: _sftp_write(sftp, "/notes.txt", "r+b"),
            "exclusive": lambda: _sftp_write(sftp, "/x.txt", "xb"),
            "write via link": lambda: _sftp_write(sftp, "/escape/new.txt", "wb"),
            "fsetstat": lambda: _sftp_fsetstat(sftp, "/notes.txt"),
            "write on read handle": lambda: _sftp_write_read_handle(sftp, "/notes.txt"),
            "copy": lambda: sftp.copy("/notes.txt", "/copy.txt"),
            "put": lambda: sftp.put(str(furnished / "secret.txt"), "/secret.txt"),
        }
        accepted = []
        for name, attempt in attempts.items():
            try:
                await attempt()
            except asyncssh.SFTPError, OSError:
                continue
            accepted.append(name)
        assert accepted == []
        # Reading what is there still works: the replica is browsable.
        async with sftp.open("/notes.txt", "rb") as handle:
            assert await handle.read() == ALICE_FILES["notes.txt"]
    assert world(tmp_path) == before


class _NoChannel:
    """What ``SFTPServer.__init__`` asks of a channel, for calling the server directly."""

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default


async def test_sftp_speaks_v3_only_and_a_v6_open_would_stay_read_only(
    server: NodeServer, alice_id: Identity, furnished: Path, storage_dir: Path, tmp_path: Path
) -> None:
    """v3 (OpenSSH's) is the smallest surface; were v6 enabled, its open still only reads.

    asyncssh's own v6 open would open the mapped path with any access asked, so the
    override matters; and so do the path mappings its default methods rely on.
    """
    async with connected(server, alice_id) as conn:
        sftp = await conn.start_sftp_client(sftp_version=6)
        assert sftp.version == 3
        sftp.exit()
    before = world(tmp_path)
    direct = ReadOnlySFTPServer(cast(Any, _NoChannel()), server.jail("alice"))
    read, attrs = asyncssh.ACE4_READ_DATA, asyncssh.SFTPAttrs()
    for access, disposition in [
        (asyncssh.ACE4_WRITE_DATA, asyncssh.FXF_OPEN_EXISTING),
        (read | asyncssh.ACE4_APPEND_DATA, asyncssh.FXF_OPEN_EXISTING),
        (read | asyncssh.ACE4_WRITE_ATTRIBUTES, asyncssh.FXF_OPEN_EXISTING),
        (read, asyncssh.FXF_CREATE_NEW),
        (read, asyncssh.FXF_CREATE_TRUNCATE),
        (read, asyncssh.FXF_OPEN_OR_CREATE),
        (read, asyncssh.FXF_TRUNCATE_EXISTING),
    ]:
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await direct.open56(b"/notes.txt", access, disposition, attrs)
    handle = await direct.open56(b"/notes.txt", read, asyncssh.FXF_OPEN_EXISTING, attrs)
    assert isinstance(handle, io.FileIO)
    with handle:
        assert handle.read() == ALICE_FILES["notes.txt"]
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        await direct.open56(b"/filelink", read, asyncssh.FXF_OPEN_EXISTING, attrs)
    root = os.fsencode(storage_dir / "alice")
    assert direct.map_path(b"/") == root
    assert direct.map_path(b"../../dir/./inner.txt") == root + b"/dir/inner.txt"
    for through in THROUGH_LINKS:
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            direct.map_path(b"/" + through)
    assert direct.reverse_map_path(root) == b"/"
    assert direct.reverse_map_path(root + b"/dir/inner.txt") == b"/dir/inner.txt"
    for outside in (os.fsencode(storage_dir / "bob"), root + b"-other", b"/etc/passwd"):
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            direct.reverse_map_path(outside)
    assert world(tmp_path) == before


async def _sftp_write(sftp: asyncssh.SFTPClient, path: str, mode: str) -> None:
    async with sftp.open(path, mode) as handle:
        await handle.write(b"written through sftp")


async def _sftp_fsetstat(sftp: asyncssh.SFTPClient, path: str) -> None:
    async with sftp.open(path, "rb") as handle:
        await handle.chmod(0o777)


async def _sftp_write_read_handle(sftp: asyncssh.SFTPClient, path: str) -> None:
    async with sftp.open(path, "rb") as handle:
        # asyncssh checks nothing locally: the request reaches the server.
        await handle.write(b"x", 0)


async def test_sftp_statvfs_reports_the_quota(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """statvfs: the "filesystem" is the peer's quota (used counted), read-only."""
    async with await connect(server, alice_id) as link:
        assert await push_files(link, {b"a.bin": b"a" * 10_000}) == {b"a.bin": None}
    used = server.jail("alice").quota.used
    assert used == disk_charge(storage_dir, "alice") == blocks(10_000)
    async with sftp_session(server, alice_id) as sftp:
        fs = await sftp.statvfs("/")
        assert fs.blocks * fs.frsize == DEFAULT_QUOTA
        assert fs.bavail * fs.frsize == DEFAULT_QUOTA - used
        assert fs.flags & asyncssh.FXE_STATVFS_ST_RDONLY
        async with sftp.open("/a.bin", "rb") as handle:
            assert str(await handle.statvfs()) == str(fs)  # no __eq__


async def test_openssh_sftp_browses_own_files_and_is_refused_everything_else(
    server: NodeServer,
    alice_id: Identity,
    furnished: Path,
    tmp_path: Path,
    key_file: Callable[[str], Path],
) -> None:
    """OpenSSH's sftp as a hostile friend: lists and downloads its own files, nothing else."""
    before = snapshot(tmp_path / "storage")
    openssh = OpenSSH.for_server(server, key_file("alice"), tmp_path / "openssh")
    local = openssh.workdir / "local.txt"
    local.write_bytes(b"uploaded by a hostile friend")
    code, out, err = await openssh.sftp_batch(
        [
            "ls -la /",
            "get /notes.txt got-notes.txt",
            "get -r /photos got-photos",
            "df",
        ]
    )
    assert code == 0, err
    assert "notes.txt" in out
    assert "photos" in out
    assert "escape" not in out
    assert "filelink" not in out
    assert "fifo" not in out
    assert (openssh.workdir / "got-notes.txt").read_bytes() == ALICE_FILES["notes.txt"]
    assert (openssh.workdir / "got-photos" / "cat.jpg").read_bytes() == ALICE_FILES[
        "photos/cat.jpg"
    ]
    hostile = [
        "put local.txt /new.txt",
        "put local.txt /notes.txt",
        "mkdir /newdir",
        "rmdir /dir",
        "rm /notes.txt",
        "rename /notes.txt /moved.txt",
        "ln -s /etc /etc-link",
        "ln /notes.txt /hard.txt",
        "symlink / /dir/root",
        "chmod 4777 /notes.txt",
        "chown 0 /notes.txt",
        "chgrp 0 /notes.txt",
        "get /escape/secret.txt s1",
        "get /filelink s2",
        "get /rel/private.txt s3",
        "get /dir/up/bob/private.txt s4",
        "get /../bob/private.txt s5",
        "get ../../outside/secret.txt s6",
        f"get {furnished / 'secret.txt'} s7",
        "get /.mynas/peers/alice/state.json s8",
        "ls /escape",
        "ls /rel",
        "ls /..",
        "cd /dir/up",
        "get /fifo s9",
    ]
    # One command per batch: sftp -b stops at the first failure, and each must fail.
    for command in hostile:
        code, out, err = await openssh.sftp_batch([command])
        assert code != 0 or "/.." in command, (command, out, err)
        if command == "ls /..":  # the jail's root: "/.." is "/"
            assert "notes.txt" in out
            assert "private.txt" not in out
    downloads = {path.name for path in openssh.workdir.iterdir()}
    assert not {f"s{n}" for n in range(1, 10)} & downloads
    assert snapshot(tmp_path / "storage") == before


# --- (3) identity: unknown keys, other peers' jails, no keyless login -------------------------


async def test_unknown_key_is_refused_and_recorded(
    make_server: ServerFactory,
    mallory_id: Identity,
    tmp_path: Path,
    key_file: Callable[[str], Path],
) -> None:
    """An unknown key gets nothing; its fingerprint is recorded and reported once."""
    events = Events()
    server = await make_server(limits=LENIENT, on_event=events)
    with pytest.raises(AuthRefused):
        await connect(server, mallory_id)
    assert mallory_id.fingerprint in server.unknown_keys
    seen = server.unknown_keys[mallory_id.fingerprint]
    assert seen.public_key == mallory_id.public_line
    assert seen.address == HOST
    await events.wait("unknown_key")
    assert ("unknown_key", {"fingerprint": mallory_id.fingerprint, "address": HOST}) in (
        events.seen
    )
    openssh = OpenSSH.for_server(server, key_file("mallory"), tmp_path / "openssh")
    code, _, err = await openssh.ssh("-s", HOST, "sftp")
    assert code == 255
    assert "Permission denied (publickey)" in err
    assert server.unknown_keys[mallory_id.fingerprint].attempts >= 2
    assert events.count("unknown_key") == 1  # reported once, counted every time
    assert not events.count("peer_connected")


async def test_no_login_without_a_key(
    make_server: ServerFactory, tmp_path: Path, key_file: Callable[[str], Path]
) -> None:
    """No key: none, password and keyboard-interactive logins are all refused."""
    server = await make_server(limits=LENIENT)
    for options in (
        {},
        {"password": "alice"},
        {"kbdint_auth": True, "password": ""},
    ):
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(server, None, username="alice", **options)
    openssh = OpenSSH.for_server(server, key_file("mallory"), tmp_path / "openssh")
    code, _, err = await openssh.ssh(
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PasswordAuthentication=yes",
        "-o",
        "KbdInteractiveAuthentication=yes",
        "-o",
        "PreferredAuthentications=none,password,keyboard-interactive,hostbased",
        "alice@" + HOST,
        "true",
    )
    assert code == 255
    assert "Permission denied (publickey)" in err
    assert not server.peer_state.get("alice")


async def test_known_key_cannot_name_another_jail(
    server: NodeServer,
    alice_id: Identity,
    bob_id: Identity,
    storage_dir: Path,
    tmp_path: Path,
    key_file: Callable[[str], Path],
) -> None:
    """A peer sees only its own jail: by protocol, by SFTP "/", whatever the user name."""
    async with await connect(server, bob_id) as link:
        assert await push_files(link, {b"private.txt": BOB_SECRET}) == {b"private.txt": None}
    async with await connect(server, alice_id) as link:
        assert link.welcome["peer"] == "alice"
        outcome = await push_files(
            link,
            {
                b"mine.txt": b"alice",
                b"../bob/private.txt": b"overwritten by alice",
                b"../bob/new.txt": b"planted by alice",
                os.fsencode(storage_dir / "bob" / "x.txt"): b"planted by alice",
            },
        )
        refused = {path for path, error in outcome.items() if isinstance(error, HostRefused)}
        assert refused == set(outcome) - {b"mine.txt"}
        assert outcome[b"mine.txt"] is None
        assert await list_jail(link) == [b"mine.txt"]
        for path in (b"../bob", b"../bob/private.txt", b"bob/private.txt"):
            with pytest.raises(HostRefused):
                async for _ in link.read(path):
                    pass
    assert sorted(os.listdir(storage_dir / "bob")) == ["private.txt"]
    assert (storage_dir / "bob" / "private.txt").read_bytes() == BOB_SECRET
    # The SSH user name is ignored: "bob@host" with alice's key is alice.
    async with sftp_session(server, alice_id, username="bob") as sftp:
        assert sorted(await sftp.listdir("/")) == [".", "..", "mine.txt"]
        assert sorted(await sftp.listdir("/..")) == [".", "..", "mine.txt"]
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("/bob/private.txt")
    openssh = OpenSSH.for_server(server, key_file("alice"), tmp_path / "openssh")
    code, out, err = await openssh.sftp_batch(["ls -1 /", "ls -1 /.."], user="bob")
    assert code == 0, err
    assert "mine.txt" in out
    assert "private.txt" not in out


async def test_removed_peer_is_disconnected_and_refused(
    make_server: ServerFactory, alice_id: Identity, bob_id: Identity
) -> None:
    """Dropping a peer from the list cuts its live connection and refuses the next one."""
    grants = [PeerGrant("bob", bob_id.public_line, DEFAULT_QUOTA)]
    await _check_cut_off_by_new_grants(make_server, alice_id, grants)


async def _check_cut_off_by_new_grants(
    make_server: ServerFactory, key: Identity, grants: list[PeerGrant]
) -> None:
    """Connected with ``key``, the grants change: the link is cut, ``key`` is refused next."""
    events = Events()
    server = await make_server(limits=LENIENT, on_event=events)
    link = await connect(server, key)
    try:
        await server.set_peers(grants)
        await events.wait("peer_disconnected")
        with pytest.raises(MyNasError):
            await link.usage()
    finally:
        await link.close()
    with pytest.raises(AuthRefused):
        await connect(server, key)


# --- (4) no shell, exec, pty, X11, agent, forwarding or other subsystem ---------------------


@pytest.fixture
async def bystander() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP service on 127.0.0.1 that a forwarding attempt would reach: (port, what it got)."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(b"connected")
        received.append(await reader.read(100))
        writer.close()

    service = await asyncio.start_server(serve, HOST, 0)
    yield service.sockets[0].getsockname()[1], received
    service.close()
    await service.wait_closed()


async def test_asyncssh_client_gets_no_shell_exec_or_forwarding(
    server: NodeServer,
    alice_id: Identity,
    tmp_path: Path,
    bystander: tuple[int, list[bytes]],
) -> None:
    """Every channel and global request but our two subsystems is refused."""
    port, received = bystander
    canary = tmp_path / "canary"
    async with connected(server, alice_id) as conn:
        for command in (f"touch {canary}", "true", "scp -t .", "internal-sftp"):
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run(command, check=False)
        with pytest.raises(asyncssh.ChannelOpenError):  # shell with a pty
            await conn.create_process(term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):  # shell without
            await conn.create_process()
        for name in ("shell", "scp", "sftp-server", "mynas@2", "MYNAS@1", "sftp\0"):
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process(subsystem=name)
        with pytest.raises(asyncssh.ChannelOpenError):  # direct-tcpip (ssh -L, -W)
            await conn.open_connection(HOST, port)
        with pytest.raises(asyncssh.ChannelListenError):  # tcpip-forward (ssh -R)
            await conn.forward_remote_port("", 0, HOST, port)
        with pytest.raises(asyncssh.ChannelOpenError):  # direct-streamlocal
            await conn.open_unix_connection(str(tmp_path / "some.sock"))
        with pytest.raises(asyncssh.ChannelListenError):  # streamlocal-forward
            await conn.forward_remote_path(str(tmp_path / "planted.sock"), str(tmp_path / "x"))
        # The connection is still good for what a peer may do.
        sftp = await conn.start_sftp_client()
        assert await sftp.listdir("/") == [".", ".."]
        sftp.exit()
        await sftp.wait_closed()
    assert not canary.exists()
    assert not (tmp_path / "planted.sock").exists()
    assert received == []


async def test_openssh_gets_no_shell_exec_pty_or_other_subsystem(
    server: NodeServer,
    tmp_path: Path,
    key_file: Callable[[str], Path],
) -> None:
    """`ssh host cmd`, `ssh -tt host`, `ssh host`, `ssh -s host other`: refused, nothing ran."""
    canary = tmp_path / "canary"
    openssh = OpenSSH.for_server(server, key_file("alice"), tmp_path / "openssh")
    code, out, err = await openssh.ssh(HOST, f"touch {canary}; echo ran")
    assert code == 255
    assert "exec request failed" in err
    assert b"ran" not in out
    code, out, err = await openssh.ssh("-tt", HOST)
    assert code == 255
    assert "PTY allocation request failed" in err
    code, out, err = await openssh.ssh("-T", HOST)
    assert code == 255
    assert "shell request failed" in err
    for name in ("shell", "other", "scp"):
        code, out, err = await openssh.ssh("-s", HOST, name)
        assert code == 255
        assert "subsystem request failed" in err
    assert not canary.exists()


@pytest.mark.parametrize("first", [protocol.SUBSYSTEM, "sftp"])
async def test_a_channel_gets_one_subsystem_only(
    server: NodeServer, alice_id: Identity, first: str
) -> None:
    """A second `subsystem` request on a running channel is refused, whatever it asks for.

    Accepted, asyncssh would start another handler on the same channel: many SFTP servers on
    one channel, each with its own handle limit, past the per-connection session limit.
    """
    async with connected(server, alice_id) as conn:
        writer, reader, _ = await conn.open_session(subsystem=first, encoding=None)
        channel = writer.channel
        for again in ("sftp", protocol.SUBSYSTEM):
            assert await channel._make_request(b"subsystem", String(again)) is False
        if first == protocol.SUBSYSTEM:  # the first subsystem still serves
            writer.write(protocol.hello())
            kind, _ = await protocol.read_frame(reader)
            assert kind is protocol.Frame.WELCOME
        writer.close()


async def test_openssh_forwarding_is_refused(
    server: NodeServer,
    tmp_path: Path,
    key_file: Callable[[str], Path],
    bystander: tuple[int, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ssh -W`, `-R` (TCP and unix socket), `-L`, `-A`, `-X`: nothing is forwarded."""
    port, received = bystander
    openssh = OpenSSH.for_server(server, key_file("alice"), tmp_path / "openssh")
    code, _, err = await openssh.ssh("-W", f"{HOST}:{port}", HOST)
    assert code == 255
    assert "stdio forwarding failed" in err  # asyncssh's refusal; the bystander saw nothing
    forward_failure = ("-N", "-o", "ExitOnForwardFailure=yes")
    code, _, err = await openssh.ssh(*forward_failure, "-R", f"0:{HOST}:{port}", HOST)
    assert code == 255
    assert "remote port forwarding failed" in err
    planted = tmp_path / "planted.sock"
    code, _, err = await openssh.ssh(*forward_failure, "-R", f"{planted}:{HOST}:{port}", HOST)
    assert code == 255
    assert "remote port forwarding failed" in err
    assert not planted.exists()
    await _local_forward_refused(openssh, port)
    await _agent_and_x11_refused(openssh, tmp_path, monkeypatch)
    assert received == []


async def _local_forward_refused(openssh: OpenSSH, port: int) -> None:
    """`ssh -L`: the local end accepts, the server refuses the channel, nothing connects."""
    probe = await asyncio.start_server(lambda r, w: None, HOST, 0)
    local_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        *openssh.options(),
        "-p",
        str(openssh.port),
        "-N",
        "-L",
        f"{HOST}:{local_port}:{HOST}:{port}",
        HOST,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # ssh listens locally once logged in: nothing to await but the port
            try:
                reader, writer = await asyncio.open_connection(HOST, local_port)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        writer.write(b"hello through the tunnel")
        # Closed (or reset) by ssh once the server refused the channel.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert b"open failed" in err


async def _agent_and_x11_refused(
    openssh: OpenSSH, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ssh -A -X` with a real agent and a display: the server never offers either."""
    offers: list[tuple[str, object]] = []
    agent_listener = asyncssh.SSHServerConnection.create_agent_listener
    x11_listener = asyncssh.SSHServerConnection.attach_x11_listener

    async def spy_agent(self: asyncssh.SSHServerConnection) -> bool:
        result = await agent_listener(self)
        offers.append(("agent", result))
        return result

    async def spy_x11(self: asyncssh.SSHServerConnection, *args: Any) -> str | None:
        result = await x11_listener(self, *args)
        offers.append(("x11", result))
        return result

    monkeypatch.setattr(asyncssh.SSHServerConnection, "create_agent_listener", spy_agent)
    monkeypatch.setattr(asyncssh.SSHServerConnection, "attach_x11_listener", spy_x11)
    sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec(
        "ssh-agent", "-D", "-a", str(sock), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_until(sock.exists, "ssh-agent's socket")
        code, _, err = await openssh.ssh(
            "-A",
            "-X",
            HOST,
            "true",
            env={"SSH_AUTH_SOCK": str(sock), "DISPLAY": "127.0.0.1:77"},
        )
    finally:
        agent.terminate()
        await agent.wait()
    assert code == 255
    assert "X11 forwarding request failed" in err
    assert ("agent", False) in offers
    assert ("x11", None) in offers
    assert all(not result for _, result in offers)


# --- (5) quota: one big file, many small ones, concurrent connections, trash ----------------

QUOTA = 256 * KIB


@pytest.fixture
async def small(make_server: ServerFactory, alice_id: Identity) -> NodeServer:
    """A host granting alice 256 KiB (64 blocks), four connections at most."""
    return await make_server([PeerGrant("alice", alice_id.public_line, QUOTA)], limits=LENIENT)


async def test_quota_refuses_one_big_file_before_writing(
    small: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """PUT and OPEN of a file over the quota: refused up front, saying needed vs left."""
    big = b"b" * (300 * KIB)
    raw = await Raw.open(small, alice_id)
    raw.send(protocol.put(1, b"big.bin", MTIME, 0o644, big))
    info = fail_info((await raw.sync(2))[1])
    assert info["code"] == "quota"
    assert info["needed"] == blocks(len(big))
    assert info["available"] == QUOTA
    assert info["message"] == "quota exceeded: 300.0 KiB needed, 256.0 KiB left"
    raw.send(protocol.open_upload(3, b"big.bin", len(big), MTIME, 0o644))
    info = fail_info(await raw.recv())
    assert (info["code"], info["needed"], info["available"]) == ("quota", len(big), QUOTA)
    # An upload that announces a small size and then sends more is stopped at its size.
    raw.send(protocol.open_upload(4, b"liar.bin", 8 * KIB, MTIME, 0o644))
    assert (await raw.recv())[0] is Frame.OFFSET
    raw.send(
        protocol.data(4, big[: 64 * KIB]), protocol.data(4, big), protocol.close(4, Close.FINISH)
    )
    assert fail_info(await raw.recv())["code"] == "io"
    await raw.close()
    assert disk_charge(storage_dir, "alice") == 0
    assert os.listdir(storage_dir / "alice") == []
    jail = small.jail("alice")
    await wait_until(lambda: jail.quota.reserved == 0, "reservations released")
    async with await connect(small, alice_id) as link:
        # Exactly the quota fits; one more byte does not.
        assert await push_files(link, {b"full.bin": b"f" * QUOTA}) == {b"full.bin": None}
        outcome = await push_files(link, {b"one.byte": b"1"})
        error = outcome[b"one.byte"]
        assert isinstance(error, QuotaExceeded)
        assert (error.needed, error.available) == (BLOCK, 0)
        with pytest.raises(QuotaExceeded):
            await link.open_upload(b"more.bin", 1, MTIME, 0o644)
    assert disk_charge(storage_dir, "alice") == QUOTA == jail.quota.used


async def test_quota_refuses_many_small_files(
    small: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """100 files of 4 KiB into 64 blocks: 64 stored, 36 refused, usage exactly the quota."""
    files = {b"f%03d" % n: bytes([n]) * BLOCK for n in range(100)}
    async with await connect(small, alice_id) as link:
        outcome = await push_files(link, files)
    stored = [path for path, error in outcome.items() if error is None]
    refused = [error for error in outcome.values() if error is not None]
    assert len(stored) == QUOTA // BLOCK
    assert len(refused) == 100 - QUOTA // BLOCK
    assert all(isinstance(error, QuotaExceeded) for error in refused)
    assert disk_charge(storage_dir, "alice") == QUOTA == small.jail("alice").quota.used
    assert sorted(os.fsencode(name) for name in os.listdir(storage_dir / "alice")) == sorted(stored)


async def test_quota_holds_against_concurrent_connections(
    small: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Four connections of one peer race small and large files: never past the quota."""

    async def one(number: int) -> int:
        async with await connect(small, alice_id) as link:
            files = {b"c%d-%02d" % (number, n): b"s" * (3 * KIB) for n in range(24)}
            outcome = await push_files(link, files)
            stored = sum(blocks(3 * KIB) for error in outcome.values() if error is None)
            try:
                await upload(link, b"big%d.bin" % number, b"L" * (60 * KIB))
            except QuotaExceeded:
                return stored
            return stored + blocks(60 * KIB)

    stored = await asyncio.gather(*(one(number) for number in range(4)))
    jail = small.jail("alice")
    await wait_until(lambda: jail.quota.reserved == 0, "reservations released")
    on_disk = disk_charge(storage_dir, "alice")
    assert sum(stored) <= on_disk <= QUOTA
    assert on_disk == jail.quota.used
    assert sum(stored) > QUOTA - 16 * BLOCK  # the quota was really reached


async def test_quota_counts_the_trash(
    small: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Overwrites and deletes free nothing: the old versions in trash still count."""
    versions = [bytes([n]) * (100 * KIB) for n in range(3)]
    async with await connect(small, alice_id) as link:
        assert await push_files(link, {b"f": versions[0]}) == {b"f": None}
        assert await push_files(link, {b"f": versions[1]}) == {b"f": None}
        outcome = await push_files(link, {b"f": versions[2]})
        assert isinstance(outcome[b"f"], QuotaExceeded)
        errors: list[MyNasError | None] = []
        await link.delete(b"f", errors.append)
        await link.sync()
        assert errors == [None]
        outcome = await push_files(link, {b"f": versions[2]})
        assert isinstance(outcome[b"f"], QuotaExceeded)
        usage = await link.usage()
    assert trash_contents(storage_dir, "alice") == sorted(versions[:2])
    assert usage["used"] == disk_charge(storage_dir, "alice") > 2 * 100 * KIB
    assert usage["quota"] == QUOTA


# --- (6) trash tampering ---------------------------------------------------------------------


async def test_trash_keeps_what_a_peer_overwrites_or_deletes(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Ransomware on alice's node rewrites and deletes everything: the trash keeps it all."""
    originals = {b"docs/a.txt": b"original a", b"docs/b.txt": b"original b"}
    large = b"L" * (600 * KIB)
    async with await connect(server, alice_id) as link:
        assert set((await push_files(link, originals)).values()) == {None}
        await upload(link, b"docs/large.bin", large)
        garbage = dict.fromkeys(originals, b"encrypted!")
        assert set((await push_files(link, garbage)).values()) == {None}
        await upload(link, b"docs/large.bin", b"E" * (300 * KIB), mtime_ns=MTIME + 1)
        errors: list[MyNasError | None] = []
        await link.delete(b"docs", errors.append)
        await link.sync()
        assert errors == [None]
        assert await list_jail(link) == []
    kept = trash_contents(storage_dir, "alice")
    for content in (*originals.values(), large):
        assert content in kept
    assert server.jail("alice").quota.used == disk_charge(storage_dir, "alice")


async def test_peer_cannot_reach_its_trash(
    server: NodeServer, alice_id: Identity, storage_dir: Path, tmp_path: Path
) -> None:
    """The trash is outside the jail and `.mynas` names are reserved: no way to it at all."""
    async with await connect(server, alice_id) as link:
        assert await push_files(link, {b"f.txt": b"v1"}) == {b"f.txt": None}
        assert await push_files(link, {b"f.txt": b"v2"}) == {b"f.txt": None}
        # Asking for a shorter retention changes nothing: requests only ever lengthen it.
        await link.set_retention("f.txt", 0)
    assert server.jail("alice").retention_days(b"f.txt") == 30
    (stamp,) = os.listdir(storage_dir / ".mynas" / "trash" / "alice")
    before = world(tmp_path)
    trash_paths = [
        b"../.mynas/trash/alice/" + stamp.encode() + b"/f.txt",
        b"../.mynas/trash/alice",
        b"../.mynas/peers/alice/state.json",
        b".mynas/trash/alice",
        b".mynas",
    ]
    raw = await Raw.open(server, alice_id)
    req = 0
    for path in trash_paths:
        for op in hostile_requests(0, path):
            if op == "RETENTION":
                continue
            req += 1
            raw.send(hostile_requests(req, path)[op])
    answers = await raw.sync(req + 1)
    assert all(fail_info(answers[n])["code"] == "path" for n in range(1, req + 1))
    raw.send(protocol.query(req + 2, {"op": "retention", "folder": "f.txt", "days": -5}))
    assert fail_info(await raw.recv())  # refused, and the session goes on
    await raw.close()
    async with sftp_session(server, alice_id) as sftp:
        assert sorted(await sftp.listdir("/")) == [".", "..", "f.txt"]
        for path in ("/.mynas", "/../.mynas/trash/alice", f"/../.mynas/trash/alice/{stamp}"):
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.stat(path)
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.listdir(path)
            with pytest.raises(asyncssh.SFTPError):
                await sftp.remove(path)
    assert world(tmp_path) == before
    assert trash_contents(storage_dir, "alice") == [b"v1"]


# --- (7) a connection cut mid-file and mid-batch; a restart --------------------------------


def partials(storage: Path, peer: str) -> list[str]:
    return os.listdir(storage / ".mynas" / "partial" / peer)


def temps(storage: Path, peer: str) -> list[str]:
    return os.listdir(storage / ".mynas" / "tmp" / peer)


async def test_cut_mid_file_keeps_the_old_version_and_resumes(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Kill the connection while DATA flows: old version intact, no temp, resume at offset."""
    old = b"old version" * 1000
    new = os.urandom(3 * MIB)
    async with await connect(server, alice_id) as link:
        await upload(link, b"big.bin", old)
    raw = await Raw.open(server, alice_id)
    raw.send(protocol.open_upload(1, b"big.bin", len(new), MTIME + 1, 0o644))
    assert protocol.parse_offset((await raw.recv())[1]) == (1, 0)
    sent = 6 * protocol.CHUNK
    for start in range(0, sent, protocol.CHUNK):
        raw.send(protocol.data(1, new[start : start + protocol.CHUNK]))
    await raw.writer.drain()
    partial_dir = storage_dir / ".mynas" / "partial" / "alice"

    def some_bytes_arrived() -> bool:
        return any((partial_dir / name).stat().st_size > 0 for name in os.listdir(partial_dir))

    await wait_until(some_bytes_arrived, "the first chunks on disk")
    raw.conn.abort()  # no goodbye: the TCP connection just dies
    await raw.conn.wait_closed()
    # The server checkpoints the partial: its name carries the length known to be durable.
    await wait_until(
        lambda: any(int(name.split(".")[2]) > 0 for name in partials(storage_dir, "alice")),
        "the abandoned upload's checkpoint",
    )
    assert (storage_dir / "alice" / "big.bin").read_bytes() == old
    assert temps(storage_dir, "alice") == []
    (name,) = partials(storage_dir, "alice")
    durable = int(name.split(".")[2])
    assert 0 < durable <= sent
    async with await connect(server, alice_id) as link:
        req, offset = await link.open_upload(b"big.bin", len(new), MTIME + 1, 0o644)
        assert offset == durable
        for start in range(offset, len(new), protocol.CHUNK):
            await link.send_data(req, new[start : start + protocol.CHUNK])
        await link.close_upload(req, Close.FINISH)
    assert (storage_dir / "alice" / "big.bin").read_bytes() == new
    assert old in trash_contents(storage_dir, "alice")
    assert partials(storage_dir, "alice") == []
    jail = server.jail("alice")
    assert jail.quota.used == disk_charge(storage_dir, "alice")
    assert jail.quota.reserved == 0


async def test_cut_mid_batch_leaves_whole_files_only(
    make_server: ServerFactory, alice_id: Identity, storage_dir: Path
) -> None:
    """Kill the connection mid-batch: every file is its old or new version, no temp left."""
    events = Events()
    # Small batches, so several are written (and one is in flight) when the cut comes.
    server = await make_server(on_event=events, limits=Limits(free_failures=1000, batch_files=8))
    old = {b"f%03d" % n: b"old %d" % n * 100 for n in range(40)}
    async with await connect(server, alice_id) as link:
        assert set((await push_files(link, old)).values()) == {None}
    new = {b"f%03d" % n: (b"new %d" % n) * 2000 for n in range(400)}
    raw = await Raw.open(server, alice_id)
    for n, (path, data) in enumerate(new.items()):
        raw.send(protocol.put(n + 1, path, MTIME + 1, 0o644, data))
    await raw.writer.drain()
    first = storage_dir / "alice" / "f000"
    await wait_until(lambda: first.read_bytes() == new[b"f000"], "the first batch on disk")
    raw.conn.abort()
    await raw.conn.wait_closed()
    await events.wait("peer_disconnected", 2)
    jail = server.jail("alice")
    await server.close()  # returns once every session has ended its writes
    assert jail.quota.reserved == 0
    assert temps(storage_dir, "alice") == []
    landed = 0
    for path, data in new.items():
        target = storage_dir / "alice" / os.fsdecode(path)
        if target.exists():
            assert target.read_bytes() in (data, old.get(path)), path
            landed += target.read_bytes() == data
        else:
            assert path not in old
    assert 0 < landed < len(new)  # the cut came mid-stream
    assert jail.quota.used == disk_charge(storage_dir, "alice")


async def test_restart_recounts_usage_from_disk(
    make_server: ServerFactory, alice_id: Identity, storage_dir: Path
) -> None:
    """A new server on the same storage trusts the disk, not a stale or forged state file."""
    grants = [PeerGrant("alice", alice_id.public_line, QUOTA)]
    first = await make_server(grants, limits=LENIENT)
    async with await connect(first, alice_id) as link:
        await push_files(link, {b"a/one": b"1" * 10_000, b"a/two": b"2" * 20_000})
        await push_files(link, {b"a/one": b"overwritten"})  # the old one goes to the trash
        req, _ = await link.open_upload(b"part.bin", 100 * KIB, MTIME, 0o644)
        await link.send_data(req, b"p" * (40 * KIB))
        await link.close_upload(req, Close.ABANDON)  # a partial, kept for a resume
    expected = disk_charge(storage_dir, "alice")
    assert first.jail("alice").quota.used == expected
    await first.close()
    state = storage_dir / ".mynas" / "peers" / "alice" / "state.json"
    forged = json.loads(state.read_text())
    forged["used"] = 0  # as if alice's data had vanished (or a crash lost the count)
    state.write_text(json.dumps(forged))
    second = await make_server(grants, limits=LENIENT)
    jail = second.jail("alice")
    assert jail.quota.used == expected
    async with await connect(second, alice_id) as link:
        assert (await link.usage())["used"] == expected
        room = QUOTA - expected
        outcome = await push_files(link, {b"fill": b"x" * (room + 1)})
        assert isinstance(outcome[b"fill"], QuotaExceeded)
        assert outcome[b"fill"].available == room


# --- (8) authentication: failures from one address get slowed down ---------------------------


async def test_repeated_failures_from_one_address_are_slowed_down(
    make_server: ServerFactory, mallory_id: Identity, alice_id: Identity
) -> None:
    """After `free_failures` failed logins, each new attempt from that address waits."""
    server = await make_server(limits=Limits(free_failures=2, max_delay=0.4))

    async def attempt(who: Identity) -> float:
        failures = len(server._failures.get(HOST, ()))
        started = time.monotonic()
        try:
            link = await connect(server, who)
        except AuthRefused:
            # The server counts the failure when the connection is gone.
            await wait_until(
                lambda: len(server._failures.get(HOST, ())) > failures, "the failure counted"
            )
        else:
            await link.close()
        return time.monotonic() - started

    free = [await attempt(mallory_id) for _ in range(2)]
    slowed = [await attempt(mallory_id) for _ in range(2)]
    assert max(free) < 0.3
    assert min(slowed) >= 0.38
    # The address is what is slowed down, not a key: a peer behind it waits too.
    assert await attempt(alice_id) >= 0.38


# --- (9) resource bounds ---------------------------------------------------------------------


async def test_sessions_per_connection_are_bounded_and_given_back(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    """Two sessions at most; SFTP, replication and refused requests all give theirs back."""
    server = await make_server(limits=Limits(sessions_per_connection=2, free_failures=1000))
    async with connected(server, alice_id) as conn:
        first = await Raw.open(server, alice_id, conn=conn)
        second = await Raw.open(server, alice_id, conn=conn)
        with pytest.raises(asyncssh.ChannelOpenError):
            await Raw.open(server, alice_id, conn=conn)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()
        for raw in (first, second):
            raw.writer.channel.close()
            await raw.writer.channel.wait_closed()
        for _ in range(5):  # more than the limit, one after the other
            sftp = await conn.start_sftp_client()
            await sftp.listdir("/")
            sftp.exit()
            await sftp.wait_closed()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
            raw = await Raw.open(server, alice_id, conn=conn)
            raw.writer.write_eof()
            assert await raw.ended() == b""
            await raw.writer.channel.wait_closed()


async def test_connections_per_peer_are_bounded(
    make_server: ServerFactory, alice_id: Identity, bob_id: Identity
) -> None:
    """A peer's third connection is dropped after login; other peers are not affected."""
    events = Events()
    server = await make_server(
        limits=Limits(connections_per_peer=2, free_failures=1000), on_event=events
    )
    first = await connect(server, alice_id)
    second = await connect(server, alice_id)
    try:
        with pytest.raises(PeerUnreachable):
            await connect(server, alice_id)
        async with await connect(server, bob_id) as link:
            assert link.welcome["peer"] == "bob"
        assert server.peer_state["alice"].connections == 2
        await first.close()
        await events.wait("peer_disconnected", 2)  # alice's first, and bob's
        async with await connect(server, alice_id) as link:
            assert (await link.usage())["used"] == 0
    finally:
        await first.close()
        await second.close()


async def test_too_many_unauthenticated_connections_are_dropped(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    """Connections that never log in: capped in number, and dropped after login_timeout."""
    server = await make_server(
        limits=Limits(unauthenticated_connections=2, login_timeout=1.0, free_failures=1000)
    )
    silent = [await asyncio.open_connection(HOST, server.port) for _ in range(2)]
    for reader, _ in silent:
        assert (await reader.readline()).startswith(b"SSH-2.0-")
    reader, writer = await asyncio.open_connection(HOST, server.port)
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), 5)  # dropped at once (maybe after the banner)
    assert time.monotonic() - started < 0.5
    writer.close()
    # While the two hold their places, even a real peer cannot log in: that is the bound.
    with pytest.raises(PeerUnreachable):
        await connect(server, alice_id)
    # The login timeout frees them without anyone's help.
    for reader, writer in silent:
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    await wait_until(lambda: server._unauthenticated == 0, "the places given back")
    async with await connect(server, alice_id) as link:
        assert link.welcome["peer"] == "alice"


def _hostile_streams() -> dict[str, bytes]:
    head = struct.Struct(">IB")
    return {
        "oversized frame": head.pack(MAX_FRAME + 1, Frame.PUT) + b"x" * 64,
        "huge length": head.pack(0xFFFFFFFF, Frame.HELLO),
        "zero length": head.pack(0, Frame.HELLO) + b"\0" * 16,
        "ssh banner": b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 16,
        "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "unknown type": head.pack(5, 99) + b"\0\0\0\0",
        "PUT before HELLO": protocol.put(1, b"early.txt", MTIME, 0o644, b"early"),
        "answer frame": protocol.ok(1),
    }


def _hostile_after_hello() -> dict[str, bytes]:
    big = json.dumps({"op": "usage", "x": [[[[[]]]]]}).encode()
    return {
        "second HELLO": protocol.hello(),
        "oversized PUT": struct.pack(">IB", MAX_FRAME + 1, Frame.PUT) + b"x" * 64,
        "truncated DELETE": raw_frame(Frame.DELETE, b"\0\0"),
        "path past the body": raw_frame(Frame.DELETE, b"\0\0\0\1\xff\xff" + b"a"),
        "truncated PUT": raw_frame(Frame.PUT, b"\0\0\0\1"),
        "bad CLOSE mode": raw_frame(Frame.CLOSE, b"\0\0\0\1\x09"),
        "DATA for nothing": protocol.data(7, b"stray bytes"),
        "CLOSE for nothing": protocol.close(7, Close.FINISH),
        "unknown query": protocol.query(1, {"op": "shell", "cmd": "id"}),
        "query not an object": raw_frame(Frame.QUERY, b"\0\0\0\1[1]"),
        "query bad JSON": raw_frame(Frame.QUERY, b"\0\0\0\1{"),
        "query nested JSON": raw_frame(Frame.QUERY, b"\0\0\0\1" + b"[" * 200_000),
        "retention not a number": protocol.query(
            1, {"op": "retention", "folder": "a", "days": "9"}
        ),
        "answer frame": protocol.reply(1, {}),
        "not JSON": big.replace(b"{", b"(", 1),
    }


async def test_hostile_frames_end_the_session_and_nothing_else(
    make_server: ServerFactory,
    alice_id: Identity,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage before HELLO, oversized and malformed frames: that session ends, cleanly.

    Nothing is written, nothing leaks, and the same connection serves the next session.
    """
    server = await make_server(limits=Limits(hello_timeout=0.5, free_failures=1000))
    before = world(tmp_path)
    async with connected(server, alice_id) as conn:
        for name, data in _hostile_streams().items():
            raw = await Raw.open(server, alice_id, conn=conn, hello=False)
            raw.send(data)
            assert await raw.ended() == b"", name
        for name, data in _hostile_after_hello().items():
            raw = await Raw.open(server, alice_id, conn=conn)
            raw.send(data)
            rest = await raw.ended()
            assert all(kind is Frame.FAIL for kind in _kinds(rest)), name
        # A session that never says HELLO is dropped after hello_timeout.
        raw = await Raw.open(server, alice_id, conn=conn, hello=False)
        started = time.monotonic()
        assert await raw.ended() == b""
        assert 0.4 < time.monotonic() - started < 5
        # The connection itself is fine, and so is the server.
        raw = await Raw.open(server, alice_id, conn=conn)
        raw.send(protocol.query(1, {"op": "usage"}))
        assert (await raw.recv())[0] is Frame.REPLY
    assert world(tmp_path) == before
    assert server.jail("alice").quota.reserved == 0
    assert "Uncaught exception" not in caplog.text
    assert "Traceback" not in caplog.text


def _kinds(stream: bytes) -> list[Frame]:
    kinds = []
    while stream:
        length, kind = struct.unpack_from(">IB", stream)
        kinds.append(Frame(kind))
        stream = stream[4 + length :]
    return kinds


async def test_a_peer_that_never_reads_is_held_to_a_bounded_buffer(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """READ after READ, answers never read: the host stops producing instead of buffering."""
    content = os.urandom(MIB)
    (storage_dir / "alice" / "big.bin").write_bytes(content)
    raw = await Raw.open(server, alice_id)
    requests = 40  # 40 MiB of answers
    for req in range(1, requests + 1):
        raw.send(protocol.read(req, b"big.bin"))
    await raw.writer.drain()

    def buffered() -> int:
        return sum(
            channel.get_write_buffer_size()
            for connection in server._connections
            if connection._conn is not None
            for channel in connection._conn._channels.values()
        )

    samples = [buffered()]
    while len(samples) < 5 or len(set(samples[-5:])) > 1:  # until the host has stalled
        await asyncio.sleep(0.02)
        samples.append(buffered())
        assert len(samples) < 500, "the host never stalled"
    assert max(samples) < 8 * MIB
    # Nothing was lost meanwhile: reading now gets every answer, whole.
    received = 0
    done = 0
    while done < requests:
        kind, body = await raw.recv()
        if kind is Frame.DATA:
            received += len(body) - 4
        elif kind is Frame.DONE:
            done += 1
    assert received == requests * len(content)
    await raw.close()


async def test_upload_ended_early_frees_its_file_and_slot(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """CLOSE(finish) before all bytes: refused, and the upload's fd, slot and space are freed."""
    fds = len(os.listdir("/proc/self/fd"))
    raw = await Raw.open(server, alice_id)
    for req in range(1, 41):  # a new version each time: each starts from scratch
        raw.send(protocol.open_upload(req, b"f.bin", 10 * KIB, MTIME + req, 0o644))
        kind, _ = await raw.recv()
        assert kind is Frame.OFFSET, req  # never "already being uploaded"
        raw.send(protocol.data(req, b"x" * KIB), protocol.close(req, Close.FINISH))
        assert fail_info(await raw.recv())["code"] == "io"
    assert len(os.listdir("/proc/self/fd")) < fds + 10
    assert not (storage_dir / "alice" / "f.bin").exists()
    jail = server.jail("alice")
    assert jail.quota.reserved == 0
    # What arrived is kept for a resume, and counted.
    raw.send(protocol.open_upload(99, b"f.bin", 10 * KIB, MTIME + 40, 0o644))
    assert protocol.parse_offset((await raw.recv())[1]) == (99, KIB)
    raw.send(protocol.close(99, Close.DISCARD))
    assert (await raw.recv())[0] is Frame.OK
    await raw.close()
    assert jail.quota.used == disk_charge(storage_dir, "alice") == 0


async def test_sftp_open_handles_are_bounded(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """One SFTP session cannot hold more than a few dozen files or directories open."""
    (storage_dir / "alice" / "f.txt").write_bytes(b"f")
    crowd = storage_dir / "alice" / "crowd"  # more names than one answer carries
    crowd.mkdir()
    for n in range(200):
        (crowd / str(n)).mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    async with sftp_session(server, alice_id) as sftp:
        handler = sftp._handler

        async def open_file() -> bytes:
            return await handler.open(b"/f.txt", asyncssh.FXF_READ, asyncssh.SFTPAttrs())

        async def open_listing() -> bytes:
            handle = await handler.opendir(b"/crowd")
            try:
                await handler.readdir(handle)  # a listing under way holds a directory fd
            except asyncssh.SFTPError:
                await handler.close(handle)
                raise
            return handle

        files = await _open_until_refused(open_file)
        assert 8 <= len(files) <= 256
        assert len(os.listdir("/proc/self/fd")) < fds + 300
        for handle in files:
            await handler.close(handle)
        dirs = await _open_until_refused(open_listing)
        assert 8 <= len(dirs) <= 256
        for handle in dirs:
            await handler.close(handle)
        async with sftp.open("/f.txt", "rb") as handle:  # handles were given back
            assert await handle.read() == b"f"
        assert sorted(await sftp.listdir("/")) == [".", "..", "crowd", "f.txt"]
        assert len(await sftp.listdir("/crowd")) == 202


async def _open_until_refused(opener: Callable[[], Awaitable[bytes]]) -> list[bytes]:
    handles = []
    refusal = None
    for _ in range(1000):
        try:
            handles.append(await opener())
        except asyncssh.SFTPFailure as err:
            refusal = err.reason
            break
    assert refusal is not None, "1000 handles open at once"
    assert "too many open files" in refusal
    return handles


async def test_sftp_lists_big_directories_whole_and_hides_links(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Listings are read a chunk at a time: nothing is lost, no link ever shows."""
    many = storage_dir / "alice" / "many"
    many.mkdir()
    for n in range(1000):
        (many / f"link{n}").symlink_to("/etc")
    names = {f"file{n}" for n in range(300)}
    for name in names:
        (many / name).write_bytes(b"")
    async with sftp_session(server, alice_id) as sftp:
        assert set(await sftp.listdir("/many")) == names | {".", ".."}


class _StalledLogin(asyncssh.SSHClient):
    """Offers its key only when told to: a login held open across a change on the host."""

    def __init__(self, key: asyncssh.SSHKey, gate: asyncio.Event) -> None:
        self.asked = asyncio.Event()
        self._key = key
        self._gate = gate
        self._given = False

    async def public_key_auth_requested(self) -> asyncssh.SSHKey | None:
        if self._given:
            return None
        self._given = True
        self.asked.set()
        await self._gate.wait()
        return self._key


@pytest.mark.parametrize("change", ["another peer removed", "the peer's key replaced"])
async def test_a_login_held_across_a_peer_change_gets_no_other_jail(
    make_server: ServerFactory,
    alice_id: Identity,
    bob_id: Identity,
    mallory_id: Identity,
    storage_dir: Path,
    change: str,
) -> None:
    """Bob starts logging in, the host's peer list changes, then bob finishes.

    Whatever changed meanwhile, bob ends up in his own jail or nowhere, never in carol's.
    """
    carol_id = mallory_id
    grants = {
        "alice": PeerGrant("alice", alice_id.public_line, DEFAULT_QUOTA),
        "bob": PeerGrant("bob", bob_id.public_line, DEFAULT_QUOTA),
        "carol": PeerGrant("carol", carol_id.public_line, DEFAULT_QUOTA),
    }
    server = await make_server(list(grants.values()), limits=LENIENT)
    (storage_dir / "carol" / "carol.txt").write_bytes(b"carol's")
    gate = asyncio.Event()
    stalled = _StalledLogin(bob_id.private_key, gate)

    async def log_in() -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            HOST,
            server.port,
            client_factory=lambda: stalled,
            username="mynas",
            client_keys=None,
            public_key_auth=True,
            known_hosts=([asyncssh.import_public_key(server.identity.public_line)], [], []),
            config=None,
            agent_path=None,
        )

    login = asyncio.create_task(log_in())
    await stalled.asked.wait()
    if change == "another peer removed":
        await server.set_peers([grants["bob"], grants["carol"]])
        expected: str | None = "bob"
    else:  # bob's key leaked and was replaced: the old key must not get in any more
        new_bob = PeerGrant("bob", alice_id.public_line, DEFAULT_QUOTA)
        await server.set_peers([grants["carol"], new_bob])
        expected = None
    gate.set()
    try:
        conn = await login
    except asyncssh.PermissionDenied:
        assert expected is None
        return
    async with conn:  # what connected() does, for a connection made by hand
        try:
            raw = await Raw.open(server, bob_id, conn=conn)
            assert raw.welcome["peer"] == expected
            raw.send(protocol.list_tree(1, b"", with_hash=False))
            assert (await raw.recv())[0] is Frame.DONE  # bob's jail is empty
        except asyncssh.ChannelOpenError, asyncio.IncompleteReadError:
            assert expected is None


async def test_replacing_a_peers_key_drops_its_live_connections(
    make_server: ServerFactory, alice_id: Identity, bob_id: Identity
) -> None:
    """A leaked key is replaced: whoever is connected with the old one is cut off at once."""
    grants = [
        PeerGrant("alice", alice_id.public_line, DEFAULT_QUOTA),
        PeerGrant("bob", alice_id.public_line, DEFAULT_QUOTA),  # bob's new key
    ]
    await _check_cut_off_by_new_grants(make_server, bob_id, grants)


def _server_buffered(server: NodeServer) -> int:
    """Bytes the host's channels hold, written but not yet taken by their peers."""
    return sum(
        channel.get_write_buffer_size()
        for connection in server._connections
        if connection._conn is not None
        for channel in connection._conn._channels.values()
    )


async def _until_stalled(server: NodeServer) -> list[int]:
    """Sample what the host buffers until it stops changing; return the samples."""
    samples = [_server_buffered(server)]
    while len(samples) < 5 or len(set(samples[-5:])) > 1:
        await asyncio.sleep(0.02)
        samples.append(_server_buffered(server))
        assert len(samples) < 500, "the host never stalled"
    return samples


def _sftp_packet(kind: int, *fields: bytes) -> bytes:
    payload = bytes([kind]) + b"".join(fields)
    return struct.pack(">I", len(payload)) + payload


def _sftp_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


async def test_an_sftp_peer_that_never_reads_is_held_to_a_bounded_buffer(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Thousands of 1 MiB READs for 30 bytes each, answers never read: the host stalls."""
    (storage_dir / "alice" / "big.bin").write_bytes(os.urandom(MIB))
    async with connected(server, alice_id) as conn:
        writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)

        async def answer() -> bytes:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            return await reader.readexactly(length)

        writer.write(_sftp_packet(1, struct.pack(">I", 3)))  # INIT, version 3
        assert (await answer())[0] == 2  # VERSION
        open_request = struct.pack(">I", 1) + _sftp_string(b"/big.bin") + struct.pack(">II", 1, 0)
        writer.write(_sftp_packet(3, open_request))
        reply = await answer()
        assert reply[0] == 102  # HANDLE
        handle = reply[9 : 9 + struct.unpack_from(">I", reply, 5)[0]]
        requests = 3000  # 3 GiB of answers asked for with 100 KiB of requests
        writer.write(
            b"".join(
                _sftp_packet(
                    5, struct.pack(">I", 2 + n), _sftp_string(handle), struct.pack(">QI", 0, MIB)
                )
                for n in range(requests)
            )
        )
        samples = await _until_stalled(server)
        assert max(samples) < 8 * MIB
        # Nothing was dropped: once the peer reads, the answers come, in order, whole.
        for n in range(3):
            reply = await answer()
            assert reply[0] == 103  # DATA
            assert struct.unpack_from(">II", reply, 1) == (2 + n, MIB)
        writer.channel.abort()


async def test_asyncssh_sftp_client_downloads_the_replica(
    server: NodeServer, alice_id: Identity, storage_dir: Path, tmp_path: Path
) -> None:
    """The read-only SFTP works with a standard client's high-level calls (get, get -r)."""
    big = os.urandom(3 * MIB + 5)
    (storage_dir / "alice" / "docs").mkdir()
    (storage_dir / "alice" / "docs" / "big.bin").write_bytes(big)
    (storage_dir / "alice" / "docs" / "small.txt").write_bytes(b"small")
    async with sftp_session(server, alice_id) as sftp:
        await sftp.get("/docs/big.bin", str(tmp_path / "big.bin"))
        await sftp.get("/docs", str(tmp_path / "restored"), recurse=True)
        async with sftp.open("/docs/small.txt", "rb") as handle:
            await handle.fsync()
            assert (await handle.stat()).size == 5
    assert (tmp_path / "big.bin").read_bytes() == big
    assert (tmp_path / "restored" / "big.bin").read_bytes() == big
    assert (tmp_path / "restored" / "small.txt").read_bytes() == b"small"


async def test_one_connection_cannot_try_key_after_key(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    """Dozens of keys offered in one connection: cut off after a few, like OpenSSH's sshd.

    Otherwise the slow-down (applied per connection) would not slow anyone down, and one
    connection could flood the table of unknown keys the UI shows.
    """
    events = Events()
    server = await make_server(limits=LENIENT, on_event=events)
    strangers = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(40)]
    with pytest.raises(
        (asyncssh.PermissionDenied, asyncssh.ConnectionLost, asyncssh.DisconnectError)
    ):
        await ssh_connect(server, None, client_keys=[*strangers, alice_id.private_key])
    assert 1 <= len(server.unknown_keys) <= 10
    assert events.count("unknown_key") <= 10
    assert not events.count("peer_connected")  # alice's key, offered last, never got its turn
    async with await connect(server, alice_id) as link:  # a well-behaved client is fine
        assert link.welcome["peer"] == "alice"


async def test_one_address_cannot_hold_every_login_slot(
    make_server: ServerFactory, alice_id: Identity
) -> None:
    """Silent connections from one address fill its own share only: others still log in."""
    server = await make_server(
        limits=Limits(unauthenticated_per_address=2, login_timeout=5, free_failures=1000)
    )
    flooder = ("127.0.0.2", 0)  # another loopback address: another host, for the server
    silent = [
        await asyncio.open_connection(HOST, server.port, local_addr=flooder) for _ in range(2)
    ]
    for reader, _ in silent:
        assert (await reader.readline()).startswith(b"SSH-2.0-")
    reader, writer = await asyncio.open_connection(HOST, server.port, local_addr=flooder)
    await asyncio.wait_for(reader.read(), 2)  # the third from that address: dropped at once
    writer.close()
    async with await connect(server, alice_id) as link:  # alice, from 127.0.0.1, gets in
        assert link.welcome["peer"] == "alice"
    for _, writer in silent:
        writer.close()


async def test_failed_logins_are_remembered_in_bounded_memory(
    make_server: ServerFactory,
) -> None:
    """Every new address would add to the table: it is capped; an IPv6 /64 is one source."""
    server = await make_server(limits=Limits(free_failures=2, max_delay=1.0))
    for n in range(20_000):
        server._record_failure(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(server._failures) <= 5000
    for n in range(50):  # one site rotating through its /64
        server._record_failure(f"2001:db8:1:2::{n:x}")
    assert server._login_delay("2001:db8:1:2:ffff::1") == 1.0
    assert server._login_delay("2001:db8:1:3::1") == 0.0  # the next /64 is someone else
    assert server._login_delay("::ffff:10.0.78.31") == server._login_delay("10.0.78.31")


async def test_unknown_keys_are_remembered_in_bounded_memory(server: NodeServer) -> None:
    """A flood of fresh keys keeps the newest 100 (the UI's "who tried"); repeats are counted."""
    keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(105)]
    for n, key in enumerate(keys):
        server._record_unknown_key(key, f"10.0.0.{n}")
    server._record_unknown_key(keys[-1], "10.0.0.200")
    assert len(server.unknown_keys) == 100
    kept = [key.get_fingerprint("sha256") for key in keys[5:]]
    assert list(server.unknown_keys) == kept  # the five oldest went first
    last = server.unknown_keys[kept[-1]]
    assert (last.attempts, last.address) == (2, "10.0.0.200")  # where it came from last


async def test_no_setuid_sticky_or_odd_modes_reach_the_disk(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    """Whatever mode a peer sends (setuid, setgid, sticky, world-writable), the host keeps
    only the owner-exec bit: 0755 or 0644; directories are 0755."""
    odd = 0o7777
    async with await connect(server, alice_id) as link:
        done: list[MyNasError | None] = []
        await link.put(b"small.sh", MTIME, odd, b"#!/bin/sh\n", done.append)
        await link.put(b"plain.txt", MTIME, 0o6666, b"text", done.append)
        await link.mkdir(b"dir/sub", MTIME, done.append)
        await link.sync()
        assert done == [None, None, None]
        req, _ = await link.open_upload(b"large.bin", 5, MTIME, odd)
        await link.send_data(req, b"large")
        await link.close_upload(req, Close.FINISH)
    jail = storage_dir / "alice"
    modes = {
        name: stat.S_IMODE(os.lstat(jail / name).st_mode)
        for name in ("small.sh", "plain.txt", "large.bin", "dir", "dir/sub")
    }
    assert modes == {
        "small.sh": 0o755,
        "plain.txt": 0o644,
        "large.bin": 0o755,
        "dir": 0o755,
        "dir/sub": 0o755,
    }
