"""Which SSH cipher MyNAS offers first on this machine.

AES-GCM is the fastest cipher where the CPU has AES instructions (x86 with AES-NI, most
64-bit ARM cores): asyncssh's default, ChaCha20-Poly1305, costs about 1.5 times the CPU there
(measured: +47 % client CPU on x86 for bulk data). Without AES instructions (a Raspberry Pi 4)
ChaCha20 is the faster one, and asyncssh's default order stays.

In SSH the client's order decides (the first of its ciphers that the server also offers), so
this matters for the connecting side; a server may use the same list, which changes nothing
for its clients but keeps both ends saying the same thing.

``MYNAS_CIPHERS``, when set, is the list to offer instead, comma-separated as in OpenSSH
(``scripts/bench`` sets it to compare with rsync over OpenSSH on the same cipher).
"""

from __future__ import annotations

import os

# With AES instructions: AES-GCM first (128 bits: fewer rounds than 256, and enough), then
# asyncssh's own defaults, so a peer that lacks GCM still finds a common cipher.
AES_FIRST = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


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
        return False  # not Linux, or no /proc: keep asyncssh's default order


# Read once, when the engine is imported (never inside an event loop).
HAS_AES = _detect()


def preferred(has_aes: bool | None = None) -> str | tuple[str, ...]:
    """Return the ciphers to offer, best first; empty for asyncssh's default order.

    ``has_aes`` defaults to what this machine's CPU has. ``MYNAS_CIPHERS`` comes back as
    given: asyncssh reads it like OpenSSH's ``Ciphers``.
    """
    if override := os.environ.get("MYNAS_CIPHERS"):
        return override
    return AES_FIRST if (HAS_AES if has_aes is None else has_aes) else ()
