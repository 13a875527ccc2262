"""UPnP port mapping against a real IGD on 127.0.0.1 (async-upnp-client's server side).

The router answers SSDP searches and SOAP calls over real sockets; the mapper finds it,
maps the port, renews the lease, and removes the mapping when stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import socket

import pytest

from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.node import Node
from custom_components.mynas.engine.upnp import MapState, MapStatus, PortMapper

from .conftest import wait_until
from .igd_support import EXTERNAL_IP, WanIpConnection, router


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def igd() -> AsyncIterator[tuple[int, str]]:
    """A router on 127.0.0.1: (its SSDP port, its description URL)."""
    ssdp, http = free_port(socket.SOCK_DGRAM), free_port()
    async with router(http, ssdp):
        yield ssdp, f"http://127.0.0.1:{http}/device.xml"


def adds() -> list[dict[str, object]]:
    return [args for name, args in WanIpConnection.calls if name == "AddPortMapping"]


async def test_the_mapping_is_made_renewed_and_removed(igd: tuple[int, str]) -> None:
    ssdp, location = igd
    changes: list[MapState] = []
    mapper = PortMapper(
        8022,
        lease=2,
        search_target=("127.0.0.1", ssdp),
        search_seconds=1,
        on_change=changes.append,
    )
    mapper.start()
    try:
        await wait_until(lambda: mapper.state.status is MapStatus.MAPPED, "the mapping")
        assert WanIpConnection.mappings[("TCP", 8022)] == {
            "external_port": 8022,
            "protocol": "TCP",
            "internal_port": 8022,
            "internal_client": "127.0.0.1",
            "description": "MyNAS",
            "lease": 2,
        }
        state = mapper.state
        assert state.router == location
        assert state.external_address == f"{EXTERNAL_IP}:8022"
        assert state.public is None  # a documentation address: friends could not dial it
        assert state.as_dict()["status"] == "mapped"
        first = state.renewed_at
        # Renewed at half the lease: the router hears AddPortMapping again.
        await wait_until(lambda: len(adds()) >= 2, "a renewal")
        await wait_until(lambda: mapper.state.renewed_at != first, "the renewal noted")
    finally:
        await mapper.stop()
    assert WanIpConnection.mappings == {}
    assert WanIpConnection.calls[-1] == ("DeletePortMapping", {"external_port": 8022})
    assert mapper.state.status is MapStatus.PENDING
    assert changes[0].status is MapStatus.MAPPED


async def test_a_router_that_says_no(igd: tuple[int, str]) -> None:
    _, location = igd
    WanIpConnection.refuse = 718  # ConflictInMappingEntry: another machine has the port
    mapper = PortMapper(8022, location=location)
    state = await mapper.map_once()
    assert state.status is MapStatus.REFUSED
    assert "718" in (state.error or "")
    assert state.lan_address == "127.0.0.1"
    await mapper.stop()
    assert ("DeletePortMapping", {"external_port": 8022}) not in WanIpConnection.calls


async def test_a_router_that_takes_permanent_leases_only(igd: tuple[int, str]) -> None:
    _, location = igd
    WanIpConnection.permanent_only = True
    mapper = PortMapper(8022, external_port=18022, location=location)
    state = await mapper.map_once()
    assert state.status is MapStatus.MAPPED
    assert state.lease == 0
    assert WanIpConnection.mappings[("TCP", 18022)]["internal_port"] == 8022
    await mapper.stop()
    assert WanIpConnection.mappings == {}


async def test_no_router_answers() -> None:
    mapper = PortMapper(
        8022, search_target=("127.0.0.1", free_port(socket.SOCK_DGRAM)), search_seconds=1
    )
    state = await mapper.map_once()
    assert state.status is MapStatus.NO_ROUTER
    gone = PortMapper(8022, location=f"http://127.0.0.1:{free_port()}/device.xml")
    assert (await gone.map_once()).status is MapStatus.NO_ROUTER


async def test_a_node_announces_what_the_router_maps_and_unmaps_on_stop(
    igd: tuple[int, str], alice_id: Identity, tmp_path: object
) -> None:
    ssdp, _ = igd
    WanIpConnection.external_ip = "2001:20::7"  # global to Python, routed nowhere
    storage = tmp_path / "storage"  # type: ignore[operator]
    storage.mkdir()
    events: list[tuple[str, dict[str, object]]] = []
    node = Node(
        alice_id,
        storage,
        upnp=True,
        upnp_options={"search_target": ("127.0.0.1", ssdp), "search_seconds": 1},
        on_event=lambda kind, data: events.append((kind, data)),
    )
    await node.start("127.0.0.1", 0, [], addresses=["alice.example:8022"])
    try:
        port = node.server.port
        await wait_until(
            lambda: node.own_addresses == ("alice.example:8022", f"[2001:20::7]:{port}"),
            "the mapped address among ours",
        )
        assert node.upnp_state() is not None
        assert WanIpConnection.mappings[("TCP", port)]["internal_port"] == port
        assert any(kind == "upnp" and data["status"] == "mapped" for kind, data in events)
    finally:
        await node.stop()
    assert WanIpConnection.mappings == {}
