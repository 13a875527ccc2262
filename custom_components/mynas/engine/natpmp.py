"""Open the node's port on the household's router with NAT-PMP (RFC 6886), and keep it open.

Routers that do not answer UPnP often answer NAT-PMP: Apple's, many ISP boxes, anything
running miniupnpd with NAT-PMP/PCP on. The protocol is a few UDP datagrams to the default
gateway's port 5351: "what is your external address?" (opcode 0) and "map this TCP port to
me for so many seconds" (opcode 2; a lifetime of 0 deletes the mapping). Each request is
sent again after 250 ms, then after twice as long each time, a few times only (the RFC
allows about a minute; a router that has not answered within a few seconds is not there).

``NatPmpMapper`` asks for the mapping (again: a renewal, at half the lifetime the router
granted, driven by ``portmap.RouterMapper``) and deletes it on ``stop``; its ``state`` is a
``upnp.MapState`` like UPnP's: ``mapped`` (with the router's external address and the
external port it gave us), ``refused`` (the router said no: not authorized, no public
address, no mapping left) or ``no_router`` (no default gateway, nothing answers on port
5351, or what answers speaks no NAT-PMP). Nothing is sent anywhere but to the gateway.

Each renewal asks for the external address again and for the mapping again, so a router
that restarted (its epoch starts over) or got a new address is caught up with at the next
renewal; the router's own announcements (multicast to port 5350) are not listened to.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import KW_ONLY, dataclass, field, replace
import enum
import ipaddress
import logging
from pathlib import Path
import socket
import struct
import time

from .invite import format_address
from .upnp import MapState, MapStatus

_LOGGER = logging.getLogger(__name__)

PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_TCP = 2
# A reply's opcode is the request's plus 128.
_REPLY = 128
# The lifetime asked for (RFC 6886 recommends two hours); the router may grant less.
LIFETIME = 7200
# The first wait for an answer, doubled after each try (RFC 6886 section 3.1).
FIRST_WAIT = 0.25
# Tries per request: 0.25 + 0.5 + 1 + 2 s, under 4 s in all.
TRIES = 4
# Where requests go when no gateway is given: None, the default gateway of the routing
# table. (Tests set 127.0.0.1, so that no request ever leaves the machine.)
DEFAULT_GATEWAY: str | None = None
# The routing table of this thread's network namespace first (the same as the process's,
# except in a thread that joined another namespace), then the process's.
ROUTE_FILES = (Path("/proc/thread-self/net/route"), Path("/proc/net/route"))
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2


class Result(enum.IntEnum):
    """A NAT-PMP result code (RFC 6886 section 3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


# What each refusal means for the user (the sensor's ``error`` attribute).
RESULT_TEXT = {
    Result.UNSUPPORTED_VERSION: "the router does not speak this NAT-PMP version (PCP only?)",
    Result.NOT_AUTHORIZED: (
        "the router refused (NAT-PMP: not authorized; port mapping is off on the router, "
        "or not allowed for this machine or port)"
    ),
    Result.NETWORK_FAILURE: (
        "the router has no public address to map on (NAT-PMP: network failure; it is not "
        "connected, or sits behind another router or carrier-grade NAT)"
    ),
    Result.OUT_OF_RESOURCES: "the router has no port mapping left (NAT-PMP: out of resources)",
    Result.UNSUPPORTED_OPCODE: "the router does not map ports (NAT-PMP: unsupported opcode)",
}
# Answers that mean "no NAT-PMP router here" rather than "a router that says no".
NOT_NAT_PMP = (Result.UNSUPPORTED_VERSION, Result.UNSUPPORTED_OPCODE)


class NatPmpError(Exception):
    """The router answered with a result code other than success."""

    def __init__(self, code: int) -> None:
        """``code``: the result code the router sent."""
        self.code = code
        try:
            self.result: Result | None = Result(code)
        except ValueError:
            self.result = None
        text = RESULT_TEXT.get(self.result) if self.result is not None else None
        super().__init__(text or f"the router refused (NAT-PMP result code {code})")


class NoAnswer(Exception):
    """Nothing answered NAT-PMP at the gateway (silence, or its port is closed)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A mapping the router granted (a lifetime of 0: it deleted one)."""

    internal_port: int
    external_port: int
    lifetime: int
    epoch: int  # seconds since the router's NAT-PMP state began (it restarts at reboot)


def default_gateway(route_files: tuple[Path, ...] = ROUTE_FILES) -> str | None:
    """The IPv4 default gateway of the routing table (``/proc/net/route``), or None."""
    for route_file in route_files:
        try:
            lines = route_file.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[1] != "00000000":
                continue
            flags = int(fields[3], 16)
            if flags & _RTF_UP and flags & _RTF_GATEWAY:
                # The kernel writes the address as a number in host (little-endian) order.
                return str(ipaddress.IPv4Address(int(fields[2], 16).to_bytes(4, "little")))
        return None
    return None


class _Replies(asyncio.DatagramProtocol):
    """Keeps the first well-formed reply to one request (the socket is the gateway's)."""

    def __init__(self, opcode: int) -> None:
        self.opcode = opcode
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if (
            len(data) >= 8
            and data[0] == VERSION
            and data[1] == _REPLY + self.opcode
            and not self.reply.done()
        ):
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" from the gateway: nothing serves NAT-PMP there.
        if not self.reply.done():
            self.reply.set_exception(NoAnswer(f"nothing answers NAT-PMP ({exc})"))


@dataclass(frozen=True, slots=True)
class NatPmpClient:
    """The requests of RFC 6886, to one gateway."""

    gateway: str
    port: int = PORT
    first_wait: float = FIRST_WAIT
    tries: int = TRIES

    async def ask(self, request: bytes) -> tuple[bytes, str]:
        """Send ``request`` until the gateway answers it; (the reply, our address to it).

        Raises ``NoAnswer`` when nothing answers, ``NatPmpError`` on a result code other
        than success.
        """
        loop = asyncio.get_running_loop()
        replies = _Replies(request[1])
        transport, _ = await loop.create_datagram_endpoint(
            lambda: replies, remote_addr=(self.gateway, self.port), family=socket.AF_INET
        )
        try:
            ours = str(transport.get_extra_info("sockname")[0])
            wait = self.first_wait
            for _ in range(self.tries):
                transport.sendto(request)
                with contextlib.suppress(TimeoutError):
                    reply = await asyncio.wait_for(asyncio.shield(replies.reply), wait)
                    break
                wait *= 2
            else:
                raise NoAnswer(f"no NAT-PMP answer from {self.gateway} in {self._total():.2g} s")
        finally:
            transport.close()
            if replies.reply.done() and not replies.reply.cancelled():
                replies.reply.exception()  # an ICMP error seen after we stopped waiting
        (code,) = struct.unpack_from("!H", reply, 2)
        if code != Result.SUCCESS:
            raise NatPmpError(code)
        return reply, ours

    def _total(self) -> float:
        return float(sum(self.first_wait * 2**i for i in range(self.tries)))

    async def external_address(self) -> tuple[str, str]:
        """(The router's external IPv4 address, our address on the way to the router)."""
        reply, ours = await self.ask(struct.pack("!BB", VERSION, OP_EXTERNAL_ADDRESS))
        if len(reply) < 12:
            raise NoAnswer("a NAT-PMP reply too short to hold an address")
        return str(ipaddress.IPv4Address(reply[8:12])), ours

    async def map_tcp(self, internal_port: int, external_port: int, lifetime: int) -> Mapping:
        """Ask for (or renew; lifetime 0: delete) the mapping of our TCP ``internal_port``."""
        request = struct.pack(
            "!BBHHHI", VERSION, OP_MAP_TCP, 0, internal_port, external_port, lifetime
        )
        reply, _ = await self.ask(request)
        if len(reply) < 16:
            raise NoAnswer("a NAT-PMP reply too short to hold a mapping")
        epoch, internal, external, granted = struct.unpack_from("!IHHI", reply, 4)
        return Mapping(internal, external, granted, epoch)


@dataclass(eq=False)
class NatPmpMapper:
    """Our TCP ``port`` mapped by the router over NAT-PMP (``external_port``: the one asked).

    ``gateway`` skips the routing table (the router's address); ``nat_pmp_port``,
    ``first_wait`` and ``tries`` shape the requests (tests).
    """

    port: int
    _: KW_ONLY
    external_port: int = 0
    lifetime: int = LIFETIME
    gateway: str | None = None
    nat_pmp_port: int = PORT
    first_wait: float = FIRST_WAIT
    tries: int = TRIES
    state: MapState = field(default_factory=MapState, init=False)
    _client: NatPmpClient | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.external_port = self.external_port or self.port

    async def map_once(self) -> MapState:
        """Ask the gateway for its address and for the mapping (again: a renewal)."""
        gateway = self.gateway or DEFAULT_GATEWAY or default_gateway()
        if gateway is None:
            return self._set(MapState(MapStatus.NO_ROUTER, error="no default gateway"))
        client = NatPmpClient(gateway, self.nat_pmp_port, self.first_wait, self.tries)
        self._client = client
        try:
            external_ip, lan = await client.external_address()
            # A renewal asks for the external port the router gave last time (RFC 6886 3.3).
            asked = self._granted_port() or self.external_port
            mapping = await client.map_tcp(self.port, asked, self.lifetime)
        except NoAnswer as err:
            return self._set(MapState(MapStatus.NO_ROUTER, router=gateway, error=str(err)))
        except NatPmpError as err:
            status = MapStatus.NO_ROUTER if err.result in NOT_NAT_PMP else MapStatus.REFUSED
            return self._set(MapState(status, router=gateway, error=str(err)))
        except OSError as err:
            return self._set(
                MapState(MapStatus.NO_ROUTER, router=gateway, error=f"router unreachable: {err}")
            )
        if mapping.lifetime == 0:
            return self._set(
                MapState(MapStatus.REFUSED, router=gateway, lan_address=lan, error="lifetime 0")
            )
        ip = ipaddress.IPv4Address(external_ip)
        return self._set(
            MapState(
                MapStatus.MAPPED,
                external_address=(
                    None if ip.is_unspecified else format_address(str(ip), mapping.external_port)
                ),
                router=gateway,
                lan_address=lan,
                lease=mapping.lifetime,
                renewed_at=time.time(),
            )
        )

    def _granted_port(self) -> int | None:
        external = self.state.external_address
        if self.state.status is not MapStatus.MAPPED or external is None:
            return None
        return int(external.rsplit(":", 1)[1])

    async def stop(self) -> None:
        """Delete the mapping on the router (if we made one): lifetime 0, external port 0."""
        client = self._client
        if self.state.status is MapStatus.MAPPED and client is not None:
            try:
                await client.map_tcp(self.port, 0, 0)
            except (NoAnswer, NatPmpError, OSError) as err:
                _LOGGER.info("Could not remove the NAT-PMP port mapping: %s", err)
            self._set(replace(self.state, status=MapStatus.PENDING, renewed_at=None))

    def _set(self, state: MapState) -> MapState:
        if state.status != self.state.status:
            _LOGGER.info("NAT-PMP port mapping: %s", state.status)
        self.state = state
        return state
