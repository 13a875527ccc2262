"""Keys, sealed names and sealed contents, attacked as a curious and a tampering host would."""

from __future__ import annotations

import os
from pathlib import Path
import random
from types import SimpleNamespace

import pytest

from custom_components.mynas.engine import identity
from custom_components.mynas.engine.owner import keys, names, sealed
from custom_components.mynas.engine.owner.keys import DataKeys
from custom_components.mynas.engine.owner.names import NameCipher, NameTampered, StoredTree
from custom_components.mynas.engine.owner.sealed import (
    CHUNK,
    Meta,
    Opener,
    SealedFileError,
    Sealer,
)

KEYS = DataKeys.from_secret(bytes(range(32)))
META = Meta(1_600_000_000_123_456_789, 0o755, 0)


# --- keys ------------------------------------------------------------------------------------


def test_keys_are_separate_per_purpose_and_fixed_by_the_secret(tmp_path: Path) -> None:
    again = DataKeys.from_secret(bytes(range(32)))
    assert again == KEYS
    assert len(KEYS.names) == 64
    assert len({KEYS.names[:32], KEYS.names[32:], KEYS.contents, KEYS.salts}) == 4
    assert DataKeys.from_secret(bytes(32)) != KEYS
    assert KEYS.contents.hex() not in repr(KEYS)
    # Pinned: a change of derivation would make every existing replica unreadable.
    assert (
        keys.derive(bytes(32), keys.CONTENTS, 8).hex()
        == keys.derive(bytes(32), b"mynas/v1/contents", 8).hex()
    )
    node, _ = identity.load_or_create(tmp_path / "key")
    assert DataKeys.of(node) == DataKeys.from_secret(identity.private_seed(node))
    with pytest.raises(ValueError, match="32 bytes"):
        DataKeys.from_secret(b"short")


# --- names -----------------------------------------------------------------------------------


def test_names_are_unreadable_and_safe_on_any_disk() -> None:
    cipher = NameCipher(KEYS.names)
    stored = cipher.path(b"Docs/Tax return 2025.pdf")
    folder, _, name = stored.partition(b"/")
    for word in (b"Docs", b"Tax", b"pdf"):
        assert word not in stored
    assert set(stored) <= set(b"abcdefghijklmnopqrstuvwxyz234567/")
    assert not name.startswith(b".")
    # Deterministic: the same place gives the same name; another place another one.
    assert cipher.path(b"Docs/Tax return 2025.pdf") == stored
    assert cipher.path(b"Docs/a/x") != cipher.path(b"Docs/b/x").replace(
        cipher.path(b"Docs/b"), cipher.path(b"Docs/a")
    )
    assert cipher.folder(b"Docs") == folder
    # Another node's key reads nothing.
    other = NameCipher(DataKeys.from_secret(bytes(32)).names)
    with pytest.raises(NameTampered):
        other.open(b"Docs", name)


def test_a_name_moved_or_altered_does_not_decrypt() -> None:
    cipher = NameCipher(KEYS.names)
    token = cipher.seal(b"Docs/a", b"secret.txt")
    assert cipher.open(b"Docs/a", token) == b"secret.txt"
    with pytest.raises(NameTampered, match="altered or moved"):
        cipher.open(b"Docs/b", token)  # moved to another directory
    flipped = token[:-3] + (b"b" if token[-3:-2] != b"b" else b"c") + token[-2:]
    with pytest.raises(NameTampered):
        cipher.open(b"Docs/a", flipped)
    for bad in (b"", b"ABC", b"x" * 7, b"a.b", b"aaaa"):
        with pytest.raises(NameTampered):
            cipher.open(b"Docs/a", bad)
    # Not canonical base32 (the trailing bits set): one plain name, one stored name.
    data_token = token[:-1] + (b"7" if token[-1:] != b"7" else b"6")
    with pytest.raises(NameTampered):
        cipher.open(b"Docs/a", data_token)


