"""The data keys of encrypted replicas, all derived from the one node secret.

The node secret is the Ed25519 seed of the node's key (``identity.private_seed``), so the
key file — or the recovery code, which is that seed — is the only secret there is: nothing
else needs a backup, and a node rebuilt from its code reads its old replicas and keeps its
identity. Each purpose gets its own key by HKDF-SHA256 with a label that names the purpose
and the format version (a future format takes new labels, never new meanings for old ones):

- ``mynas/v1/names``: the AES-SIV key (64 bytes) that seals file and folder names
  (``names.py``);
- ``mynas/v1/contents``: the key from which each stored file's own key derives, with that
  file's random salt and its path (``sealed.py``);
- ``mynas/v1/salts``: the HMAC key that makes a large file's salt from its identity on disk,
  so an interrupted upload resumes with the same key (``sealed.resume_salt``).

Deriving from the SSH key means an SSH signature and the data keys share one secret: HKDF
with distinct labels keeps them independent (a signature reveals nothing of an HKDF output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..identity import Identity, private_seed

NAMES = b"mynas/v1/names"
CONTENTS = b"mynas/v1/contents"
SALTS = b"mynas/v1/salts"


def derive(secret: bytes, label: bytes, size: int) -> bytes:
    """Return ``size`` bytes of key for ``label`` from the node secret (HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), size, salt=None, info=label).derive(secret)


@dataclass(frozen=True, slots=True)
class DataKeys:
    """The keys of one node's encrypted replicas (never shown in a repr)."""

    names: bytes = field(repr=False)
    contents: bytes = field(repr=False)
    salts: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> Self:
        """Derive every data key from a node secret (32 bytes)."""
        if len(secret) != 32:
            raise ValueError(f"a node secret has 32 bytes, not {len(secret)}")
        return cls(
            derive(secret, NAMES, 64), derive(secret, CONTENTS, 32), derive(secret, SALTS, 32)
        )

    @classmethod
    def of(cls, node: Identity) -> Self:
        """Derive every data key from a node's identity."""
        return cls.from_secret(private_seed(node))
