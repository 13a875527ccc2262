"""The node key: created once, private, compatible with OpenSSH's tools."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import contextlib
import logging
import os
from pathlib import Path
import stat
import subprocess
import threading

import asyncssh
import pytest

from custom_components.mynas.engine import identity
from custom_components.mynas.engine.errors import KeyFileError

SSH_KEYGEN = "/usr/bin/ssh-keygen"


def keygen(path: Path, *args: str) -> Path:
    """Make a key with OpenSSH's ssh-keygen at ``path``; return its .pub file."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-N", "", "-C", "friend@laptop", "-f", str(path), *args],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub")


def keygen_fingerprint(pub_file: Path) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(pub_file)], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[1]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_private_then_loaded(tmp_path: Path) -> None:
    key_path = tmp_path / "mynas" / "node_key"

    first, created = identity.load_or_create(key_path)

    assert created
    assert mode_of(key_path) == 0o600
    assert mode_of(key_path.parent) == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert os.listdir(key_path.parent) == ["node_key"]  # no temporary file left behind
    assert first.public_line.startswith("ssh-ed25519 AAAA")
    assert len(first.public_line.split()) == 2  # no comment
    assert first.fingerprint.startswith("SHA256:")

    again, created_again = identity.load_or_create(key_path)
    assert not created_again
    assert again == first
    assert identity.load(str(key_path)) == first


def test_openssh_agrees_on_key_and_fingerprint(tmp_path: Path) -> None:
    key_path = tmp_path / "node_key"
    node, _ = identity.load_or_create(key_path)
    pub_file = tmp_path / "node_key.pub"
    pub_file.write_text(node.public_line + "\n")

    assert keygen_fingerprint(pub_file) == node.fingerprint
    # OpenSSH reads our private key file (no passphrase) and derives the same public key.
    derived = subprocess.run(
        [SSH_KEYGEN, "-y", "-f", str(key_path)], check=True, capture_output=True, text=True
    ).stdout
    assert derived.split()[:2] == node.public_line.split()


def test_loads_a_key_made_by_ssh_keygen(tmp_path: Path) -> None:
    key_path = tmp_path / "id_ed25519"
    pub_file = keygen(key_path, "-t", "ed25519")

    node, created = identity.load_or_create(key_path)

    assert not created
    assert node.public_line == " ".join(pub_file.read_text().split()[:2])
    assert node.fingerprint == keygen_fingerprint(pub_file)
    assert identity.fingerprint(identity.load_public_key_file(pub_file)) == node.fingerprint


@pytest.mark.parametrize(("kind", "name"), [("rsa", "ssh-rsa"), ("ecdsa", "ecdsa-sha2-nistp256")])
def test_refuses_other_key_types(tmp_path: Path, kind: str, name: str) -> None:
    key_path = tmp_path / "key"
    pub_file = keygen(key_path, "-t", kind)

    with pytest.raises(KeyFileError, match=rf"holds an {name} key; MyNAS needs an Ed25519"):
        identity.load_or_create(key_path)
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        identity.load_public_key_file(pub_file)


def test_refuses_a_passphrase_protected_key(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "secret", "-f", str(key_path)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(KeyFileError, match="Passphrase must be specified"):
        identity.load(key_path)


def test_world_readable_key_is_restricted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_path = tmp_path / "key"
    keygen(key_path, "-t", "ed25519")
    key_path.chmod(0o644)
    secret = key_path.read_text().splitlines()[1]  # a line of the private key's base64

    with caplog.at_level(logging.DEBUG, logger=identity.__name__):
        node, created = identity.load_or_create(key_path)

    assert not created
    assert mode_of(key_path) == 0o600
    assert "restricted it to 0600" in caplog.text
    assert "0644" in caplog.text
    assert secret not in caplog.text
    assert node.public_line not in caplog.text


def test_key_that_cannot_be_restricted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_path = tmp_path / "key"
    identity.load_or_create(key_path)
    key_path.chmod(0o640)

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    with pytest.raises(KeyFileError, match="open to other users, and cannot be restricted"):
        identity.load(key_path)


def test_narrower_mode_is_kept(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    identity.load_or_create(key_path)
    key_path.chmod(0o400)
    identity.load(key_path)
    assert mode_of(key_path) == 0o400


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a usable private key"),
        (b"garbage\n", "not a usable private key"),
        (b"\xff\xfe\x00garbage", "not a usable private key"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n", "not a usable private key"),
        (b"x" * (70 * 1024), "too large to be a key file"),
    ],
)
def test_garbage_key_file(tmp_path: Path, content: bytes, message: str) -> None:
    key_path = tmp_path / "key"
    key_path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message):
        identity.load_or_create(key_path)
    assert key_path.read_bytes() == content  # never overwritten


