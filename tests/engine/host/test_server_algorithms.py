"""Modern SSH only: what OpenSSH's client and ssh-audit get from a live node server.

The node offers hybrid post-quantum key exchange first, curve25519 for clients without it,
Ed25519 host keys and AEAD ciphers only (``engine/ciphers.py``). Here OpenSSH's own ``ssh``
tries weak offers (each must be refused during the key exchange, before authentication) and a
modern one (it must negotiate and log in), and ``ssh-audit`` (the PyPI tool, pinned in
requirements_test.txt) judges the server as a security review would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
import re
import sys
from typing import Any

import pytest

from custom_components.mynas.engine import ciphers
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner.client import connect

from ..conftest import ServerFactory, address
from ..openssh_support import HOST, OpenSSH

# What ssh-audit 3.9 says of curve25519, the fallback for clients without post-quantum key
# exchange (OpenSSH before 9.9, such as Debian 12's 9.2 these tests run): the only warning it
# may give (see the README's "Security" and ciphers.py for why the fallback stays).
NOT_POST_QUANTUM = "does not provide protection against post-quantum attacks"
CLASSIC_FALLBACK = {"curve25519-sha256", "curve25519-sha256@libssh.org"}


@pytest.fixture
def openssh(server: NodeServer, key_file: Any, tmp_path: Path) -> OpenSSH:
    """OpenSSH's client with alice's key (a configured peer), the node's key pinned."""
    return OpenSSH.for_server(server, key_file("alice"), tmp_path / "alice-ssh")


async def _sftp_pwd(openssh: OpenSSH, *options: str) -> tuple[int, str]:
    """Run ``sftp -v`` with a one-command batch and these options; return (code, stderr)."""
    batch = openssh.workdir / "batch"
    batch.write_text("pwd\n")
    code, _out, err = await openssh.run("sftp", "-v", *options, "-b", str(batch), f"anyone@{HOST}")
    return code, err


async def _client_default_kex() -> list[str]:
    """OpenSSH's own default key exchange list, in its order of preference."""
    proc = await asyncio.create_subprocess_exec(
        "ssh", "-G", "-F", "/dev/null", HOST, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    for line in out.decode().splitlines():
        name, _, value = line.partition(" ")
        if name == "kexalgorithms":
            return value.split(",")
    raise AssertionError("ssh -G printed no kexalgorithms")


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (("-o", "KexAlgorithms=diffie-hellman-group14-sha1"), "no matching key exchange method"),
        (("-o", "KexAlgorithms=diffie-hellman-group14-sha256"), "no matching key exchange method"),
        (("-o", "KexAlgorithms=ecdh-sha2-nistp256"), "no matching key exchange method"),
        (("-c", "aes128-ctr", "-o", "MACs=hmac-sha1"), "no matching cipher"),
        (("-c", "aes256-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"), "no matching cipher"),
        (("-c", "aes128-cbc"), "no matching cipher"),
        (("-o", "HostKeyAlgorithms=rsa-sha2-512,ecdsa-sha2-nistp256"), "no matching host key"),
    ],
)
async def test_openssh_weak_offers_are_refused(
    openssh: OpenSSH, options: tuple[str, ...], refusal: str
) -> None:
    """Old key exchanges, non-AEAD ciphers, other host key types: no common algorithm."""
    code, err = await _sftp_pwd(openssh, *options)
    assert code != 0
    assert refusal in err
    assert "Authenticated" not in err  # refused in the key exchange, before any login


async def test_openssh_modern_offer_negotiates(openssh: OpenSSH) -> None:
    """OpenSSH's defaults: its best key exchange that we offer, an AEAD cipher, no MAC."""
    code, err = await _sftp_pwd(openssh)
    assert code == 0, err
    assert "Authenticated to" in err
    expected = next(alg for alg in await _client_default_kex() if alg in ciphers.key_exchange())
    assert f"kex: algorithm: {expected}" in err
    negotiated = re.findall(r"kex: (?:server->client|client->server) cipher: (\S+) MAC: (\S+)", err)
    assert len(negotiated) == 2
    for cipher, mac in negotiated:
        assert cipher in ciphers.AEAD
        assert mac == "<implicit>"
    assert "host key algorithm: ssh-ed25519" in err


async def test_ssh_audit_finds_nothing_but_the_classic_fallback(server: NodeServer) -> None:
    """ssh-audit: no failure, no CVE, no recommendation; a warning only on curve25519.

    The warning it keeps is ssh-audit's note that curve25519 alone is not post-quantum: it is
    offered after the hybrid for clients that have none (two MyNAS nodes never use it).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ssh_audit",
        "--json",
        "--skip-rate-test",
        "--timeout",
        "20",
        "-p",
        str(server.port),
        HOST,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    report = json.loads(out)
    assert report["target"] == f"{HOST}:{server.port}", err
    assert report["cves"] == []
    assert report["recommendations"] == {}
    offered = {kind: [entry["algorithm"] for entry in report[kind]] for kind in ("kex", "key")}
    assert offered["kex"][: len(ciphers.key_exchange())] == list(ciphers.key_exchange())
    assert offered["key"] == ["ssh-ed25519"]
    assert {entry["algorithm"] for entry in report["enc"]} == set(ciphers.AEAD)
    findings: dict[str, list[str]] = {}
    for kind in ("kex", "key", "enc", "mac"):
        for entry in report[kind]:
            notes = entry.get("notes", {})
            assert not notes.get("fail"), (entry["algorithm"], notes)
            if warnings := notes.get("warn"):
                findings[entry["algorithm"]] = warnings
    assert findings == {alg: [NOT_POST_QUANTUM] for alg in CLASSIC_FALLBACK}
    # Warnings (and nothing worse) are what its exit status says.
    assert proc.returncode == 2


async def test_without_ml_kem_the_node_says_so_and_uses_curve25519(
    make_server: ServerFactory,
    alice_id: Identity,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    chosen_kex: list[bytes],
) -> None:
    """A cryptography without ML-KEM: a warning at start, curve25519 between the nodes."""
    classic = [b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"ecdh-sha2-nistp256"]
    monkeypatch.setattr(ciphers, "get_kex_algs", lambda: classic)
    server = await make_server()
    assert "cannot do post-quantum key exchange" in caplog.text
    async with await connect(alice_id, address(server), server.identity.public_line):
        pass
    assert chosen_kex == [b"curve25519-sha256"] * 2