@pytest.mark.parametrize("length", [1, 143, 144, 200, 255])
def test_long_names_become_continuations_within_255_bytes(length: int) -> None:
    cipher = NameCipher(KEYS.names)
    name = bytes(random.Random(length).choice(b"abcdefgh\xc3\xa9") for _ in range(length))
    stored = cipher.seal(b"Docs", name)
    parts = stored.split(b"/")
    assert all(len(part) <= names.MAX_NAME for part in parts)
    assert len(parts) == (1 if length <= 143 else 2)
    assert all(part.startswith(b"~") for part in parts[:-1])
    assert not parts[-1].startswith(b"~")
    token = b"".join(part.removeprefix(b"~") for part in parts)
    assert cipher.open(b"Docs", token) == name
    # What a deletion must name: the first continuation (the whole long name goes).
    assert cipher.top(b"Docs/" + name) == cipher.folder(b"Docs") + b"/" + parts[0]


def test_a_listing_reads_back_into_plain_paths() -> None:
    cipher = NameCipher(KEYS.names)
    plain = [
        (b"a", True),
        (b"a/" + b"L" * 200, True),
        (b"a/" + b"L" * 200 + b"/inner.txt", False),
        (b"a/b.txt", False),
        (b"z" * 255, False),
        (b"zz", False),
    ]
    listing: list[tuple[bytes, bool]] = []
    for path, is_dir in plain:
        stored = cipher.path(b"Docs/" + path)
        top = cipher.top(b"Docs/" + path)
        if top != stored and (top, True) not in listing:
            listing.append((top, True))
        listing.append((stored, is_dir))
    listing.sort(key=lambda item: item[0] + (b"/" if item[1] else b""))
    reader = StoredTree(cipher, b"Docs")
    read = [reader.plain(cipher.folder(b"Docs"), True)]
    read += [reader.plain(stored, is_dir) for stored, is_dir in listing]
    assert read[0] == b""
    assert sorted(path for path in read[1:] if path is not None) == sorted(p for p, _ in plain)
    assert read.count(None) == 2  # the continuations of the two long names


def test_a_listing_with_entries_out_of_place_is_refused() -> None:
    cipher = NameCipher(KEYS.names)
    a = cipher.path(b"Docs/a")
    b_file = cipher.path(b"Docs/b/f")
    for stored, is_dir in (
        (b"elsewhere/x", False),  # outside the folder
        (b_file, False),  # its directory was never listed
        (a + b"/" + cipher.seal(b"Docs/b", b"f"), False),  # sealed for another directory
        (cipher.folder(b"Docs") + b"/~" + b"a" * 10, False),  # a continuation that is a file
    ):
        reader = StoredTree(cipher, b"Docs")
        reader.plain(a, True)
        with pytest.raises(NameTampered):
            reader.plain(stored, is_dir)
    # A name that decrypts to something that is no name at all.
    reader = StoredTree(cipher, b"Docs")
    evil = cipher.folder(b"Docs") + b"/" + cipher.seal(b"Docs", b"x/../y")
    with pytest.raises(NameTampered):
        reader.plain(evil, False)


# --- contents --------------------------------------------------------------------------------


def _seal_in_pieces(data: bytes, piece: int, **kw: object) -> bytes:
    sealer = Sealer(KEYS.contents, b"Docs/f", Meta(META.mtime_ns, META.mode, len(data)), **kw)  # type: ignore[arg-type]
    out = [sealer.head]
    for start in range(0, len(data), piece):
        out.append(sealer.update(data[start : start + piece]))
    if not data:
        out.append(sealer.update(b""))
    assert sealer.done
    return b"".join(out)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("aead", [sealed.AES_GCM, sealed.CHACHA20])
def test_contents_round_trip_in_any_pieces(size: int, aead: int) -> None:
    data = random.Random(size).randbytes(size)
    for piece in (1000, CHUNK, 3 * CHUNK + 7):
        stored = _seal_in_pieces(data, piece, aead=aead)
        assert len(stored) == sealed.stored_size(size)
        assert sealed.plain_size(len(stored)) == size
        opener = Opener(KEYS.contents, b"Docs/f")
        plain = b"".join(opener.update(stored[i : i + 777]) for i in range(0, len(stored), 777))
        assert plain == data
        assert opener.finish() == Meta(META.mtime_ns, META.mode, size)


