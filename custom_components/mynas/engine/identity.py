"""A node's identity: one Ed25519 key pair, its SSH host key and its client key alike.

The private key lives in one file in OpenSSH's private key format without a passphrase
(what ``ssh-keygen -t ed25519 -N ""`` writes, so OpenSSH's tools read it too), mode 0600,
in a directory created with mode 0700. Peers know a node by its public key alone, written
as the one-line ``ssh-ed25519 AAAA…`` form (no comment) and shown to people as OpenSSH's
``SHA256:…`` fingerprint.

Loading and creating keys is blocking file I/O: call it from a worker thread, never from an
event loop. Nothing here ever logs or reprs private key material.

asyncssh is imported only where an SSH key object is needed (a connection, a server): a
node's key file and a peer's public key line are read with ``cryptography`` alone, so that a
``push`` with nothing to send (which connects to no one) does not pay for asyncssh's import.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
import hashlib
import logging
import os
from pathlib import Path
import secrets
import stat
from typing import TYPE_CHECKING, Any

from .errors import KeyFileError
from .tree import fsync_dir

if TYPE_CHECKING:
    import asyncssh

_LOGGER = logging.getLogger(__name__)

ED25519 = "ssh-ed25519"
KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700

# An Ed25519 public key in SSH wire format: string "ssh-ed25519", then string(32 raw bytes).
_BLOB_PREFIX = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20"
_RAW_SIZE = 32
# Far above any real private key file (an RSA 16384 key is ~12 KiB); bounds what we read.
_MAX_KEY_FILE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's key pair, as loaded from its key file.

    Two identities are equal when their public keys are; the private key never shows in
    ``repr`` (so an identity can be logged safely).
    """

    seed: bytes = field(repr=False, compare=False)  # the Ed25519 private key's 32 bytes
    public_line: str
    fingerprint: str
    # The asyncssh key, made on first use (``private_key``).
    _ssh: list[asyncssh.SSHKey] = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def from_private_key(cls, key: asyncssh.SSHKey) -> Identity:
        """Return the identity of an Ed25519 private key."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
            Ed25519PrivateKey,
        )

        pyca = key.pyca_key
        if key.algorithm != ED25519.encode("ascii") or not isinstance(pyca, Ed25519PrivateKey):
            raise KeyFileError("a node's key must be an Ed25519 key")
        node = _of_seed(pyca.private_bytes_raw())
        node._ssh.append(key)
        return node

    @property
    def private_key(self) -> asyncssh.SSHKey:
        """The key as asyncssh takes it (imports asyncssh on first use)."""
        if not self._ssh:
            import asyncssh  # noqa: PLC0415 - only where a connection is made

            self._ssh.append(asyncssh.import_private_key(_openssh_private(self.seed)))
        return self._ssh[0]


def _of_seed(seed: bytes) -> Identity:
    """Return the identity of an Ed25519 seed, with ``cryptography`` alone."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    line = f"{ED25519} {base64.b64encode(_BLOB_PREFIX + raw).decode('ascii')}"
    return Identity(seed, line, _line_fingerprint(line))


