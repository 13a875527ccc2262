"""The recovery code: the node secret written for people, to keep outside the house.

The node secret is the 32-byte seed of the node's Ed25519 key (``identity.private_seed``):
every data key of an encrypted replica derives from it (``owner/keys.py``), and the same
seed rebuilds the same key pair, so friends' pinned keys still hold after a house fire. The
code is that seed plus a 24-bit checksum (the first 3 bytes of SHA-256 over a domain label
and the seed), 35 bytes = 280 bits = exactly 56 characters of Crockford's base32
(``0-9 A-Z`` without I, L, O, U), printed as 14 groups of 4 joined by ``-``::

    7K3D-0QWN-...-XB5T

Reading is forgiving where it cannot be wrong — lower case, spaces and hyphens anywhere,
``I``/``L`` read as ``1`` and ``O`` as ``0`` (Crockford's rule) — and strict where it must be:
a wrong length, a character outside the alphabet, or a checksum that does not match (one
character mistyped, two swapped: caught with probability 1 - 2^-24) is refused with an error
that says which. The code is as secret as the key file: never log it (nothing here does).
"""

from __future__ import annotations

import hashlib

from .errors import MyNasError
from .identity import Identity, from_seed, private_seed

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SEED_SIZE = 32
_CHECK_SIZE = 3
_LENGTH = (SEED_SIZE + _CHECK_SIZE) * 8 // 5  # 56 characters
_GROUP = 4
_LABEL = b"mynas/v1/recovery-code\0"
_READ = {char: value for value, char in enumerate(ALPHABET)} | {"I": 1, "L": 1, "O": 0}


class RecoveryCodeError(MyNasError):
    """A recovery code that cannot be read: mistyped, incomplete, or not a recovery code."""


def _checksum(seed: bytes) -> bytes:
    return hashlib.sha256(_LABEL + seed).digest()[:_CHECK_SIZE]


def encode(seed: bytes) -> str:
    """Return the recovery code of a 32-byte node secret."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"a node secret has {SEED_SIZE} bytes, not {len(seed)}")
    number = int.from_bytes(seed + _checksum(seed))
    chars = [ALPHABET[(number >> (5 * (_LENGTH - 1 - i))) & 31] for i in range(_LENGTH)]
    text = "".join(chars)
    return "-".join(text[i : i + _GROUP] for i in range(0, _LENGTH, _GROUP))


def decode(code: str) -> bytes:
    """Return the node secret a recovery code holds; RecoveryCodeError if it is mistyped."""
    text = "".join(code.split()).replace("-", "").upper()
    number = 0
    for position, char in enumerate(text, 1):
        value = _READ.get(char)
        if value is None:
            raise RecoveryCodeError(
                f"the recovery code has {char!r} at position {position}, which no recovery "
                f"code contains (they use {ALPHABET})"
            )
        number = number << 5 | value
    if len(text) != _LENGTH:
        raise RecoveryCodeError(
            f"the recovery code has {len(text)} characters; a complete one has {_LENGTH} "
            f"({_LENGTH // _GROUP} groups of {_GROUP})"
        )
    raw = number.to_bytes(SEED_SIZE + _CHECK_SIZE)
    seed, check = raw[:SEED_SIZE], raw[SEED_SIZE:]
    if _checksum(seed) != check:
        raise RecoveryCodeError(
            "the recovery code's checksum does not match: a character is mistyped or two "
            "are swapped (nothing was changed)"
        )
    return seed


def of(node: Identity) -> str:
    """Return the recovery code of a node (keep it outside the house; never log it)."""
    return encode(private_seed(node))


def identity_from(code: str) -> Identity:
    """Return the node a recovery code stands for (RecoveryCodeError if it is mistyped)."""
    return from_seed(decode(code))
