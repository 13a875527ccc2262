"""A real NAT-PMP router: Debian's miniupnpd (nftables), run in a network namespace.

Three namespaces, made by the test and removed after it: ``home`` (the Pi, its default
route through the router), ``router`` (miniupnpd: NAT-PMP on, UPnP off, its rules in an
nftables table of its own) and ``wan`` (the internet side, where a friend dials the
router's public address). miniupnpd maps ports only when its external interface has a
public address (behind a reserved one it answers "network failure"), so the router's WAN
side gets ``WAN_ROUTER``, an address that exists only inside these namespaces: their only
links are the veth pairs made here, and nothing is ever sent to it elsewhere.

What the router did is read from the router itself: its DNAT rules (``redirects``, as
``nft`` lists them) and its lease file (``leases``: each mapping and when it expires).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import time
from typing import Any

import pytest

from .netns_support import Namespaces, NetnsLoop

LAN_ROUTER = "192.168.78.1"
LAN_HOME = "192.168.78.2"
# Public to miniupnpd (and to Python's ``is_global``), reachable only inside the namespaces.
WAN_ROUTER = "192.0.3.7"
WAN_FRIEND = "192.0.3.8"
# An address miniupnpd calls reserved: the router behind another NAT (or CGNAT).
WAN_PRIVATE = "10.203.0.7"
PORT = 8022

# The chains miniupnpd 2.3 (nftables) writes its rules into: table inet filter, made
# before it starts (Debian ships the script that would, without the file it sources).
RULESET = """flush ruleset
table inet filter {
  chain miniupnpd { }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd; }
}
"""


def miniupnpd() -> str:
    """miniupnpd's path; the test fails (never skips) when it is missing."""
    found = shutil.which("miniupnpd") or shutil.which("miniupnpd", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            "miniupnpd is not installed: scripts/setup installs it "
            "(apt-get install miniupnpd-nftables)"
        )
    return found


class Router:
    """miniupnpd as the home's router; ``start`` runs it, ``stop`` ends it."""

    def __init__(self, spaces: Namespaces, workdir: Path, *, wan_address: str = WAN_ROUTER):
        self.spaces = spaces
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home, self.router, self.wan = spaces.add("h"), spaces.add("r"), spaces.add("w")
        lan_home, lan_router = spaces.link(self.home, self.router)
        self.wan_if, wan_friend = spaces.link(self.router, self.wan)
        self.lan_if = lan_router
        spaces.assign(self.home, lan_home, f"{LAN_HOME}/24")
        spaces.assign(self.router, lan_router, f"{LAN_ROUTER}/24")
        spaces.assign(self.router, self.wan_if, f"{wan_address}/24")
        spaces.assign(self.wan, wan_friend, f"{WAN_FRIEND}/24")
        spaces.ip(self.home, "route", "add", "default", "via", LAN_ROUTER)
        spaces.sysctl(self.router, "net.ipv4.ip_forward=1")
        spaces.nft(self.router, RULESET)
        self.leases_file = self.dir / "leases"
        self.pid_file = self.dir / "miniupnpd.pid"

    def config(self, *, rules: tuple[str, ...] = (), min_lifetime: int = 2) -> Path:
        """miniupnpd's configuration: NAT-PMP only, secure mode, ``rules`` before ours."""
        config = self.dir / "miniupnpd.conf"
        lines = [
            f"ext_ifname={self.wan_if}",
            f"listening_ip={self.lan_if}",
            "enable_natpmp=yes",
            "enable_upnp=no",
            "secure_mode=yes",
            "system_uptime=yes",
            f"min_lifetime={min_lifetime}",
            f"lease_file={self.leases_file}",
            "uuid=3a6f6c6e-0000-4000-8000-000000000001",
            *rules,
            "allow 1024-65535 192.168.78.0/24 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, **config: Any) -> None:
        """Run miniupnpd until it listens for NAT-PMP.

        As a daemon, as routers run it: in the foreground (``-d``) it logs every port it
        tries, and takes over a minute to refuse a port that no rule allows.
        """
        self.pid_file.unlink(missing_ok=True)
        command = ["ip", "netns", "exec", self.router, miniupnpd(),
                   "-f", str(self.config(**config)), "-P", str(self.pid_file)]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=10)
        deadline = time.monotonic() + 10
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError("miniupnpd did not start listening on port 5351")
            time.sleep(0.02)

    def _listening(self) -> bool:
        if not self.pid_file.exists():
            return False
        sockets = subprocess.run(
            ["ip", "netns", "exec", self.router, "ss", "-Hlun", "sport", "=", ":5351"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return bool(sockets.strip())

    def stop(self) -> None:
        """End the miniupnpd started here (by its pid; it removes what it mapped)."""
        if not self.pid_file.exists():
            return
        pid = int(self.pid_file.read_text().strip())
        self.pid_file.unlink()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def redirects(self) -> list[tuple[int, str, int]]:
        """The router's port forwards, as nftables holds them: (external port, host, port)."""
        listing = subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "list", "chain", "inet", "filter",
             "prerouting_miniupnpd"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [
            (int(external), host, int(port))
            for external, host, port in re.findall(
                r"dport (\d+) dnat ip to ([\d.]+):(\d+)", listing
            )
        ]

    def leases(self) -> list[list[str]]:
        """miniupnpd's lease file: protocol, external port, host, port, expiry, description."""
        if not self.leases_file.exists():
            return []
        return [line.split(":", 5) for line in self.leases_file.read_text().splitlines()]

    def drop_nat_pmp(self) -> None:
        """The router drops NAT-PMP requests silently, counting them (``dropped``)."""
        self.spaces.nft(
            self.router,
            "table inet quiet {\n  chain input { type filter hook input priority -10; "
            "udp dport 5351 counter drop; }\n}\n",
        )

    def dropped(self) -> int:
        """How many NAT-PMP requests ``drop_nat_pmp`` dropped."""
        listing = subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "list", "table", "inet", "quiet"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        found = re.search(r"counter packets (\d+)", listing)
        assert found is not None, listing
        return int(found.group(1))


class InNamespace:
    """Coroutines run in a namespace (on a loop whose thread joined it)."""

    def __init__(self, ns: str) -> None:
        self.loop = NetnsLoop(ns)
        self.loop.start()

    async def run[T](self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` there; return its result."""
        return await self.loop.run(coro)

    def close(self) -> None:
        """Stop the loop's thread."""
        self.loop.stop()


async def banner(host: str, port: int) -> bytes:
    """The first line a TCP server at ``host:port`` sends (an SSH server: its banner)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
