"""The SSH algorithms MyNAS offers, on both sides: modern ones only.

Key exchange: the post-quantum hybrid ``mlkem768x25519-sha256`` first (backup traffic recorded
today may be decrypted later by a quantum computer: exactly what hybrid key exchange is for),
then ``sntrup761x25519-sha512`` where asyncssh has it (only with liboqs installed), then
``curve25519-sha256`` for clients without either (OpenSSH before 9.9, such as Debian 12's 9.2,
which a user may run as an SFTP client; a node whose ``cryptography`` lacks ML-KEM). asyncssh
offers ML-KEM through ``cryptography`` when its OpenSSL has it (cryptography's own wheels do);
a key exchange the installed asyncssh cannot do is left out, and ``has_post_quantum()`` tells
whether any hybrid remains (the server logs a warning when not). The choice is signed by the
host key with the whole negotiation, so no one in between can push two hybrid-capable ends
down to curve25519.

Host keys: Ed25519 only (every node's identity is an Ed25519 key). Ciphers: AEAD only
(ChaCha20-Poly1305, AES-GCM), so no separate MAC is ever negotiated; ``MAC_ALGS`` names one
ETM MAC only because an empty list in the key exchange init trips some tools (ssh-audit
reads it as an unknown algorithm named "").

Which cipher comes first depends on the CPU. AES-GCM is the fastest where the CPU has AES
instructions (x86 with AES-NI, most 64-bit ARM cores): ChaCha20-Poly1305 costs about 1.5 times
the CPU there (measured: +47 % client CPU on x86 for bulk data). Without AES instructions (a
Raspberry Pi 4) ChaCha20 is the faster one and comes first.

In SSH the client's order decides (the first of its algorithms that the server also offers),
so the order matters for the connecting side; the server uses the same lists, which changes
nothing for its clients but keeps both ends saying the same thing.

``MYNAS_CIPHERS``, when set, is the list to offer instead, comma-separated as in OpenSSH
(``scripts/bench`` sets it to compare with rsync over OpenSSH on the same cipher); it may
name only the AEAD ciphers above.
"""

from __future__ import annotations

from collections.abc import Iterable
import os

# Best first; what the installed asyncssh lacks is left out (see key_exchange()).
KEX_ALGS = (
    "mlkem768x25519-sha256",
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
)
POST_QUANTUM = frozenset(KEX_ALGS[:3])
HOST_KEY_ALGS = ("ssh-ed25519",)
# Without AES instructions: asyncssh's own order of its AEAD ciphers, ChaCha20 first.
AEAD = (
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
)
# With AES instructions: AES-GCM first (128 bits: fewer rounds than 256, and enough).
AES_FIRST = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
# Never used (every cipher above is AEAD): see the module's docstring.
MAC_ALGS = ("hmac-sha2-256-etm@openssh.com",)


def get_kex_algs() -> list[bytes]:
    """Return the key exchanges the installed asyncssh registered.

    asyncssh is imported here, on first use: a push with nothing to send (which seals, and so
    reads ``HAS_AES``) never loads it.
    """
    from asyncssh.kex import get_kex_algs as registered  # noqa: PLC0415

    return list(registered())


def key_exchange(available: Iterable[bytes] | None = None) -> tuple[str, ...]:
    """Return the key exchanges to offer, best first: those of KEX_ALGS asyncssh can do.

    ``available`` defaults to what the installed asyncssh registered.
    """
    known = set(get_kex_algs() if available is None else available)
    return tuple(alg for alg in KEX_ALGS if alg.encode() in known)


def has_post_quantum(algs: Iterable[str] | None = None) -> bool:
    """Return whether a hybrid post-quantum key exchange is among ``algs`` (default: ours)."""
    return not POST_QUANTUM.isdisjoint(key_exchange() if algs is None else algs)


def cpu_has_aes(cpuinfo: str, machine: str) -> bool:
    """Return whether a ``/proc/cpuinfo`` text shows AES instructions on every CPU listed.

    x86 lists them as ``aes`` in ``flags``, 64-bit ARM as ``aes`` in ``Features``.
    """
    field = "flags" if machine in ("x86_64", "i686", "i386") else "Features"
    found = [
        "aes" in value.split()
        for name, _, value in (line.partition(":") for line in cpuinfo.splitlines())
        if name.strip() == field
    ]
    return bool(found) and all(found)


def _detect() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return cpu_has_aes(handle.read(), os.uname().machine)
    except OSError:
        return False  # not Linux, or no /proc: no claim, ChaCha20 first


# Read once, when the engine is imported (never inside an event loop).
HAS_AES = _detect()


def preferred(has_aes: bool | None = None) -> tuple[str, ...]:
    """Return the ciphers to offer, best first.

    ``has_aes`` defaults to what this machine's CPU has. ``MYNAS_CIPHERS`` replaces the
    list; a name in it that is not one of the AEAD ciphers raises ValueError.
    """
    if override := os.environ.get("MYNAS_CIPHERS"):
        names = tuple(name.strip() for name in override.split(",") if name.strip())
        refused = [name for name in names if name not in AEAD]
        if refused or not names:
            raise ValueError(f"MYNAS_CIPHERS may name only {', '.join(AEAD)}; not {override!r}")
        return names
    return AES_FIRST if (HAS_AES if has_aes is None else has_aes) else AEAD
