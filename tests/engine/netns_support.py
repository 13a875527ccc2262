"""Network namespaces joined by veth pairs, made for one test and removed after it (as root).

As ``scripts/bench --rtt`` does: ``ip netns add``, a veth pair between two namespaces, the
addresses a test needs. A node runs "in" a namespace when its engine loop's thread joins it
(``NetnsLoop``: a thread's network namespace is its own, and the sockets it opens, and the
worker threads it starts, stay in it). Nothing is ever sent outside these namespaces: their
only links are the veth pairs made here, and the test's sockets may connect to 127.0.0.1 and
to the addresses assigned here, nowhere else (``Namespaces.allow_connect``).
"""

from __future__ import annotations

from collections.abc import Iterator
import ipaddress
import itertools
import os
import socket
import subprocess
from typing import Any

import pytest
import pytest_socket

from custom_components.mynas.engine.loop_thread import EngineLoop
from custom_components.mynas.engine.threaded_node import ThreadedNode

_COUNTER = itertools.count(1)


def _run(*cmd: str, stdin: str | None = None) -> None:
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


class Namespaces:
    """The namespaces and veth pairs of one test; ``remove`` deletes them all."""

    def __init__(self) -> None:
        # Unique per test and process: two test runs side by side never share a name.
        self.tag = f"{os.getpid() % 10000:04d}{next(_COUNTER) % 100:02d}"
        self.names: list[str] = []
        self.addresses: set[str] = set()
        self._veths = 0

    def add(self, role: str) -> str:
        """Create a namespace (its loopback up); return its name."""
        name = f"mynas{self.tag}{role}"
        _run("ip", "netns", "add", name)
        self.names.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def ip(self, ns: str, *args: str) -> None:
        """Run ``ip`` in namespace ``ns``."""
        _run("ip", "-n", ns, *args)

    def nft(self, ns: str, rules: str) -> None:
        """Load an nftables ruleset into namespace ``ns``."""
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)

    def sysctl(self, ns: str, setting: str) -> None:
        """Set a sysctl in namespace ``ns`` (forwarding, for a router)."""
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", setting)

    def link(self, a: str, b: str) -> tuple[str, str]:
        """Join namespaces ``a`` and ``b`` by a veth pair (up); return (a's end, b's end)."""
        self._veths += 1
        end_a, end_b = f"v{self.tag}{self._veths}a", f"v{self.tag}{self._veths}b"
        _run("ip", "link", "add", end_a, "netns", a, "type", "veth", "peer", "name", end_b,
             "netns", b)  # fmt: skip
        self.ip(a, "link", "set", end_a, "up")
        self.ip(b, "link", "set", end_b, "up")
        return end_a, end_b

    def assign(self, ns: str, device: str, cidr: str) -> str:
        """Give ``device`` in ``ns`` the address ``cidr`` (no duplicate detection: at once)."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip(ns, "addr", "add", cidr, "dev", device, *extra)
        address = str(ipaddress.ip_interface(cidr).ip)
        self.addresses.add(address)
        return address

    def unassign(self, ns: str, device: str, cidr: str) -> None:
        """Take an address away from ``device`` in ``ns``."""
        self.ip(ns, "addr", "del", cidr, "dev", device)

    def remove(self) -> None:
        """Delete every namespace made here (their veth ends go with them)."""
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.names.clear()

    def allow_connect(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Let the test's sockets connect to the namespaces' addresses (and 127.0.0.1 only).

        The Home Assistant test plugin allows 127.0.0.1 alone; these addresses exist only
        inside the namespaces made here.
        """
        true_connect = pytest_socket._true_connect

        def connect(sock: socket.socket, address: Any, *args: Any) -> Any:
            host = address[0] if isinstance(address, tuple) else None
            if sock.family == socket.AF_UNIX or host == "127.0.0.1" or host in self.addresses:
                return true_connect(sock, address, *args)
            raise pytest_socket.SocketBlockedError(f"connect to {address!r} refused in tests")

        monkeypatch.setattr(socket.socket, "connect", connect)


def namespaces(monkeypatch: pytest.MonkeyPatch) -> Iterator[Namespaces]:
    """Namespaces for one test, removed at its end whatever happened (conftest's ``netns``)."""
    assert os.geteuid() == 0, "network namespace tests run as root"
    spaces = Namespaces()
    spaces.allow_connect(monkeypatch)
    try:
        yield spaces
    finally:
        spaces.remove()


class NetnsLoop(EngineLoop):
    """The engine's loop, its thread in network namespace ``ns``."""

    def __init__(self, ns: str) -> None:
        super().__init__(f"mynas-engine-{ns}")
        self.ns = ns

    def _run(self) -> None:
        fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            os.setns(fd, os.CLONE_NEWNET)
        finally:
            os.close(fd)
        super()._run()


def in_namespace(node: ThreadedNode, ns: str) -> ThreadedNode:
    """Make ``node`` (not started yet) run in namespace ``ns``."""
    node.engine = NetnsLoop(ns)
    return node


# A home behind a router, and a friend on the other side of it ("the internet").
WAN_ROUTER = "10.200.0.1"  # the home's public address
WAN_FRIEND = "10.200.0.2"  # the friend's node
LAN_ROUTER = "192.168.77.1"
LAN_HOME = "192.168.77.2"  # the home's node (the Pi)
PORT = 8022


class Home:
    """Namespaces ``home`` (the Pi) behind ``router`` (NAT), and ``friend`` outside.

    The friend has no route into the LAN: it reaches the home only at the router's public
    address, and only what the router forwards (``forward``) gets through.
    """

    def __init__(self, spaces: Namespaces) -> None:
        self.spaces = spaces
        self.home, self.router, self.friend = spaces.add("h"), spaces.add("r"), spaces.add("f")
        lan_home, lan_router = spaces.link(self.home, self.router)
        wan_router, wan_friend = spaces.link(self.router, self.friend)
        spaces.assign(self.home, lan_home, f"{LAN_HOME}/24")
        spaces.assign(self.router, lan_router, f"{LAN_ROUTER}/24")
        spaces.assign(self.router, wan_router, f"{WAN_ROUTER}/24")
        spaces.assign(self.friend, wan_friend, f"{WAN_FRIEND}/24")
        spaces.ip(self.home, "route", "add", "default", "via", LAN_ROUTER)
        spaces.sysctl(self.router, "net.ipv4.ip_forward=1")
        self.wan = wan_router
        self.closed()

    def _rules(self, prerouting: str, input_wan: str) -> None:
        self.spaces.nft(
            self.router,
            f"""flush ruleset
table ip home {{
  chain prerouting {{ type nat hook prerouting priority -100; {prerouting} }}
  chain postrouting {{ type nat hook postrouting priority 100; oifname "{self.wan}" masquerade; }}
  chain input {{ type filter hook input priority 0; {input_wan} }}
}}
""",
        )

    def closed(self) -> None:
        """A router that forwards nothing: its public port answers "refused"."""
        self._rules("", "")

    def forward(self) -> None:
        """The port forwarded to the Pi, as the README tells the user to do."""
        self._rules(f'iifname "{self.wan}" tcp dport {PORT} dnat to {LAN_HOME}:{PORT};', "")

    def no_inbound(self) -> None:
        """Carrier-grade NAT: nothing from outside gets in, not even a "refused"."""
        self._rules("", f'iifname "{self.wan}" ct state new drop;')