def test_damaged_key_never_crashes(tmp_path: Path) -> None:
    """Flipped bytes anywhere in a key file give KeyFileError or a valid key, nothing else."""
    key_path = tmp_path / "key"
    identity.load_or_create(key_path)
    original = key_path.read_bytes()
    for position in range(0, len(original), 7):
        damaged = bytearray(original)
        damaged[position] ^= 0x55
        key_path.write_bytes(bytes(damaged))
        with contextlib.suppress(KeyFileError):
            identity.load(key_path)


def test_public_key_file_where_private_expected(tmp_path: Path) -> None:
    pub_file = keygen(tmp_path / "key", "-t", "ed25519")
    with pytest.raises(KeyFileError, match="not a usable private key"):
        identity.load(pub_file)


def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"cannot read the key file .*: Is a directory"):
        identity.load_or_create(tmp_path)


def test_path_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        identity.load_or_create(fifo)


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError, match=r"cannot read the key file .*: Not a directory"):
        identity.load_or_create(tmp_path / "file" / "key")


def test_missing_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        identity.load(tmp_path / "key")
    assert not (tmp_path / "key").exists()


def test_creation_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(source: object, target: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(
        KeyFileError, match=r"cannot create the key file .*: Operation not permitted"
    ):
        identity.load_or_create(tmp_path / "key")
    assert os.listdir(tmp_path) == []


def test_repr_shows_no_private_material(tmp_path: Path) -> None:
    key_path = tmp_path / "key"
    node, _ = identity.load_or_create(key_path)
    private_lines = key_path.read_text().splitlines()[1:-1]

    for text in (repr(node), str(node), f"{node!r}"):
        assert "private" not in text
        assert all(line not in text for line in private_lines)
        assert node.fingerprint in text


def test_concurrent_creation_yields_one_key(tmp_path: Path) -> None:
    workers = 8
    for attempt in range(5):
        key_path = tmp_path / f"node{attempt}" / "key"
        barrier = threading.Barrier(workers)

        def create(path: Path = key_path, start: threading.Barrier = barrier) -> tuple[str, bool]:
            start.wait()
            node, created = identity.load_or_create(path)
            return node.public_line, created

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda _: create(), range(workers)))

        assert len({line for line, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert identity.load(key_path).public_line == results[0][0]
        assert os.listdir(key_path.parent) == ["key"]


def test_from_private_key_refuses_other_types() -> None:
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=1024)
    with pytest.raises(KeyFileError, match="must be an Ed25519 key"):
        identity.Identity.from_private_key(rsa)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        identity.raw_public_key(rsa)


# --- public keys ---------------------------------------------------------------------------


def test_parse_public_key_forms(tmp_path: Path) -> None:
    node, _ = identity.load_or_create(tmp_path / "key")
    for text in (
        node.public_line,
        node.public_line + " alice@pi",
        f"  {node.public_line}   my  laptop key \n",
    ):
        key = identity.parse_public_key(text)
        assert identity.public_key_line(key) == node.public_line
        assert identity.fingerprint(key) == node.fingerprint
        assert identity.fingerprint(text) == node.fingerprint
    raw = identity.raw_public_key(node.private_key)
    assert len(raw) == 32
    assert identity.public_key_line(identity.public_key_from_raw(raw)) == node.public_line


def test_parse_public_key_refusals(tmp_path: Path) -> None:
    node, _ = identity.load_or_create(tmp_path / "key")
    body = node.public_line.split()[1]
    rsa_line = identity.public_key_line(
        asyncssh.generate_private_key("ssh-rsa", key_size=1024).convert_to_public()
    )
    cases = {
        "": "empty",
        "   \n": "empty",
        f"{node.public_line}\n{node.public_line}": "several lines",
        rsa_line: "not an Ed25519 public key",
        f"restrict {node.public_line}": "not an Ed25519 public key",
        "ssh-ed25519": "no key after",
        f"ssh-ed25519 {body[:-4]}": "damaged or is not an Ed25519 key",
        f"ssh-ed25519 {body[:-1]}": "not valid base64",
        f"ssh-ed25519 {body[:-1]}!": "not valid base64",
        f"ssh-ed25519 {rsa_line.split()[1]}": "damaged or is not an Ed25519 key",
        f"ssh-ed25519 {body}==": "not valid base64",
    }
    for text, message in cases.items():
        with pytest.raises(KeyFileError, match=message):
            identity.parse_public_key(text)
    with pytest.raises(KeyFileError, match="32 bytes, not 31"):
        identity.public_key_from_raw(b"\x00" * 31)


def test_load_public_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read the public key file"):
        identity.load_public_key_file(tmp_path / "missing.pub")
    binary = tmp_path / "binary.pub"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not a public key file"):
        identity.load_public_key_file(binary)
    huge = tmp_path / "huge.pub"
    huge.write_bytes(b"a" * (70 * 1024))
    with pytest.raises(KeyFileError, match="too large"):
        identity.load_public_key_file(huge)
    empty = tmp_path / "empty.pub"
    empty.write_bytes(b"")
    with pytest.raises(KeyFileError, match=r"empty\.pub: the public key is empty"):
        identity.load_public_key_file(empty)
