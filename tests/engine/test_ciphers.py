"""The SSH algorithms MyNAS offers: modern ones only; AES-GCM first where the CPU has AES."""

from __future__ import annotations

from typing import Any

import asyncssh
import pytest

from custom_components.mynas.engine import ciphers
from custom_components.mynas.engine.errors import PeerUnreachable
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
    """AES-GCM first with AES instructions, ChaCha20 first without; AEAD ciphers only."""
    monkeypatch.delenv("MYNAS_CIPHERS", raising=False)
    assert ciphers.preferred(has_aes=True)[0] == "aes128-gcm@openssh.com"
    assert ciphers.preferred(has_aes=False)[0] == "chacha20-poly1305@openssh.com"
    for has_aes in (True, False):
        assert sorted(ciphers.preferred(has_aes=has_aes)) == sorted(ciphers.AEAD)
    monkeypatch.setattr(ciphers, "HAS_AES", False)
    assert ciphers.preferred() == ciphers.AEAD
    monkeypatch.setenv("MYNAS_CIPHERS", "aes256-gcm@openssh.com, chacha20-poly1305@openssh.com")
    assert ciphers.preferred(has_aes=True) == (
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
    )


@pytest.mark.parametrize("override", ["aes256-gcm@openssh.com,aes128-ctr", "aes128-cbc", " , "])
def test_the_override_names_only_aead_ciphers(
    monkeypatch: pytest.MonkeyPatch, override: str
) -> None:
    """MYNAS_CIPHERS cannot bring back a cipher that needs a MAC (nor mean "the defaults")."""
    monkeypatch.setenv("MYNAS_CIPHERS", override)
    with pytest.raises(ValueError, match="MYNAS_CIPHERS may name only"):
        ciphers.preferred()


def test_key_exchange_keeps_what_asyncssh_can_do() -> None:
    """The hybrid first when asyncssh has it; curve25519 always; nothing else, ever."""
    everything = [alg.encode() for alg in ciphers.KEX_ALGS] + [b"diffie-hellman-group14-sha1"]
    assert ciphers.key_exchange(everything) == ciphers.KEX_ALGS
    without_pq = [b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"ecdh-sha2-nistp256"]
    assert ciphers.key_exchange(without_pq) == ("curve25519-sha256", "curve25519-sha256@libssh.org")
    assert not ciphers.has_post_quantum(ciphers.key_exchange(without_pq))
    assert ciphers.has_post_quantum(("sntrup761x25519-sha512", "curve25519-sha256"))


def test_the_pinned_requirements_give_post_quantum_key_exchange() -> None:
    """asyncssh and cryptography as pinned do ML-KEM (a change that loses it fails here)."""
    assert ciphers.key_exchange()[0] == "mlkem768x25519-sha256"
    assert ciphers.has_post_quantum()


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


def test_no_cpuinfo_means_no_aes_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not Linux, or no /proc: no claim about AES instructions."""

    def no_proc(*_args: Any, **_kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr("builtins.open", no_proc)
    assert ciphers._detect() is False


async def test_two_nodes_agree_on_the_hybrid_key_exchange(
    server: Any, alice_id: Identity, host_id: Identity, chosen_kex: list[bytes]
) -> None:
    """Our client against our server: mlkem768x25519-sha256, an AEAD cipher, no MAC."""
    async with await connect(alice_id, address(server), host_id.public_line) as peer:
        info = peer._conn.get_extra_info
        assert info("send_cipher") in ciphers.AEAD
        assert info("send_mac") == info("send_cipher")  # AEAD: the cipher is its own MAC
    # Each end chose (the client and the server, same process): the same hybrid.
    assert chosen_kex == [b"mlkem768x25519-sha256"] * 2


class _WeakServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True


@pytest.mark.parametrize(
    "weak",
    [
        {"kex_algs": ["diffie-hellman-group14-sha1", "diffie-hellman-group14-sha256"]},
        {"kex_algs": ["ecdh-sha2-nistp256", "diffie-hellman-group-exchange-sha256"]},
        {"encryption_algs": ["aes128-ctr", "aes256-cbc"], "mac_algs": ["hmac-sha1"]},
        {"encryption_algs": ["aes256-ctr"], "mac_algs": ["hmac-sha2-256-etm@openssh.com"]},
    ],
)
async def test_our_client_refuses_a_server_that_offers_only_weak_algorithms(
    host_id: Identity, alice_id: Identity, weak: dict[str, Any]
) -> None:
    """Nothing weak is in our client's offer: a host with only weak ones finds no match."""
    listener = await asyncssh.create_server(
        _WeakServer, "127.0.0.1", 0, server_host_keys=[host_id.private_key], **weak
    )
    port = listener.sockets[0].getsockname()[1]
    try:
        with pytest.raises(PeerUnreachable, match="No matching"):
            await connect(alice_id, f"127.0.0.1:{port}", host_id.public_line)
    finally:
        listener.close()
        await listener.wait_closed()