def _openssh_private(seed: bytes) -> bytes:
    """Return the OpenSSH private key file's bytes of an Ed25519 seed (no passphrase)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    return Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _line_fingerprint(line: str) -> str:
    """Return the ``SHA256:…`` fingerprint of a canonical public key line (as ssh-keygen)."""
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_or_create(path: str | os.PathLike[str]) -> tuple[Identity, bool]:
    """Load the key at ``path``, creating it first if absent (blocking).

    Returns the identity and whether this call created the key. Concurrent callers, in
    threads or processes, all end up with the same single key. A key file that others may
    read is restricted to mode 0600 (with a warning).
    """
    path = os.fspath(path)
    try:
        return _load(path), False
    except FileNotFoundError:
        pass
    identity = _of_seed(secrets.token_bytes(_RAW_SIZE))
    try:
        Path(path).parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
        created = _publish(Path(path), _openssh_private(identity.seed))
    except OSError as err:
        raise KeyFileError(f"cannot create the key file {path}: {_reason(err)}") from err
    if not created:
        return load(path), False  # another caller created it first: theirs is the key
    _LOGGER.info("Created node key %s (%s)", path, identity.fingerprint)
    return identity, True


def load(path: str | os.PathLike[str]) -> Identity:
    """Load the existing key at ``path`` (blocking); tighten its mode to 0600 if wider."""
    path = os.fspath(path)
    try:
        return _load(path)
    except FileNotFoundError as err:
        raise KeyFileError(f"the key file {path} does not exist") from err


def copy_key(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Identity:
    """Install a copy of the key file ``source`` at ``path`` (blocking); return its identity.

    How a rebuilt node gets its replicas back: friends still trust its previous key. A
    ``path`` that already holds that same key is kept; one holding another key raises
    ``KeyFileError`` and is never replaced.
    """
    key = load(source)
    target = Path(path)
    if target.exists():
        if load(target).public_line != key.public_line:
            raise KeyFileError(f"{target} already holds another key; not replacing it")
        return key
    target.parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    # Created 0600 from the start: the private key is never readable by others.
    data = Path(source).read_bytes()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def private_seed(node: Identity) -> bytes:
    """Return the 32-byte Ed25519 seed of a node's key: the node secret (never log it).

    Every data key of an encrypted replica derives from it (``owner/keys.py``), and the
    recovery code (``recovery_code.py``) is this seed written for people.
    """
    return node.seed


def from_seed(seed: bytes) -> Identity:
    """Return the identity whose Ed25519 private key has ``seed`` (a recovery code's content).

    The same seed gives the same key pair, so friends' pinned keys still hold.
    """
    if len(seed) != _RAW_SIZE:
        raise KeyFileError(f"an Ed25519 seed has {_RAW_SIZE} bytes, not {len(seed)}")
    return _of_seed(bytes(seed))


def install(node: Identity, path: str | os.PathLike[str]) -> Identity:
    """Write ``node``'s private key to a new key file at ``path`` (0600; blocking).

    How a node rebuilt from its recovery code gets its key file back. A ``path`` that
    already holds that same key is kept; one holding another key raises ``KeyFileError``.
    """
    target = Path(path)
    if target.exists():
        if load(target).public_line != node.public_line:
            raise KeyFileError(f"{target} already holds another key; not replacing it")
        return node
    try:
        target.parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
        created = _publish(target, _openssh_private(node.seed))
    except OSError as err:
        raise KeyFileError(f"cannot create the key file {target}: {_reason(err)}") from err
    if not created:
        return install(node, target)  # written meanwhile: the same key, or refused
    return node


def canonical_key(text: str) -> str:
    """Return the one spelling of an Ed25519 public key line (no comment), or raise KeyFileError."""
    return public_key_line(parse_public_key(text))


def parse_public_key(text: str) -> asyncssh.SSHKey:
    """Parse one OpenSSH public key line, ``ssh-ed25519 AAAA… [comment]``.

    Only Ed25519 keys are accepted; anything else raises ``KeyFileError``.
    """
    import asyncssh  # noqa: PLC0415 - a key object for a connection or a server

    return asyncssh.import_public_key(public_line_of(text))


def public_line_of(text: str) -> str:
    """Return the canonical line (no comment) of one public key line, without asyncssh.

    The checks of ``parse_public_key``: only Ed25519 keys, each in its one spelling.
    """
    line = text.strip()
    if not line:
        raise KeyFileError("the public key is empty")
    if "\n" in line or "\r" in line:
        raise KeyFileError("expected one public key line, found several lines")
    parts = line.split(maxsplit=2)
    if parts[0] != ED25519:
        raise KeyFileError(
            f"not an Ed25519 public key: expected a line starting with {ED25519!r}, "
            f"found {parts[0][:40]!r}"
        )
    if len(parts) < 2:
        raise KeyFileError("the public key line has no key after 'ssh-ed25519'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error as err:
        raise KeyFileError("the public key is not valid base64 (truncated?)") from err
    # Demand the canonical text too, so one key has exactly one spelling.
    if (
        len(blob) != len(_BLOB_PREFIX) + _RAW_SIZE
        or not blob.startswith(_BLOB_PREFIX)
        or base64.b64encode(blob).decode("ascii") != parts[1]
    ):
        raise KeyFileError("the public key is damaged or is not an Ed25519 key")
    return f"{ED25519} {parts[1]}"


def load_public_key_file(path: str | os.PathLike[str]) -> asyncssh.SSHKey:
    """Load an Ed25519 public key from a one-line file like ``id_ed25519.pub`` (blocking)."""
    import asyncssh  # noqa: PLC0415 - a key object for a connection or a server

    return asyncssh.import_public_key(load_public_line(path))


def load_public_line(path: str | os.PathLike[str]) -> str:
    """Return the canonical line of the public key file at ``path``, without asyncssh."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as err:
        raise KeyFileError(f"cannot read the public key file {path}: {_reason(err)}") from err
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a public key file")
    try:
        return public_line_of(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise KeyFileError(f"{path} is not a public key file (not text)") from err
    except KeyFileError as err:
        raise KeyFileError(f"{path}: {err}") from err


def public_key_line(key: asyncssh.SSHKey) -> str:
    """Return the ``ssh-ed25519 AAAA…`` line of a (public or private) key, without comment."""
    algorithm = key.algorithm.decode("ascii")
    return f"{algorithm} {base64.b64encode(key.public_data).decode('ascii')}"


def fingerprint(key: asyncssh.SSHKey | str) -> str:
    """Return the ``SHA256:…`` fingerprint of a key or public key line, as ``ssh-keygen -l``."""
    if isinstance(key, str):
        return _line_fingerprint(public_line_of(key))
    return key.get_fingerprint("sha256")


def pinned_login(pinned: asyncssh.SSHKey, node: Identity | None) -> dict[str, Any]:
    """Return the ``asyncssh.create_connection`` options that dial a peer by its pinned key.

    Only ``pinned`` is accepted as the host's key, and only ``node``'s key (none: no key)
    is offered: no SSH config, agent, password, keyboard-interactive, GSS or host-based login.
    """
    return {
        "username": "mynas",
        "client_keys": [node.private_key] if node is not None else None,
        "known_hosts": ([pinned], [], []),
        "config": None,
        "agent_path": None,
        "agent_forwarding": False,
        "password": None,
        "kbdint_auth": False,
        "gss_auth": False,
        "host_based_auth": False,
    }


def raw_public_key(key: asyncssh.SSHKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 key's public half."""
    if not key.public_data.startswith(_BLOB_PREFIX):
        raise KeyFileError("not an Ed25519 key")
    return key.public_data[len(_BLOB_PREFIX) :]


def public_key_from_raw(raw: bytes) -> asyncssh.SSHKey:
    """Return the Ed25519 public key whose 32 raw bytes are ``raw``."""
    if len(raw) != _RAW_SIZE:
        raise KeyFileError(f"an Ed25519 public key has {_RAW_SIZE} bytes, not {len(raw)}")
    line = f"{ED25519} {base64.b64encode(_BLOB_PREFIX + raw).decode('ascii')}"
    import asyncssh  # noqa: PLC0415 - a key object for a connection or a server

    return asyncssh.import_public_key(line)


def _load(path: str) -> Identity:
    """Load the private key at ``path``; FileNotFoundError passes through, all else fails."""
    try:
        with open(path, "rb", buffering=0, opener=_open_nonblocking) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"the key file {path} is not a regular file")
            data = handle.read(_MAX_KEY_FILE + 1)
            if len(data) > _MAX_KEY_FILE:
                raise KeyFileError(f"{path} is too large to be a key file")
            node = _read_ed25519(data) or Identity.from_private_key(_import_private(path, data))
            _restrict_mode(path, handle.fileno(), info.st_mode)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise KeyFileError(f"cannot read the key file {path}: {_reason(err)}") from err
    return node


def _read_ed25519(data: bytes) -> Identity | None:
    """The identity of an OpenSSH Ed25519 key file without passphrase (``cryptography``).

    None for anything else: asyncssh then reads it, and says what is wrong with it.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_ssh_private_key,
    )

    try:
        key = load_ssh_private_key(data, password=None)
    except Exception:  # any failure: asyncssh's parser decides, and says why
        return None
    if not isinstance(key, Ed25519PrivateKey):
        return None
    return _of_seed(key.private_bytes_raw())


def _open_nonblocking(path: str, flags: int) -> int:
    # A FIFO put at the key's path must not hang the open.
    return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)


def _import_private(path: str, data: bytes) -> asyncssh.SSHKey:
    import asyncssh  # noqa: PLC0415 - a key that cryptography did not read as ours

    try:
        key = asyncssh.import_private_key(data)
    except Exception as err:
        # Damaged files escape asyncssh's parsers as other errors too (ValueError from the
        # crypto backend, even re.error); only KeyImportError's text is meant for people,
        # and it names the problem (passphrase-protected...) without quoting the content.
        reason = str(err) if isinstance(err, asyncssh.KeyImportError) else "invalid key data"
        raise KeyFileError(
            f"{path} is not a usable private key ({reason}); MyNAS needs an Ed25519 key in "
            "OpenSSH format without passphrase"
        ) from err
    if key.algorithm != ED25519.encode("ascii"):
        algorithm = key.algorithm.decode("ascii", "replace")
        raise KeyFileError(
            f"{path} holds an {algorithm} key; MyNAS needs an Ed25519 key (ssh-keygen -t ed25519)"
        )
    return key


def _restrict_mode(path: str, fd: int, mode: int) -> None:
    permissions = stat.S_IMODE(mode)
    if not permissions & ~KEY_FILE_MODE:
        return
    try:
        os.fchmod(fd, KEY_FILE_MODE)
    except OSError as err:
        raise KeyFileError(
            f"the key file {path} has mode {permissions:04o}, open to other users, and "
            f"cannot be restricted to {KEY_FILE_MODE:04o}: {_reason(err)}"
        ) from err
    _LOGGER.warning(
        "Key file %s had mode %04o, open to other users; restricted it to %04o",
        path,
        permissions,
        KEY_FILE_MODE,
    )


def _publish(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; return whether this call made it.

    The file is written and synced under a temporary name, then hard-linked to its final
    name: the link either appears with complete content or fails because a concurrent
    caller's file is already there (rename would silently replace it).
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, KEY_FILE_MODE)  # exactly 0600 whatever the umask
            handle.write(data)
            handle.flush()
            os.fsync(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _reason(err: OSError) -> str:
    return err.strerror or str(err)
