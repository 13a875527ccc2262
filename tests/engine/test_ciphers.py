"""The cipher MyNAS offers first: AES-GCM where the CPU has AES instructions, else ChaCha20."""

from __future__ import annotations

from typing import Any

import pytest

from custom_components.mynas.engine import ciphers
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner.client import connect

from .conftest import address

X86_AES = """processor\t: 0
flags\t\t: fpu vme de pse sse sse2 ssse3 sse4_1 aes avx avx2 sha_ni
processor\t: 1
flags\t\t: fpu vme de pse sse sse2 ssse3 sse4_1 aes avx avx2 sha_ni
"""
X86_NO_AES = X86_AES.replace(" aes ", " ")
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"
PI4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [
        (X86_AES, "x86_64", True),
        (X86_NO_AES, "x86_64", False),
        (X86_AES.replace("aes", "vaes", 1), "x86_64", False),  # one CPU without it
        (PI5, "aarch64", True),
        (PI4, "aarch64", False),
        (PI4.replace("crc32", "crc32 aes"), "armv7l", True),
        ("", "x86_64", False),
        (X86_AES, "aarch64", False),  # the field an ARM kernel writes is missing
    ],
)
def test_aes_instructions_are_read_from_cpuinfo(cpuinfo: str, machine: str, expected: bool) -> None:
    """x86 lists ``aes`` in flags, ARM in Features; every CPU must have it."""
    assert ciphers.cpu_has_aes(cpuinfo, machine) is expected


def test_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    """AES-GCM first with AES instructions; asyncssh's order (ChaCha20 first) without."""
    monkeypatch.delenv("MYNAS_CIPHERS", raising=False)
    assert ciphers.preferred(has_aes=True)[0] == "aes128-gcm@openssh.com"
    assert "chacha20-poly1305@openssh.com" in ciphers.preferred(has_aes=True)
    assert ciphers.preferred(has_aes=False) == ()
    monkeypatch.setattr(ciphers, "HAS_AES", False)
    assert ciphers.preferred() == ()
    monkeypatch.setenv("MYNAS_CIPHERS", "aes256-gcm@openssh.com,aes128-ctr")
    assert ciphers.preferred(has_aes=True) == "aes256-gcm@openssh.com,aes128-ctr"


@pytest.mark.parametrize(
    ("has_aes", "expected"),
    [(True, "aes128-gcm@openssh.com"), (False, "chacha20-poly1305@openssh.com")],
)
async def test_a_real_connection_gets_the_preferred_cipher(
    server: Any,
    alice_id: Identity,
    host_id: Identity,
    monkeypatch: pytest.MonkeyPatch,
    has_aes: bool,
    expected: str,
) -> None:
    """The client's order decides what an asyncssh host agrees to."""
    monkeypatch.delenv("MYNAS_CIPHERS", raising=False)
    monkeypatch.setattr(ciphers, "HAS_AES", has_aes)
    async with await connect(alice_id, address(server), host_id.public_line) as peer:
        assert peer._conn.get_extra_info("send_cipher") == expected


def test_no_cpuinfo_keeps_asyncssh_s_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not Linux, or no /proc: no claim about AES instructions."""

    def no_proc(*_args: Any, **_kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr("builtins.open", no_proc)
    assert ciphers._detect() is False