def test_contents_are_unreadable() -> None:
    data = b"my tax return: income 123456 EUR " * 100
    stored = sealed.seal(KEYS.contents, b"Docs/tax.txt", Meta(1, 0o644, len(data)), data)
    assert b"income" not in stored
    assert b"123456" not in stored
    again = sealed.seal(KEYS.contents, b"Docs/tax.txt", Meta(1, 0o644, len(data)), data)
    assert again[sealed.HEADER_SIZE :] != stored[sealed.HEADER_SIZE :]  # a fresh salt
    # Without the key: nothing.
    with pytest.raises(SealedFileError, match="header altered"):
        sealed.open_sealed(DataKeys.from_secret(bytes(32)).contents, b"Docs/tax.txt", stored)


def test_every_flipped_byte_is_detected() -> None:
    data = random.Random(1).randbytes(2 * CHUNK + 100)
    stored = _seal_in_pieces(data, CHUNK)
    for position in range(0, len(stored), 97):
        bad = bytearray(stored)
        bad[position] ^= 0x01
        with pytest.raises(SealedFileError, match="fails authentication"):
            sealed.open_sealed(KEYS.contents, b"Docs/f", bytes(bad))


def test_truncation_reordering_swaps_and_additions_are_detected() -> None:
    data = random.Random(2).randbytes(3 * CHUNK)
    stored = _seal_in_pieces(data, CHUNK)
    chunk = CHUNK + sealed.TAG
    body = stored[sealed.OVERHEAD :]
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    head = stored[: sealed.OVERHEAD]
    for bad, why in (
        (stored[: sealed.OVERHEAD + chunk], "truncated"),  # cut at a chunk boundary
        (stored[:-1], "truncated"),
        (stored[:10], "truncated"),
        (head + parts[1] + parts[0] + parts[2], "chunk 0"),  # reordered
        (head + parts[0] + parts[0] + parts[2], "chunk 1"),  # duplicated
        (stored + b"x", "longer"),
        (b"X" + stored[1:], "not a sealed file"),
        (stored[:6] + b"\x09" + stored[7:], "unknown format"),
    ):
        with pytest.raises(SealedFileError, match=why):
            sealed.open_sealed(KEYS.contents, b"Docs/f", bad)
    # The same bytes at another path (two stored files swapped by the host): refused.
    with pytest.raises(SealedFileError, match="not where it was sealed"):
        sealed.open_sealed(KEYS.contents, b"Docs/g", stored)
    # A shorter file's last chunk in place of a longer file's: its flag and size differ.
    short = _seal_in_pieces(data[:100], CHUNK)
    with pytest.raises(SealedFileError):
        sealed.open_sealed(KEYS.contents, b"Docs/f", head + short[sealed.OVERHEAD :])


def test_sealer_refuses_more_than_announced() -> None:
    sealer = Sealer(KEYS.contents, b"Docs/f", Meta(0, 0o644, 10))
    sealer.update(b"12345")
    assert not sealer.done
    with pytest.raises(ValueError, match="more data"):
        sealer.update(b"123456")


def test_resume_salts_follow_the_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    info = os.stat(path)
    first = sealed.resume_salt(KEYS.salts, b"Docs/f", info)
    assert len(first) == sealed.SALT_SIZE
    assert sealed.resume_salt(KEYS.salts, b"Docs/f", os.stat(path)) == first
    assert sealed.resume_salt(KEYS.salts, b"Docs/g", info) != first
    # Any write moves the ctime, which no program sets: another salt.
    fields = {name: getattr(info, name) for name in _IDENTITY}
    for name in _IDENTITY:
        changed = SimpleNamespace(**{**fields, name: fields[name] + 1})
        assert sealed.resume_salt(KEYS.salts, b"Docs/f", changed) != first  # type: ignore[arg-type]


_IDENTITY = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def test_plain_size_refuses_impossible_sizes() -> None:
    assert sealed.plain_size(0) is None
    assert sealed.plain_size(sealed.OVERHEAD + 5) is None
    assert sealed.plain_size(sealed.stored_size(CHUNK) + 3) is None
    assert sealed.plain_size(sealed.OVERHEAD + CHUNK + sealed.TAG + 8) is None
