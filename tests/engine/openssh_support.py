"""OpenSSH's own ``ssh`` and ``sftp`` as a (hostile) friend runs them against a MyNAS node.

Nothing of the user's ``~/.ssh`` is consulted: no config file, no agent (unless a test sets
one), only the given key, and the node's host key pinned in a known_hosts file of its own.
Each program runs with ``asyncio.create_subprocess_exec``, so the server under test, in the
same event loop, keeps running.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from custom_components.mynas.engine.host.server import NodeServer

HOST = "127.0.0.1"


class OpenSSH:
    """Runs ``ssh`` and ``sftp`` with one key against the node at 127.0.0.1:``port``."""

    def __init__(self, port: int, host_key: str, key: Path, workdir: Path) -> None:
        """Pin ``host_key`` (a public key line) for the node; log in with private ``key``."""
        self.port = port
        self.key = key
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text(f"[{HOST}]:{port} {host_key}\n")

    @classmethod
    def for_server(cls, server: NodeServer, key: Path, workdir: Path) -> OpenSSH:
        """Aim at a NodeServer running in this process."""
        return cls(server.port, server.identity.public_line, key, workdir)

    def options(self) -> list[str]:
        """The options every invocation gets (the port flag aside)."""
        return [
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            "ConnectTimeout=10",
            "-i",
            str(self.key),
        ]

    async def run(
        self,
        program: str,
        *args: str,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, bytes, str]:
        """Run ``ssh`` or ``sftp``; return (exit status, stdout, stderr)."""
        port_flag = "-P" if program == "sftp" else "-p"
        environment = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK",)}
        environment.pop("DISPLAY", None)
        environment.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            program,
            *self.options(),
            port_flag,
            str(self.port),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.workdir,
            env=environment,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out, err.decode(errors="replace")

    async def ssh(self, *args: str, **kwargs: Any) -> tuple[int, bytes, str]:
        """Run ``ssh`` with these arguments."""
        return await self.run("ssh", *args, **kwargs)

    async def sftp_batch(self, commands: list[str], user: str = "anyone") -> tuple[int, str, str]:
        """Run ``sftp -b`` with these commands (it stops at the first one that fails)."""
        batch = self.workdir / "batch"
        batch.write_text("\n".join(commands) + "\n")
        code, out, err = await self.run("sftp", "-b", str(batch), f"{user}@{HOST}")
        return code, out.decode(errors="replace"), err
