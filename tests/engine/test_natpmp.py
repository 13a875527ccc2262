"""NAT-PMP port mapping against a real router: miniupnpd in a network namespace.

The node's side runs in the ``home`` namespace, whose default route goes through the
``router`` namespace where miniupnpd answers NAT-PMP (UPnP off); a friend in the ``wan``
namespace dials the router's public address, and gets through only when the mapping is
there. What the router did is read from nftables and from miniupnpd's lease file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
import contextlib
from pathlib import Path
import socket
import struct
import time

import pytest

from custom_components.mynas.engine import natpmp
from custom_components.mynas.engine.natpmp import (
    NatPmpClient,
    NatPmpError,
    NatPmpMapper,
    Result,
    default_gateway,
)
from custom_components.mynas.engine.portmap import RouterMapper
from custom_components.mynas.engine.upnp import MapState, MapStatus, PortMapper

from .conftest import wait_until
from .friends_support import friend
from .igd_support import WanIpConnection, router as igd
from .natpmp_support import (
    LAN_HOME,
    LAN_ROUTER,
    PORT,
    WAN_PRIVATE,
    WAN_ROUTER,
    InNamespace,
    Router,
    banner,
)
from .netns_support import Namespaces, in_namespace
from .test_upnp import free_port

BANNER = b"SSH-2.0-home\r\n"


@pytest.fixture(autouse=True)
def _gateway_from_the_routing_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Here the node's side runs in the home namespace: its default gateway is the router."""
    monkeypatch.setattr(natpmp, "DEFAULT_GATEWAY", None)


@pytest.fixture
def router(netns: Namespaces, tmp_path: Path) -> Iterator[Router]:
    """The home, its router (miniupnpd not started yet) and the internet side."""
    made = Router(netns, tmp_path / "router")
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def home(router: Router) -> Iterator[InNamespace]:
    """Coroutines run on the home's side (the Pi)."""
    side = InNamespace(router.home)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
def wan(router: Router) -> Iterator[InNamespace]:
    """Coroutines run on the internet side (a friend)."""
    side = InNamespace(router.wan)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
