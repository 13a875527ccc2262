"""The recovery code: the node secret as one line a person writes down, typos caught."""

from __future__ import annotations

import os
from pathlib import Path
import random

import pytest

from custom_components.mynas.engine import identity, recovery_code
from custom_components.mynas.engine.errors import KeyFileError
from custom_components.mynas.engine.recovery_code import ALPHABET, RecoveryCodeError


def test_round_trip_and_shape() -> None:
    for _ in range(50):
        seed = os.urandom(32)
        code = recovery_code.encode(seed)
        groups = code.split("-")
        assert len(groups) == 14
        assert all(len(group) == 4 for group in groups)
        assert set(code) <= set(ALPHABET) | {"-"}
        assert not set(code) & set("ILOU")
        assert recovery_code.decode(code) == seed


def test_reading_is_forgiving_where_it_cannot_be_wrong() -> None:
    seed = bytes(range(32))
    code = recovery_code.encode(seed)
    sloppy = " ".join(code.replace("-", "").lower()[i : i + 7] for i in range(0, 56, 7))
    assert recovery_code.decode(sloppy) == seed
    assert recovery_code.decode("\n" + code + "\n") == seed
    # Crockford: I and L are read as 1, O as 0.
    with_ones = code.replace("1", "I", 1).replace("0", "o", 1)
    assert recovery_code.decode(with_ones) == seed


def test_every_single_typo_and_every_swap_is_caught() -> None:
    rng = random.Random(11)
    for _ in range(3):
        seed = rng.randbytes(32)
        text = recovery_code.encode(seed).replace("-", "")
        for position, char in enumerate(text):
            for other in ALPHABET:
                if other == char:
                    continue
                typo = text[:position] + other + text[position + 1 :]
                with pytest.raises(RecoveryCodeError, match="checksum"):
                    recovery_code.decode(typo)
        for position in range(len(text) - 1):
            a, b = text[position], text[position + 1]
            if a == b:
                continue
            swapped = text[:position] + b + a + text[position + 2 :]
            with pytest.raises(RecoveryCodeError, match="swapped"):
                recovery_code.decode(swapped)


def test_clear_errors() -> None:
    code = recovery_code.encode(os.urandom(32))
    with pytest.raises(RecoveryCodeError, match="55 characters; a complete one has 56"):
        recovery_code.decode(code[:-1])
    with pytest.raises(RecoveryCodeError, match="57 characters"):
        recovery_code.decode(code + "7")
    with pytest.raises(RecoveryCodeError, match="'U' at position 1"):
        recovery_code.decode("U" + code[1:])
    with pytest.raises(RecoveryCodeError, match=r"'\\x00' at position 2"):
        recovery_code.decode(code[0] + "\0" + code[2:])
    with pytest.raises(RecoveryCodeError, match="0 characters"):
        recovery_code.decode("")
    with pytest.raises(ValueError, match="32 bytes"):
        recovery_code.encode(b"short")


def test_the_code_rebuilds_the_same_identity(tmp_path: Path) -> None:
    """A node rebuilt from its code has the same key pair: friends' pins still hold."""
    node, _ = identity.load_or_create(tmp_path / "key")
    code = recovery_code.encode(identity.private_seed(node))
    rebuilt = identity.from_seed(recovery_code.decode(code))
    assert rebuilt == node
    assert rebuilt.fingerprint == node.fingerprint
    assert code not in repr(rebuilt)
    # ... and it can be written as a key file again, which loads as the same node.
    identity.install(rebuilt, tmp_path / "new" / "key")
    assert identity.load(tmp_path / "new" / "key") == node
    assert (tmp_path / "new" / "key").stat().st_mode & 0o777 == 0o600
    identity.install(rebuilt, tmp_path / "new" / "key")  # the same key: kept
    other, _ = identity.load_or_create(tmp_path / "other")
    with pytest.raises(KeyFileError, match="another key"):
        identity.install(other, tmp_path / "new" / "key")
    with pytest.raises(KeyFileError, match="32 bytes"):
        identity.from_seed(b"x" * 31)


def test_install_reports_an_unwritable_place(tmp_path: Path) -> None:
    node, _ = identity.load_or_create(tmp_path / "key")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KeyFileError, match="cannot create the key file"):
        identity.install(node, blocker / "key")


def test_the_public_api_offers_the_code_both_ways(tmp_path: Path) -> None:
    from custom_components.mynas import engine  # noqa: PLC0415

    node, _ = identity.load_or_create(tmp_path / "key")
    code = engine.recovery_code_of(node)
    assert engine.identity_from_recovery_code(code) == node
    with pytest.raises(engine.RecoveryCodeError):
        engine.identity_from_recovery_code(code[:-1])
    engine.install_identity(node, tmp_path / "again")
    assert identity.load(tmp_path / "again") == node
