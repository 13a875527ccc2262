"""The command line as a person runs it: keygen, invite and serve, each a real process.

``python -m custom_components.mynas.engine …`` from the repository root. A failure exits
non-zero with one line on stderr that names the problem; ``serve`` runs until SIGTERM or
SIGINT and then exits 0. The last test is the issue's "done when": a hostile friend with
OpenSSH's own client against ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
import json
import os
from pathlib import Path
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
from typing import Any

import pytest

from custom_components.mynas.engine import __main__ as cli, identity, invite, protocol
from custom_components.mynas.engine.__main__ import main
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client
from custom_components.mynas.engine.owner.run import Phase, Progress, PushResult
from custom_components.mynas.engine.protocol import Frame

from .cli_support import mynas, public_key_file, spawn
from .openssh_support import HOST, OpenSSH

PUBLIC_LINE = re.compile(r"ssh-ed25519 AAAA[0-9A-Za-z+/]+=*")
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Serving:
    """A ``serve`` process, ready (it said so on stderr)."""

    proc: asyncio.subprocess.Process
    port: int
    host_key: str
    log: list[str]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), 30)
        self.log.extend(rest.decode().splitlines())
        return await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Serving]]]:
    """Start ``serve`` with the given ``--peer`` specs; every one is stopped at teardown."""
    started: list[Serving] = []
    host_key = tmp_path / "host" / "id_ed25519"
    host, _ = identity.load_or_create(host_key)

    async def start(*peers: str, storage: Path) -> Serving:
        port = free_port()
        args = ["serve", "--key", host_key, "--storage", storage, "--listen", f"{HOST}:{port}"]
        for spec in peers:
            args += ["--peer", spec]
        proc = await spawn(*args)
        serving = Serving(proc, port, host.public_line, [])
        started.append(serving)
        assert proc.stderr is not None
        while True:  # it logs "Serving N peer(s)" once it listens
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, f"serve ended before listening: {serving.log}"
            serving.log.append(line.rstrip())
            if "Serving" in line:
                return serving

    yield start
    for serving in started:
        if serving.proc.returncode is None:
            serving.proc.kill()
            await serving.proc.wait()


# --- keygen and invite ------------------------------------------------------------------


async def test_keygen_creates_the_key_once(tmp_path: Path) -> None:
    """A 0600 key in a 0700 directory; the public line on stdout; the same key next time."""
    key = tmp_path / "config" / "mynas" / "id_ed25519"
    first = await mynas("keygen", "--key", key)
    assert first.code == 0, first.err
    line = first.out.strip()
    assert first.out == line + "\n"
    assert PUBLIC_LINE.fullmatch(line)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert identity.load(key).public_line == line
    # OpenSSH reads the same key (the node key doubles as an ordinary SSH key).
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True
    )
    assert derived.stdout.split()[:2] == line.split()
    content = key.read_bytes()
    second = await mynas("keygen", "--key", key)
    assert second.code == 0, second.err
    assert second.out.strip() == line
    assert key.read_bytes() == content
    assert "BEGIN OPENSSH PRIVATE KEY" not in first.err + second.err


async def test_keygen_refuses_what_is_not_a_key(tmp_path: Path) -> None:
    """A file in the way that is not a key is left alone, with one line saying why."""
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    run = await mynas("keygen", "--key", garbage)
    assert run.code == 1
    assert str(garbage) in run.reason
    assert garbage.read_text() == "not a key\n"
    run = await mynas("keygen", "--key", tmp_path)  # a directory
    assert run.code == 1
    assert run.reason.startswith("mynas keygen: error:")


async def test_invite_prints_a_code_that_decodes_back(tmp_path: Path) -> None:
    """invite: one mynas1: line carrying the name, every address and the public key."""
    key = tmp_path / "id_ed25519"
    line = (await mynas("keygen", "--key", key)).out.strip()
    run = await mynas(
        "invite",
        "--key",
        key,
        "--name",
        "Alice's Pi",
        "--address",
        "nas.example.org:8022",
        "--address",
        "203.0.113.7:9000",
        "--address",
        "[2001:db8::1]:8022",
    )
    assert run.code == 0, run.err
    code = run.out.strip()
    assert run.out == code + "\n"
    assert code.startswith("mynas1:")
    decoded = invite.decode(code)
    assert decoded.name == "Alice's Pi"
    assert decoded.addresses == ("nas.example.org:8022", "203.0.113.7:9000", "[2001:db8::1]:8022")
    assert decoded.public_key == line
    bad_addresses = ["nas.example.org", "nas.example.org:0", "nas.example.org:70000"]
    *refused, no_key = await asyncio.gather(
        *(mynas("invite", "--key", key, "--name", "A", "--address", bad) for bad in bad_addresses),
        mynas("invite", "--key", tmp_path / "none", "--name", "A", "--address", "a:1"),
    )
    for run in refused:
        assert run.code == 2
        assert "--address" in run.reason
    assert no_key.code == 1
    assert "does not exist" in no_key.reason


# --- serve: bad arguments -------------------------------------------------------------------


def test_serve_refuses_malformed_arguments_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Argument errors (checked in-process: the same parser, no interpreter start-up)."""
    pub = public_key_file(tmp_path, "bob", "ssh-ed25519 AAAA")
    base = ["serve", "--key", "k", "--storage", str(tmp_path), "--listen", f"{HOST}:8022"]
    cases = {
        "peer without quota": ([*base, "--peer", f"bob={pub}"], "NAME=PUBKEY_FILE:QUOTA"),
        "quota 0": ([*base, "--peer", f"bob={pub}:0"], "not a positive size"),
        "quota -1G": ([*base, "--peer", f"bob={pub}:-1G"], "is not a size"),
        "peer name": ([*base, "--peer", f".bob={pub}:1G"], "cannot start with '.'"),
        "peer name /": ([*base, "--peer", f"a/b={pub}:1G"], "cannot contain '/'"),
        "listen without port": ([*base[:-1], "localhost"], "--listen"),
        "listen port 0": ([*base[:-1], f"{HOST}:0"], "--listen"),
        "trash days": ([*base, "--trash-days", "0"], "--trash-days"),
        "missing --storage": (["serve", "--key", "k", "--listen", "a:1"], "--storage"),
        "no command": ([], "required: COMMAND"),
    }
    for name, (args, reason) in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2, name
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("mynas"), name
        assert reason in lines[0], (name, lines[0])
        assert out == "", name


