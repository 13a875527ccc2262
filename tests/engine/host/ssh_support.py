"""asyncssh connections to a live NodeServer, as a hostile or careless peer would open them.

``connected`` is how a test holds one: the host key pinned, only the key given offered, and
the connection closed (and its close waited for) on the way out, whatever happened inside.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import contextlib
from typing import Any

import asyncssh

from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity, pinned_login

from ..openssh_support import HOST


async def ssh_connect(
    server: NodeServer,
    who: Identity | None,
    *,
    username: str = "mynas",
    **options: Any,
) -> asyncssh.SSHClientConnection:
    """An asyncssh connection with ``who``'s key, the host key pinned, nothing else offered."""
    pinned = asyncssh.import_public_key(server.identity.public_line)
    settings = {**pinned_login(pinned, who), "username": username, **options}
    return await asyncssh.connect(HOST, server.port, **settings)


@contextlib.asynccontextmanager
async def connected(
    server: NodeServer,
    who: Identity | None,
    *,
    username: str = "mynas",
    **options: Any,
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """``ssh_connect``, closed and waited for on the way out (the server sees it gone)."""
    async with await ssh_connect(server, who, username=username, **options) as conn:
        yield conn


@contextlib.asynccontextmanager
async def sftp_session(
    server: NodeServer, who: Identity | None, **options: Any
) -> AsyncIterator[asyncssh.SFTPClient]:
    """An SFTP client on a ``connected`` connection, exited and waited for on success."""
    async with connected(server, who, **options) as conn:
        sftp = await conn.start_sftp_client()
        yield sftp
        sftp.exit()
        await sftp.wait_closed()