async def listening(home: InNamespace) -> AsyncIterator[None]:
    """A server on the Pi's port that says hello (what a friend reaches when mapped)."""

    async def hello(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await writer.drain()
        writer.close()

    async def serve() -> asyncio.Server:
        return await asyncio.start_server(hello, "0.0.0.0", PORT)

    async def close(server: asyncio.Server) -> None:
        server.close()
        await server.wait_closed()

    server = await home.run(serve())
    try:
        yield
    finally:
        await home.run(close(server))


def no_upnp() -> PortMapper:
    """A UPnP mapper whose search finds nothing (the home's own loopback, a closed port)."""
    return PortMapper(PORT, search_target=("127.0.0.1", free_port()), search_seconds=1)


async def test_the_mapping_is_made_renewed_and_removed(
    router: Router, home: InNamespace, wan: InNamespace, listening: None
) -> None:
    router.start()
    changes: list[MapState] = []
    mapper = RouterMapper(no_upnp(), NatPmpMapper(PORT, lifetime=2), on_change=changes.append)
    await home.run(_start(mapper))
    try:
        await wait_until(lambda: mapper.state.status is MapStatus.MAPPED, "the mapping")
        state = mapper.state
        assert state.protocol == "natpmp"
        assert state.external_address == f"{WAN_ROUTER}:{PORT}"  # read with opcode 0
        assert state.public == f"{WAN_ROUTER}:{PORT}"  # what the node announces
        assert state.lan_address == LAN_HOME
        assert state.router == LAN_ROUTER  # from the home's routing table
        assert state.lease == 2
        assert state.as_dict()["protocol"] == "natpmp"
        # The router forwards its public port to the Pi: a friend outside gets through.
        assert router.redirects() == [(PORT, LAN_HOME, PORT)]
        [lease] = router.leases()
        assert lease[:4] == ["TCP", str(PORT), LAN_HOME, str(PORT)]
        assert await wan.run(banner(WAN_ROUTER, PORT)) == BANNER
        # Renewed at half the lifetime granted (1 s): the router moves the expiry on.
        first, expiry = state.renewed_at, int(lease[4])
        await wait_until(lambda: int(router.leases()[0][4]) >= expiry + 2, "two renewals")
        assert mapper.state.renewed_at != first
        assert mapper.state.status is MapStatus.MAPPED
    finally:
        await home.run(mapper.stop())
    # Deleted on stop (lifetime 0), not left to expire: nothing forwards any more.
    assert router.redirects() == []
    assert router.leases() == []
    stopped = mapper.state
    assert stopped.status is MapStatus.PENDING
    assert [change.status for change in changes][:1] == [MapStatus.MAPPED]
    with pytest.raises(OSError):
        await wan.run(banner(WAN_ROUTER, PORT))


async def _start(mapper: RouterMapper) -> None:
    mapper.start()


async def test_upnp_is_asked_first_and_nat_pmp_when_upnp_says_no(
    router: Router, home: InNamespace
) -> None:
    """A router that speaks both: UPnP maps the port; when it refuses, NAT-PMP does."""
    router.start()
    ssdp, http = free_port(socket.SOCK_DGRAM), free_port()
    stack = contextlib.AsyncExitStack()
    # The IGD on the home's own loopback (a UPnP router the home's side finds by search).
    await home.run(stack.enter_async_context(igd(http, ssdp)))
    try:
        upnp = PortMapper(PORT, search_target=("127.0.0.1", ssdp), search_seconds=1)
        mapper = RouterMapper(upnp, NatPmpMapper(PORT))
        state = await home.run(mapper.map_once())
        assert (state.status, state.protocol) == (MapStatus.MAPPED, "upnp")
        assert WanIpConnection.mappings[("TCP", PORT)]["internal_port"] == PORT
        assert router.redirects() == []  # NAT-PMP was not asked
        # The UPnP router now refuses (another machine took the port): NAT-PMP maps it.
        WanIpConnection.refuse = 718
        state = await home.run(mapper.map_once())
        assert (state.status, state.protocol) == (MapStatus.MAPPED, "natpmp")
        assert state.external_address == f"{WAN_ROUTER}:{PORT}"
        assert router.redirects() == [(PORT, LAN_HOME, PORT)]
        # Renewals go where the mapping is: NAT-PMP alone.
        calls = len(WanIpConnection.calls)
        state = await home.run(mapper.map_once())
        assert (state.status, state.protocol) == (MapStatus.MAPPED, "natpmp")
        assert len(WanIpConnection.calls) == calls
        await home.run(mapper.stop())
        assert router.redirects() == []
    finally:
        await home.run(stack.aclose())


async def test_a_router_that_gives_another_port_or_says_no(
    router: Router, home: InNamespace
) -> None:
    # The port asked for is not allowed: the router maps another one, and that is the one
    # friends are told.
    router.start(rules=(f"deny {PORT} {LAN_HOME}/32 {PORT}",))
    mapper = NatPmpMapper(PORT)
    state = await home.run(mapper.map_once())
    assert state.status is MapStatus.MAPPED
    other = int((state.external_address or "").rsplit(":", 1)[1])
    assert other != PORT
    assert router.redirects() == [(other, LAN_HOME, PORT)]
    await home.run(mapper.stop())
    assert router.redirects() == []
    router.stop()

    # Not allowed for this machine's port at all: refused.
    router.start(rules=(f"deny 0-65535 {LAN_HOME}/32 {PORT}",))
    combined = RouterMapper(no_upnp(), NatPmpMapper(PORT))
    state = await home.run(combined.map_once())
    assert state.status is MapStatus.REFUSED
    assert state.protocol == "natpmp"
    assert "not authorized" in (state.error or "")
    assert router.redirects() == []
    await home.run(combined.stop())


async def test_a_router_gone_before_the_mapping_is_deleted(
    router: Router, home: InNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    router.start()
    mapper = NatPmpMapper(PORT)
    assert (await home.run(mapper.map_once())).status is MapStatus.MAPPED
    router.stop()
    await home.run(mapper.stop())  # nothing answers the deletion: said, not raised
    assert mapper.state.status is MapStatus.PENDING
    assert "Could not remove the NAT-PMP port mapping" in caplog.text


async def test_a_router_behind_another_nat(
    netns: Namespaces, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own WAN address is private: it cannot forward anything from the internet."""
    behind = Router(netns, tmp_path / "router", wan_address=WAN_PRIVATE)
    home = InNamespace(behind.home)
    try:
        behind.start()
        state = await home.run(NatPmpMapper(PORT).map_once())
    finally:
        home.close()
        behind.stop()
    assert state.status is MapStatus.REFUSED
    assert "no public address" in (state.error or "")
    assert "network failure" in (state.error or "")


async def test_what_answers_but_speaks_no_nat_pmp(router: Router, home: InNamespace) -> None:
    router.start()
    client = NatPmpClient(LAN_ROUTER)
    with pytest.raises(NatPmpError) as caught:
        await home.run(client.ask(struct.pack("!BB", 0, 99)))  # no such opcode
    assert caught.value.result is Result.UNSUPPORTED_OPCODE
    assert "unsupported opcode" in str(caught.value)
    # Read as "no NAT-PMP router" (nothing here maps ports for us), not as a refusal; so
    # is "unsupported version" (a PCP-only router's answer; miniupnpd speaks both).
    assert caught.value.result in natpmp.NOT_NAT_PMP
    assert NatPmpError(1).result is Result.UNSUPPORTED_VERSION
    assert NatPmpError(1).result in natpmp.NOT_NAT_PMP
    assert NatPmpError(99).result is None
    assert "result code 99" in str(NatPmpError(99))


async def test_no_router(router: Router, home: InNamespace, netns: Namespaces) -> None:
    # A gateway where nothing serves NAT-PMP answers "port unreachable": no waiting.
    started = time.monotonic()
    state = await home.run(RouterMapper(no_upnp(), NatPmpMapper(PORT)).map_once())
    assert state.status is MapStatus.NO_ROUTER
    assert "upnp: " in (state.error or "")
    assert "natpmp: nothing answers NAT-PMP" in (state.error or "")
    assert time.monotonic() - started < 5  # the UPnP search (2 x 1 s), then an instant no
    # A gateway that stays silent: asked again after 0.1, 0.2, 0.4 s, then given up on.
    router.drop_nat_pmp()
    started = time.monotonic()
    state = await home.run(NatPmpMapper(PORT, first_wait=0.1, tries=4).map_once())
    elapsed = time.monotonic() - started
    assert state.status is MapStatus.NO_ROUTER
    assert "no NAT-PMP answer" in (state.error or "")
    assert router.dropped() == 4  # the first request and three more
    assert 1.4 < elapsed < 3  # 0.1 + 0.2 + 0.4 + 0.8 s
    # No default route at all: no gateway to ask.
    netns.ip(router.home, "route", "del", "default")
    state = await home.run(NatPmpMapper(PORT).map_once())
    assert state == MapState(MapStatus.NO_ROUTER, error="no default gateway")


def test_the_default_gateway_is_read_from_the_routing_table(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"  # the LAN itself
        "eth1\t00000000\t014DA8C0\t0002\t0\t0\t0\t00000000\n"  # a default route, down
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"  # up, via 192.0.2.1
    )
    assert default_gateway((tmp_path / "missing", route)) == "192.0.2.1"
    route.write_text("Iface\tDestination\tGateway \tFlags\n")
    assert default_gateway((route,)) is None
    assert default_gateway((tmp_path / "missing",)) is None


async def test_a_node_announces_what_the_router_maps_and_unmaps_on_stop(
    router: Router, wan: InNamespace, tmp_path: Path
) -> None:
    router.start()
    alice = friend(
        tmp_path,
        "alice",
        upnp=True,
        upnp_options={"search_target": ("127.0.0.1", free_port()), "search_seconds": 1},
    )
    home = in_namespace(alice.node, router.home)
    await home.start("", PORT, [], addresses=["alice.example:8022"])
    try:
        await wait_until(
            lambda: home.own_addresses == ("alice.example:8022", f"{WAN_ROUTER}:{PORT}"),
            "the mapped address among ours",
            timeout=15,
        )
        upnp_state = await home.upnp_state()
        assert upnp_state is not None
        assert upnp_state["protocol"] == "natpmp"
        assert upnp_state["status"] == "mapped"
        # A friend outside reaches Alice's node itself through the router.
        assert (await wan.run(banner(WAN_ROUTER, PORT))).startswith(b"SSH-2.0-")
    finally:
        await home.stop()
    assert router.redirects() == []
