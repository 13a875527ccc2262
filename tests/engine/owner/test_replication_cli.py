"""The command line end to end: push, verify, restore (and serve) as separate processes.

Each command is a real ``python -m custom_components.mynas.engine`` process; the host is a
live server in the test's event loop (one test runs ``serve`` as a process too). Success
exits 0 and ends stdout with a JSON summary; a failure exits non-zero with one line on
stderr that says why.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
import signal
import socket
import sys
from typing import Any

import pytest

from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner.run import SMALL_FILE

from ..cli_support import ROOT, mynas, public_key_file
from ..replica_support import MTIME, Env, snapshot, without_root, write


@pytest.fixture
def alice_key(tmp_path: Path, alice_id: Identity) -> Path:
    """Alice's private key file (the conftest identities live there)."""
    return tmp_path / "keys" / "alice" / "id_ed25519"


def _common(env: Env, key: Path, peer_key: Path, address: str | None = None) -> list[Any]:
    return [
        "--key",
        key,
        "--peer",
        address or env.target.addresses[0],
        "--peer-key",
        peer_key,
        "--folder",
        "Docs",
    ]


async def _verify_finds_and_repairs(verify: list[Any], damaged: str) -> None:
    """``verify`` exits 1 naming the one damaged file; with ``--repair`` it sends it again."""
    run = await mynas(*verify)
    assert run.code == 1
    assert run.summary["host_damaged"] == 1
    assert f"host damage: {damaged} (not what was sent)" in run.err
    run = await mynas(*verify, "--repair")
    assert run.code == 0, run.err
    assert run.summary["repaired"] == 1


async def test_push_verify_restore(env: Env, alice_key: Path) -> None:
    """The happy path and its summaries, then verify catching and repairing a tampered file."""
    write(env.src / "a.txt", b"hello")
    write(env.src / "sub" / "b.bin", os.urandom(SMALL_FILE + 10), mode=0o755)
    (env.src / "empty").mkdir()
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    common = _common(env, alice_key, host_key)
    index = ["--index", env.work / "cli-index.sqlite"]

    run = await mynas("push", *common, "--source", env.src, *index, "--plain")
    assert run.code == 0, run.err
    pushed = run.summary
    assert {"files_sent", "bytes_sent", "files_deleted", "files_total", "seconds"} <= set(pushed)
    assert (pushed["files_sent"], pushed["files_total"]) == (2, 2)
    assert pushed["bytes_sent"] == 5 + SMALL_FILE + 10
    env.check_replica()

    assert pushed["peer_contacted"]

    run = await mynas("push", *common, "--source", env.src, *index, "--bwlimit", "50M", "--plain")
    assert run.code == 0, run.err
    assert (run.summary["files_sent"], run.summary["files_deleted"]) == (0, 0)
    assert not run.summary["peer_contacted"]  # nothing to do: the peer is left alone

    run = await mynas("verify", *common, "--source", env.src, *index)
    assert run.code == 0, run.err
    assert {k: run.summary[k] for k in ("checked", "host_damaged", "unsent", "local_rot")} == {
        "checked": 2,
        "host_damaged": 0,
        "unsent": 0,
        "local_rot": 0,
    }

    write(env.replica / "a.txt", b"HELLO")  # same size and mtime: only the hash tells
    await _verify_finds_and_repairs(["verify", *common, "--source", env.src, *index], "a.txt")
    assert (env.replica / "a.txt").read_bytes() == b"hello"

    dest = env.work / "restored"
    run = await mynas("restore", *common, "--to", dest)
    assert run.code == 0, run.err
    assert run.summary["files"] == 2
    assert snapshot(dest) == snapshot(env.src, portable=True)

    run = await mynas("restore", *common, "--to", dest)
    assert run.code == 1
    assert run.reason.startswith("mynas restore: error: 2 file(s) already exist")
    run = await mynas("restore", *common, "--to", dest, "--overwrite", "--path", "sub/b.bin")
    assert run.code == 0, run.err
    assert run.summary["files"] == 1