async def test_serve_refuses_bad_arguments_with_one_line(tmp_path: Path) -> None:
    """Bad --peer, quota, key, storage or a busy port: non-zero, one line naming the why."""
    key = tmp_path / "host" / "id_ed25519"
    host, _ = identity.load_or_create(key)
    bob = public_key_file(tmp_path, "bob", host.public_line)
    storage = tmp_path / "storage"
    storage.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    no_internal = tmp_path / "no-internal"  # its .mynas is a file: nothing can go there
    no_internal.mkdir()
    (no_internal / ".mynas").write_text("")
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    listen = f"{HOST}:{free_port()}"

    def serve_args(*extra: str | Path, where: Path = storage) -> list[str | Path]:
        return ["serve", "--key", key, "--storage", where, "--listen", listen, *extra]

    cases: dict[str, tuple[list[str | Path], int, str]] = {
        "peer without '='": (serve_args("--peer", "bob"), 2, "expected NAME=PUBKEY_FILE:QUOTA"),
        "quota 12X": (serve_args("--peer", f"bob={bob}:12X"), 2, "'12X' is not a size"),
        "peer twice": (
            serve_args("--peer", f"bob={bob}:1G", "--peer", f"bob={bob}:2G"),
            1,
            "each --peer needs its own NAME",
        ),
        "missing pubkey": (
            serve_args("--peer", f"bob={tmp_path / 'none.pub'}:1G"),
            1,
            "cannot read the public key file",
        ),
        "private key as pubkey": (serve_args("--peer", f"bob={key}:1G"), 1, str(key)),
        "missing key": (
            ["serve", "--key", tmp_path / "none", "--storage", storage, "--listen", listen],
            1,
            "does not exist",
        ),
        "missing storage": (
            serve_args(where=tmp_path / "none"),
            1,
            "does not exist or is not a directory",
        ),
        "storage is a file": (serve_args(where=a_file), 1, "is not a directory"),
        "unusable storage": (serve_args(where=no_internal), 1, "is unusable"),
        "busy port": (
            ["serve", "--key", key, "--storage", storage, "--listen", f"{HOST}:{busy_port}"],
            1,
            f"cannot listen on {HOST}:{busy_port}",
        ),
    }
    try:
        runs = await asyncio.gather(*(mynas(*args) for args, _, _ in cases.values()))
    finally:
        busy.close()
    for (name, (_, code, reason)), run in zip(cases.items(), runs, strict=True):
        assert run.code == code, (name, run.err)
        assert reason in run.reason, (name, run.reason)
        assert run.reason.startswith("mynas serve: error: "), name
        assert run.out == "", name
    assert "address already in use" in runs[list(cases).index("busy port")].reason
    assert [name for name in os.listdir(storage) if name != ".mynas"] == []  # no jail made


