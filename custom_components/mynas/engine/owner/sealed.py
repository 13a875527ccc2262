"""Sealed contents: one stored file of an encrypted replica, byte by byte.

Layout (all integers big-endian)::

    header  magic "mynas" NUL | version u8 (1) | aead u8 (1 AES-256-GCM, 2 ChaCha20-Poly1305)
            | salt (24 random bytes)                                        32 bytes, clear
    meta    AEAD(mtime_ns i64 | mode u16 | size u64), associated data: the header  34 bytes
    chunks  AEAD(64 KiB of the file) each, the last one shorter (an empty file: one empty
            chunk)                                                       16 bytes more each

Keys and nonces. Each stored file has its own key, HKDF-SHA256 over the node's contents key
(``keys.py``) with the file's salt and its plain jail path (``Docs/2024/beach.jpg``) as
``info``: the bytes are bound to their place, so two stored files swapped by the host, or
one moved, fail authentication. Chunks follow the STREAM construction: chunk ``i``'s nonce
is ``i`` (u64) then a u32 flag, 1 on the last chunk (2 is the meta block's): reordered,
dropped, duplicated or truncated chunks all fail, and so does a flipped byte anywhere
(the header through the meta block's associated data, the meta and chunks by their tags).
The plain size is inside, so the stored size is known exactly (``stored_size``) — which is
why sizes stay visible to the host, and how restore checks that nothing is missing.

The cipher is chosen like the SSH cipher (``ciphers.HAS_AES``): AES-256-GCM where the CPU
has AES instructions, ChaCha20-Poly1305 elsewhere (a Raspberry Pi 4); the header says
which, and both are always read.

Salts. A small file (sent whole) gets a random salt every time it is sent. A large file is
streamed and may be resumed by a later run from what the host kept, so the resumed part
must be the same bytes: its salt is an HMAC (``keys.DataKeys.salts``) of its path and of
its identity on disk — size, mtime, ctime, inode and device. A changed file gets another
salt, since any write moves its ctime (which no program can set); and the reader checks
that identity again after every block it reads, so data that changed under it is never
sealed under the old salt (``push`` then drops the upload and sends the file next run). What
is left is a write within one tick of the file system's clock that keeps size and mtime: a
key and nonce would then seal two contents, for that chunk only.

Everything here is CPU work on bytes in memory (constant: one chunk buffered): run it in
worker threads, never on an event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import ciphers
from ..errors import MyNasError

MAGIC = b"mynas\0"
VERSION = 1
AES_GCM = 1
CHACHA20 = 2
SALT_SIZE = 24
CHUNK = 64 * 1024
TAG = 16
_HEADER = struct.Struct(">6sBB24s")
_META = struct.Struct(">qHQ")
HEADER_SIZE = _HEADER.size
META_SIZE = _META.size + TAG
OVERHEAD = HEADER_SIZE + META_SIZE  # before the first chunk
_LAST = 1
_META_FLAG = 2
_FILE_INFO = b"mynas/v1/file\0"

type _Aead = AESGCM | ChaCha20Poly1305
_CIPHERS: dict[int, Callable[[bytes], _Aead]] = {AES_GCM: AESGCM, CHACHA20: ChaCha20Poly1305}


def default_aead() -> int:
    """Return the cipher this machine seals with: AES-GCM with AES instructions, else ChaCha20."""
    return AES_GCM if ciphers.HAS_AES else CHACHA20


class SealedFileError(MyNasError):
    """A stored file that fails authentication: altered, truncated, swapped, or not ours."""

    def __init__(self, path: bytes, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{os.fsdecode(path)} fails authentication ({why}): not restored")


@dataclass(frozen=True, slots=True)
class Meta:
    """What a stored file says of its plain file."""

    mtime_ns: int
    mode: int
    size: int


def chunks(size: int) -> int:
    """Return how many chunks a plain file of ``size`` bytes is sealed in (at least one)."""
    return max(1, -(-size // CHUNK))


def stored_size(size: int) -> int:
    """Return the size of the stored file that seals a plain file of ``size`` bytes."""
    return OVERHEAD + size + TAG * chunks(size)


def plain_size(stored: int) -> int | None:
    """Return the plain size a stored size stands for, None if no plain size gives it."""
    body = stored - OVERHEAD
    if body < TAG:
        return None
    full, rest = divmod(body, CHUNK + TAG)
    size = full * CHUNK + max(rest - TAG, 0) if rest else full * CHUNK
    return size if stored_size(size) == stored else None


def _nonce(counter: int, flag: int) -> bytes:
    return counter.to_bytes(8) + flag.to_bytes(4)


_SHA256 = hashes.SHA256()


def file_key(contents_key: bytes, salt: bytes, path: bytes) -> bytes:
    """Return the key of the stored file at plain jail path ``path`` with ``salt``."""
    return HKDF(_SHA256, 32, salt=salt, info=_FILE_INFO + path).derive(contents_key)


def resume_salt(salts_key: bytes, path: bytes, info: os.stat_result) -> bytes:
    """Return a large file's salt: the same while the file is the same on disk."""
    identity = struct.pack(
        ">QqqQQ", info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev
    )
    return hmac.digest(salts_key, identity + path, hashlib.sha256)[:SALT_SIZE]


