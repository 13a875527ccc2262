"""What the server relies on in asyncssh beyond its public API, pinned (server._Session).

asyncssh runs its SFTP server only inside its own session classes, and its public ways to
use them (``process_factory``, ``session_factory`` on ``create_server``) accept shell and
exec requests, bypass ``session_requested`` and give no hook for SFTP back-pressure. So
``_Session`` subclasses the unexported ``asyncssh.stream.SSHServerStreamSession``. These
tests fail, naming what changed, if an asyncssh upgrade moves any of it; the attack suite
then says whether the server still holds.
"""

from __future__ import annotations

import inspect
from typing import Any

import asyncssh
from asyncssh.stream import SSHServerStreamSession
import pytest

from custom_components.mynas.engine import protocol
from custom_components.mynas.engine.host import server as server_module
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity

from .ssh_support import connected


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_stream_session_is_where_and_what_the_server_expects() -> None:
    """The class, its constructor's keywords, and the read/drain that SSHReader calls."""
    assert issubclass(SSHServerStreamSession, asyncssh.SSHServerSession)
    assert issubclass(server_module._Session, SSHServerStreamSession)
    assert _parameters(SSHServerStreamSession.__init__) == [
        "self",
        "session_factory",
        "sftp_factory",
        "sftp_version",
        "allow_scp",
    ]
    assert _parameters(SSHServerStreamSession.read) == ["self", "datatype", "n", "exact"]
    assert _parameters(SSHServerStreamSession.drain) == ["self", "datatype"]
    assert inspect.iscoroutinefunction(SSHServerStreamSession.read)
    assert inspect.iscoroutinefunction(SSHServerStreamSession.drain)
    # The callbacks overridden are SSHServerSession's public ones.
    for name in ("connection_lost", "shell_requested", "exec_requested", "pty_requested"):
        assert hasattr(asyncssh.SSHServerSession, name), name
    assert hasattr(asyncssh.SSHServerSession, "subsystem_requested")


async def test_both_subsystems_read_through_the_session(
    server: NodeServer, alice_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSHReader reads of SFTP and replication go through ``_Session.read``; SFTP drains first.

    If asyncssh read its buffers some other way, SFTP answers would pile up unbounded for a
    peer that never reads them (test_an_sftp_peer_that_never_reads_is_held_to_a_bounded_buffer).
    """
    reads: list[tuple[bool, bool]] = []
    drains: list[bool] = []
    real_read = server_module._Session.read
    real_drain = SSHServerStreamSession.drain

    async def read(self: Any, datatype: int | None, n: int = -1, exact: bool = False) -> bytes:
        reads.append((self._sftp, exact))
        return await real_read(self, datatype, n, exact)

    async def drain(self: Any, datatype: int | None) -> None:
        drains.append(self._sftp)
        await real_drain(self, datatype)

    monkeypatch.setattr(server_module._Session, "read", read)
    monkeypatch.setattr(server_module._Session, "drain", drain)
    async with connected(server, alice_id) as conn:
        sftp = await conn.start_sftp_client()
        assert await sftp.listdir("/") == [".", ".."]
        sftp.exit()
        await sftp.wait_closed()
        assert (True, True) in reads  # SFTP packets: readexactly
        assert True in drains
        reads.clear()
        writer, reader, _ = await conn.open_session(subsystem=protocol.SUBSYSTEM, encoding=None)
        writer.write(protocol.hello())
        kind, _ = await protocol.read_frame(reader)
        assert kind is protocol.Frame.WELCOME
        writer.write_eof()
        await writer.channel.wait_closed()
    assert reads
    assert not any(sftp for sftp, _ in reads)  # replication: no drain before each read


async def test_each_subsystem_starts_the_handler_it_was_given(
    server: NodeServer, alice_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``session_factory(stdin, stdout, stderr)`` for mynas@1, ``sftp_factory(chan)`` for sftp."""
    started: list[tuple[str, tuple[type, ...]]] = []
    real_init = server_module._Session.__init__

    def init(self: Any, replicate: Any, sftp: Any, on_close: Any) -> None:
        async def spy_replicate(*streams: Any) -> None:
            started.append(("replicate", tuple(type(stream) for stream in streams)))
            await replicate(*streams)

        def spy_sftp(chan: Any) -> Any:
            started.append(("sftp", (type(chan),)))
            return sftp(chan)

        real_init(self, spy_replicate, spy_sftp, on_close)

    monkeypatch.setattr(server_module._Session, "__init__", init)
    async with connected(server, alice_id) as conn:
        sftp = await conn.start_sftp_client()
        sftp.exit()
        await sftp.wait_closed()
        writer, _, _ = await conn.open_session(subsystem=protocol.SUBSYSTEM, encoding=None)
        writer.write_eof()
        await writer.channel.wait_closed()
    assert started == [
        ("sftp", (asyncssh.SSHServerChannel,)),
        ("replicate", (asyncssh.SSHReader, asyncssh.SSHWriter, asyncssh.SSHWriter)),
    ]