# --- corner cases, in-process ------------------------------------------------------------------


class _Terminal:
    """Stands in for stderr on a terminal: what the progress line and summaries print."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_argument_and_setup_errors_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-numeric --trash-days, a bad --peer, a bad invite name, a storage not writable."""
    assert cli._days("3") == 3
    key = tmp_path / "k"
    identity.load_or_create(key)
    push = ["push", "--key", str(key), "--peer-key", "p", "--folder", "F", "--source", "s"]
    for args, reason in (
        (["serve", "--key", "k", "--storage", "s", "--listen", "a:1", "--trash-days", "x"], "days"),
        ([*push, "--peer", "nohost"], "no port"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
        assert reason in capsys.readouterr().err

    name = "x" * 1000
    assert main(["invite", "--key", str(key), "--name", name, "--address", "a:1"]) == 1
    assert capsys.readouterr().err.startswith("mynas invite: error:")

    monkeypatch.setattr(os, "access", lambda *_args: False)
    serve = ["serve", "--key", str(key), "--storage", str(tmp_path), "--listen", f"{HOST}:1"]
    assert main(serve) == 1
    assert "is not writable" in capsys.readouterr().err


def test_push_on_a_terminal_and_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress and warnings go to a terminal; the summary stays the last line of stdout."""
    key = tmp_path / "k"
    node, _ = identity.load_or_create(key)
    peer_key = public_key_file(tmp_path, "peer", node.public_line)
    args = ["push", "--key", str(key), "--peer", "h:1", "--peer-key", str(peer_key)]
    args += ["--folder", "F", "--source", str(tmp_path), "--index", str(tmp_path / "i.db")]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    async def fake_push(*_args: object, **kwargs: Any) -> PushResult:
        kwargs["progress"](Progress(Phase.TRANSFERRING, 1, 2, 3, 4))
        result = PushResult("F", files_total=2)
        result.add_error("a: Permission denied")
        return result

    monkeypatch.setattr(cli, "push", fake_push)
    assert main(args) == 0
    assert "transferring: 1/2 files" in terminal.text
    assert "warning: a: Permission denied" in terminal.text
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["files_total"] == 2

    async def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "push", interrupted)
    assert main(args) == 130


# --- serve: running -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_runs_until_a_signal(
    serve: Callable[..., Awaitable[Serving]],
    tmp_path: Path,
    alice_id: Identity,
    bob_id: Identity,
    mallory_id: Identity,
    signum: int,
) -> None:
    """Quotas in M, G and T; one jail per peer at <storage>/<NAME>/; a signal ends it, 0."""
    storage = tmp_path / "storage"
    storage.mkdir()
    keys = tmp_path / "pubkeys"
    keys.mkdir()
    carol_id = mallory_id
    peers = {
        "alice": (alice_id, "500M", 500 << 20),
        "bob": (bob_id, "20G", 20 * GIB),
        "carol": (carol_id, "1T", 1 << 40),
    }
    specs = [
        f"{name}={public_key_file(keys, name, who.public_line)}:{quota}"
        for name, (who, quota, _) in peers.items()
    ]
    serving = await serve(*specs, storage=storage)
    assert "Serving 3 peer(s)" in serving.log[-1]
    for name, (who, _, quota) in peers.items():
        assert (storage / name).is_dir()
        async with await client.connect(who, serving.address, serving.host_key) as link:
            assert link.welcome["peer"] == name
            assert link.welcome["quota"] == quota
            assert (await link.usage())["quota"] == quota
    async with await client.connect(alice_id, serving.address, serving.host_key) as link:
        done: list[object] = []
        await link.put(b"hello.txt", 1_700_000_000_000_000_000, 0o644, b"hi", done.append)
        await link.sync()
        assert done == [None]
        # A signal while a peer is connected: serve still stops, at once.
        assert await serving.stop(signum) == 0
    assert (storage / "alice" / "hello.txt").read_bytes() == b"hi"
    assert any("Stopping" in line for line in serving.log)
    assert not any("Traceback" in line for line in serving.log)


async def test_serve_logs_where_peers_say_they_are(
    serve: Callable[..., Awaitable[Serving]], tmp_path: Path, alice_id: Identity
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    keys = tmp_path / "pubkeys"
    keys.mkdir()
    serving = await serve(
        f"alice={public_key_file(keys, 'alice', alice_id.public_line)}:1G", storage=storage
    )
    async with await client.connect(alice_id, serving.address, serving.host_key) as link:
        await link.announce(["alice.example:8022", "[2001:db8::a]:8022"])
    assert await serving.stop() == 0
    assert any(
        "alice can be reached at alice.example:8022, [2001:db8::a]:8022 (learned" in line
        for line in serving.log
    )
    assert any("alice connected from 127.0.0.1" in line for line in serving.log)


# --- the "done when": a hostile friend with OpenSSH against serve -------------------


def _frames(stream: bytes) -> list[tuple[Frame, bytes]]:
    found = []
    while len(stream) >= 5:
        length, kind = struct.unpack_from(">IB", stream)
        found.append((Frame(kind), stream[5 : 4 + length]))
        stream = stream[4 + length :]
    return found


async def test_openssh_against_serve_gets_its_own_files_and_nothing_else(
    serve: Callable[..., Awaitable[Serving]],
    tmp_path: Path,
    alice_id: Identity,
    bob_id: Identity,
    key_file: Callable[[str], Path],
) -> None:
    """sftp lists and downloads alice's own files; leaving the jail, running a command,
    forwarding a port, writing through SFTP and passing the quota are all refused."""
    storage = tmp_path / "storage"
    storage.mkdir()
    keys = tmp_path / "pubkeys"
    keys.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    serving = await serve(
        f"alice={public_key_file(keys, 'alice', alice_id.public_line)}:64K",
        f"bob={public_key_file(keys, 'bob', bob_id.public_line)}:1G",
        storage=storage,
    )
    async with await client.connect(bob_id, serving.address, serving.host_key) as link:
        done: list[object] = []
        await link.put(b"bob.txt", 1_700_000_000_000_000_000, 0o644, b"bob's", done.append)
        await link.put(b"photos/cat.jpg", 1_700_000_000_000_000_000, 0o644, b"cat", done.append)
        await link.sync()
        assert done == [None, None]
    openssh = OpenSSH(serving.port, serving.host_key, key_file("bob"), tmp_path / "bob-ssh")
    code, out, err = await openssh.sftp_batch(["ls -l /", "get -r /photos", "get /bob.txt"])
    assert code == 0, err
    assert "bob.txt" in out
    assert (openssh.workdir / "photos" / "cat.jpg").read_bytes() == b"cat"
    assert (openssh.workdir / "bob.txt").read_bytes() == b"bob's"

    attacker = OpenSSH(serving.port, serving.host_key, key_file("alice"), tmp_path / "alice-ssh")
    (attacker.workdir / "evil.txt").write_text("evil")
    for command in (
        "get /../bob/bob.txt",
        "get ../../outside.txt",
        f"get {outside}",
        "get /.mynas/peers/bob/state.json",
        "put evil.txt /evil.txt",
        "mkdir /d",
        "ln -s / /root",
        "chmod 777 /",
    ):
        code, out, err = await attacker.sftp_batch([command])
        assert code != 0, (command, out, err)
    code, out, _ = await attacker.sftp_batch(["ls -1 /.."])
    assert code == 0
    assert "bob.txt" not in out
    code, out, err = await attacker.ssh(HOST, f"cat {outside}")
    assert code == 255
    assert b"outside" not in out
    assert "exec request failed" in err
    code, _, err = await attacker.ssh("-W", f"{HOST}:{serving.port}", HOST)
    assert code == 255
    code, _, err = await attacker.ssh(
        "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"0:{HOST}:{serving.port}", HOST
    )
    assert code == 255
    assert "remote port forwarding failed" in err
    # The replication protocol through OpenSSH itself: past the quota, out of the jail.
    frames = b"".join(
        [
            protocol.hello(),
            protocol.put(1, b"big.bin", 0, 0o644, b"x" * (100 << 10)),
            protocol.put(2, b"../bob/planted.txt", 0, 0o644, b"planted"),
            protocol.sync(3),
        ]
    )
    code, out, err = await attacker.ssh("-s", HOST, protocol.SUBSYSTEM, stdin=frames)
    answers = {protocol.request_id(body): (kind, body) for kind, body in _frames(out)[1:]}
    assert protocol.parse_fail(answers[1][1])[1]["code"] == "quota"
    assert protocol.parse_fail(answers[2][1])[1]["code"] == "path"
    assert answers[3][0] is Frame.OK
    assert sorted(os.listdir(storage / "bob")) == ["bob.txt", "photos"]
    assert os.listdir(storage / "alice") == []
    assert outside.read_text() == "outside"
    assert await serving.stop() == 0


def test_every_option_of_every_command_says_what_it_is_for() -> None:
    """``--help`` is the command line's manual: no option is listed without a text."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {action.option_strings[-1]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert len(commands.choices) == 8
    assert bare == []