class Sealer:
    """Seals one plain file of a known size, as it is read (any piece size)."""

    def __init__(
        self,
        contents_key: bytes,
        path: bytes,
        meta: Meta,
        *,
        salt: bytes | None = None,
        aead: int | None = None,
    ) -> None:
        """Seal the file at plain jail path ``path``; a random salt unless one is given."""
        aead = default_aead() if aead is None else aead
        salt = os.urandom(SALT_SIZE) if salt is None else salt
        header = _HEADER.pack(MAGIC, VERSION, aead, salt)
        self._aead = _CIPHERS[aead](file_key(contents_key, salt, path))
        sealed_meta = self._aead.encrypt(
            _nonce(0, _META_FLAG), _META.pack(meta.mtime_ns, meta.mode, meta.size), header
        )
        self.head = header + sealed_meta
        self.meta = meta
        self._left = meta.size  # plain bytes still to come
        self._counter = 0
        self._buffer = b""
        self.done = False  # the last chunk is sealed

    def update(self, data: bytes | memoryview) -> bytes:
        """Return the sealed chunks that ``data`` completes (ValueError past the size)."""
        return bytes(self.update_buffer(data))

    def update_buffer(self, data: bytes | memoryview) -> bytearray:
        """``update``, into a new buffer of its own (no copy made to return bytes).

        Each chunk is sealed straight into that buffer (``encrypt_into``): a large file's
        bytes are copied once on their way out, not per chunk and again to join them.
        """
        if len(data) > self._left:
            raise ValueError("more data than the size the file was sealed with")
        self._left -= len(data)
        view = memoryview(self._buffer + data if self._buffer else data)
        # Whole chunks first; the last chunk waits until the size is reached (its flag).
        full = len(view) // CHUNK
        if full and not self._left and len(view) == full * CHUNK:
            full -= 1
        last = not self._left and not self.done
        rest = len(view) - full * CHUNK
        out = bytearray(full * (CHUNK + TAG) + (rest + TAG if last else 0))
        target = memoryview(out)
        for i in range(full):
            self._seal_into(
                view[i * CHUNK : (i + 1) * CHUNK], target[i * (CHUNK + TAG) :], last=False
            )
        if last:
            self._seal_into(view[full * CHUNK :], target[full * (CHUNK + TAG) :], last=True)
            self.done = True
            self._buffer = b""
        else:
            self._buffer = bytes(view[full * CHUNK :])
        target.release()
        return out

    def _seal_into(self, chunk: memoryview, target: memoryview, *, last: bool) -> None:
        nonce = _nonce(self._counter, _LAST if last else 0)
        self._counter += 1
        self._aead.encrypt_into(nonce, chunk, None, target[: len(chunk) + TAG])