async def test_failures_exit_non_zero_with_one_line(
    env: Env, alice_key: Path, bob_id: Identity
) -> None:
    """Unreachable port, wrong peer key, missing or empty source: one line on stderr."""
    write(env.src / "a", b"a", mtime_ns=MTIME)
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    wrong_key = public_key_file(env.work, "bob", bob_id.public_line)
    index = ["--index", env.work / "cli-index.sqlite"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"

    run = await mynas("push", *_common(env, alice_key, host_key, dead), "--source", env.src)
    assert run.code == 1
    assert run.reason.startswith(f"mynas push: error: cannot reach {dead}: connection refused")
    assert run.out == ""

    run = await mynas("verify", *_common(env, alice_key, wrong_key), "--source", env.src, *index)
    assert run.code == 1
    assert "presented host key" in run.reason
    assert bob_id.fingerprint in run.reason
    assert os.listdir(env.jail) == []

    common = _common(env, alice_key, host_key)
    run = await mynas("push", *common, "--source", env.work / "nope", *index)
    assert run.code == 1
    assert "missing or unreadable" in run.reason

    run = await mynas("push", *common, "--source", env.src, *index, "--plain")
    assert run.code == 0, run.err
    os.unlink(env.src / "a")
    run = await mynas("push", *common, "--source", env.src, *index, "--plain")
    assert run.code == 1
    assert "is empty while the peer holds 1 file(s)" in run.reason
    assert (env.replica / "a").exists()
    run = await mynas("push", *common, "--source", env.src, *index, "--allow-empty", "--plain")
    assert run.code == 0, run.err
    assert run.summary["files_deleted"] == 1

    run = await mynas("restore", *common, "--to", env.work / "r", "--path", "../x")
    assert run.code == 1
    assert "not a path inside the folder" in run.reason


async def test_serve_as_a_process(fast_dir: Path, alice_key: Path, alice_id: Identity) -> None:
    """keygen, serve, push and restore: four processes, no test server at all."""
    host_key = fast_dir / "host" / "id_ed25519"
    run = await mynas("keygen", "--key", host_key)
    assert run.code == 0, run.err
    host_pub = public_key_file(fast_dir, "host", run.out.strip())
    alice_pub = public_key_file(fast_dir, "alice", alice_id.public_line)
    storage = fast_dir / "storage"
    storage.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "custom_components.mynas.engine",
        "serve",
        "--key",
        str(host_key),
        "--storage",
        str(storage),
        "--listen",
        f"127.0.0.1:{port}",
        "--peer",
        f"alice={alice_pub}:1G",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        source = fast_dir / "src"
        write(source / "photo.jpg", os.urandom(5000))
        common = ["--key", alice_key, "--peer", f"127.0.0.1:{port}", "--peer-key", host_pub]
        common += ["--folder", "Photos"]
        run = await mynas(
            "push", *common, "--source", source, "--index", fast_dir / "i.sqlite", "--plain"
        )
        assert run.code == 0, run.err
        assert run.summary["files_sent"] == 1
        assert (storage / "alice" / "Photos" / "photo.jpg").read_bytes() == (
            source / "photo.jpg"
        ).read_bytes()
        run = await mynas("restore", *common, "--to", fast_dir / "back")
        assert run.code == 0, run.err
        assert snapshot(fast_dir / "back") == snapshot(source, portable=True)
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(serve.communicate(), 30)
    assert serve.returncode == 0, err.decode()


async def test_encrypted_by_default_and_restored_from_the_recovery_code(
    env: Env, alice_key: Path
) -> None:
    """push encrypts; recovery-code prints one line; restore needs that line alone."""
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    common = _common(env, alice_key, host_key)
    index = ["--index", env.work / "index.sqlite"]
    write(env.src / "secret.txt", b"the secret")
    write(env.src / "sub" / "big", os.urandom(SMALL_FILE + 5))
    run = await mynas("push", *common, "--source", env.src, *index)
    assert run.code == 0, run.err
    assert run.summary["files_sent"] == 2
    assert not (env.jail / "Docs").exists()  # no plain name on the host
    run = await mynas("push", *common, "--source", env.src, *index, "--plain")
    assert run.code == 1
    assert "encrypted copy of 'Docs'" in run.reason

    run = await mynas("recovery-code", "--key", alice_key)
    assert run.code == 0, run.err
    (code,) = run.out.split()
    assert len(code) == 56 + 13
    without_key = [arg if arg != alice_key else "unused" for arg in common]
    without_key[0:2] = ["--recovery-code", code.lower()]
    dest = env.work / "restored"
    run = await mynas("restore", *without_key, "--to", dest)
    assert run.code == 0, run.err
    assert run.summary["files"] == 2
    assert without_root(snapshot(dest / "sub")) == without_root(snapshot(env.src / "sub"))
    assert (dest / "secret.txt").read_bytes() == b"the secret"
    # What the peer keeps, listed by name with nothing but the code.
    run = await mynas("folders", *without_key[:-2])
    assert run.code == 0, run.err
    assert [
        (item["name"], item["encrypted"], item["files"]) for item in run.summary["folders"]
    ] == [("Docs", True, 2)]

    # A damaged file: the others are restored, it is named, and the status says so.
    for path in env.jail.rglob("*"):
        if path.is_file() and path.stat().st_size < 1000:
            path.write_bytes(path.read_bytes()[:-1] + b"!")
    again = env.work / "again"
    run = await mynas("restore", *without_key, "--to", again)
    assert run.code == 1
    assert "not restored: secret.txt: " in run.err
    assert run.summary["failed"] == 1
    assert (again / "sub" / "big").exists()
    assert not (again / "secret.txt").exists()

    # verify finds it without downloading, and --repair sends it again.
    verify = ["verify", *common, "--source", env.src, *index]
    await _verify_finds_and_repairs(verify, "secret.txt")
    fixed = env.work / "fixed"
    run = await mynas("restore", *without_key, "--to", fixed, "--path", "secret.txt")
    assert run.code == 0, run.err
    assert (fixed / "secret.txt").read_bytes() == b"the secret"

    typo = code[:5] + ("0" if code[5] != "0" else "1") + code[6:]
    without_key[1] = typo
    run = await mynas("restore", *without_key, "--to", env.work / "typo")
    assert run.code == 1
    assert "checksum does not match" in run.reason


def _closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_push_tries_each_peer_address_in_order(env: Env, alice_key: Path) -> None:
    """A friend who moved: the old address first, then the new one; the push goes through."""
    write(env.src / "a.txt", b"hello")
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    old, new = _closed_address(), env.target.addresses[0]
    index = ["--index", env.work / "cli-index.sqlite"]
    common = ["--key", alice_key, "--peer-key", host_key, "--folder", "Docs", "--plain"]
    run = await mynas("push", *common, "--peer", old, "--peer", new, "--source", env.src, *index)
    assert run.code == 0, run.err
    assert run.summary["files_sent"] == 1
    env.check_replica()
    # Nowhere at all: one line that names every address tried.
    other = _closed_address()
    write(env.src / "b.txt", b"more")
    run = await mynas("push", *common, "--peer", old, "--peer", other, "--source", env.src, *index)
    assert run.code == 1
    assert old in run.reason
    assert other in run.reason


async def test_a_push_with_nothing_to_send_loads_no_ssh(env: Env, alice_key: Path) -> None:
    """Start-up is most of a no-change push: it loads neither asyncssh nor the client."""
    write(env.src / "a.txt", b"hello")
    write(env.src / "sub" / "b.bin", os.urandom(SMALL_FILE + 10))
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    args = [*_common(env, alice_key, host_key), "--source", env.src]
    args += ["--index", env.work / "cli-index.sqlite"]
    run = await mynas("push", *args)  # encrypted: names and contents sealed
    assert run.code == 0, run.err
    assert run.summary["files_sent"] == 2

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "custom_components.mynas.engine",
        "push",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert '"files_sent": 0' in out.decode()
    assert '"peer_contacted": false' in out.decode()
    loaded = {line.rpartition("|")[2].strip() for line in err.decode().splitlines()}
    assert "custom_components.mynas.engine.owner.sealed" in loaded  # the run did run
    assert "asyncssh" not in loaded
    assert "custom_components.mynas.engine.owner.client" not in loaded


async def test_hold_over_holds_a_mass_change_until_pushed_without_it(
    env: Env, alice_key: Path
) -> None:
    """``--hold-over 30``: most files rewritten → exit 1, one line, nothing on the host."""
    host_key = public_key_file(env.work, "host", env.server.identity.public_line)
    push = ["push", *_common(env, alice_key, host_key), "--source", env.src]
    push += ["--index", env.work / "index.sqlite"]
    for n in range(40):
        write(env.src / f"{n:02}.jpg", b"photo %d" % n)
    run = await mynas(*push, "--hold-over", "30")
    assert run.code == 0, run.err
    assert run.summary["files_sent"] == 40
    before = snapshot(env.jail)
    for n in range(20):
        write(env.src / f"{n:02}.jpg", b"encrypted by them %d" % n, mtime_ns=MTIME + 1)

    run = await mynas(*push, "--hold-over", "30")
    assert run.code == 1
    assert "would replace 20 and delete 0 of the 40 file(s)" in run.reason
    assert run.reason.endswith("(push without --hold-over to send it)")
    assert snapshot(env.jail) == before
    run = await mynas(*push, "--hold-over", "50")  # 50 % is not more than 50 %
    assert run.code == 0, run.err
    assert run.summary["files_sent"] == 20

    run = await mynas(*push, "--hold-over", "0")
    assert run.code == 2
    assert "'0': a whole percentage, 1 to 100" in run.reason