def seal(contents_key: bytes, path: bytes, meta: Meta, data: bytes) -> bytes:
    """Return the whole stored file of a small plain file (random salt).

    ``Sealer``'s work in one go, without its buffering: the path of many small files.
    """
    if len(data) != meta.size:
        raise ValueError("the data is not the size the file is sealed with")
    aead_id = default_aead()
    salt = os.urandom(SALT_SIZE)
    header = _HEADER.pack(MAGIC, VERSION, aead_id, salt)
    aead = _CIPHERS[aead_id](file_key(contents_key, salt, path))
    meta_plain = _META.pack(meta.mtime_ns, meta.mode, meta.size)
    parts = [header, aead.encrypt(_nonce(0, _META_FLAG), meta_plain, header)]
    last = chunks(meta.size) - 1
    for counter in range(last + 1):
        piece = data[counter * CHUNK : (counter + 1) * CHUNK] if last else data
        parts.append(aead.encrypt(_nonce(counter, _LAST if counter == last else 0), piece, None))
    return b"".join(parts)


class Opener:
    """Opens one stored file as its bytes arrive, handing out only authenticated plain data.

    ``update`` returns the plain bytes of every chunk completed so far (or raises
    SealedFileError); ``finish`` says whether the file ended where its meta says.
    """

    def __init__(self, contents_key: bytes, path: bytes) -> None:
        """Open the stored file of plain jail path ``path``."""
        self._key = contents_key
        self.path = path
        self._aead: _Aead | None = None
        self.meta: Meta | None = None
        self._buffer = b""
        self._counter = 0
        self._chunks = 0

    def _fail(self, why: str) -> SealedFileError:
        return SealedFileError(self.path, why)

    def update(self, data: bytes | memoryview) -> bytes:
        """Take the next stored bytes; return the plain bytes they complete."""
        buffer = self._buffer + data if self._buffer else bytes(data)
        start = 0
        if self.meta is None:
            if len(buffer) < OVERHEAD:
                self._buffer = buffer
                return b""
            self._open_head(buffer[:OVERHEAD])
            start = OVERHEAD
        assert self._aead is not None
        out = []
        while self._counter < self._chunks:
            last = self._counter == self._chunks - 1
            assert self.meta is not None
            size = (self.meta.size - CHUNK * self._counter if last else CHUNK) + TAG
            if len(buffer) - start < size:
                break
            nonce = _nonce(self._counter, _LAST if last else 0)
            try:
                out.append(self._aead.decrypt(nonce, buffer[start : start + size], None))
            except InvalidTag:
                raise self._fail(f"chunk {self._counter} altered or out of place") from None
            start += size
            self._counter += 1
        self._buffer = buffer[start:]
        if self._counter == self._chunks and self._buffer:
            raise self._fail("longer than it was sealed")
        return b"".join(out)

    def _open_head(self, head: bytes) -> None:
        magic, version, aead, salt = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._fail("not a sealed file")
        if version != VERSION or aead not in _CIPHERS:
            raise self._fail(f"unknown format {version}.{aead}")
        self._aead = _CIPHERS[aead](file_key(self._key, salt, self.path))
        try:
            plain = self._aead.decrypt(
                _nonce(0, _META_FLAG), head[HEADER_SIZE:OVERHEAD], head[:HEADER_SIZE]
            )
        except InvalidTag:
            raise self._fail("header altered, or the file is not where it was sealed") from None
        self.meta = Meta(*_META.unpack(plain))
        self._chunks = chunks(self.meta.size)

    def finish(self) -> Meta:
        """Return the plain file's meta once every chunk was opened; SealedFileError if not."""
        if self.meta is None or self._counter < self._chunks:
            raise self._fail("truncated")
        return self.meta


def read_meta(contents_key: bytes, path: bytes, head: bytes) -> Meta:
    """Return the meta of a stored file from its first ``OVERHEAD`` bytes (SealedFileError)."""
    opener = Opener(contents_key, path)
    opener.update(head[:OVERHEAD])
    if opener.meta is None:
        raise SealedFileError(path, "truncated")
    return opener.meta


def open_sealed(contents_key: bytes, path: bytes, data: bytes) -> tuple[Meta, bytes]:
    """Open a whole stored file: its meta and its plain bytes (SealedFileError if bad)."""
    opener = Opener(contents_key, path)
    plain = opener.update(data)
    return opener.finish(), plain
