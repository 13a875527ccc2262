"""Open the node's port on the household's router with UPnP (an IGD), and keep it open.

Many home routers forward a port only when asked over UPnP. ``PortMapper`` finds the router
(SSDP search for an InternetGatewayDevice, or a description URL given), asks it to forward
our TCP port to this machine's LAN address (``AddPortMapping``, a lease of ``lease``
seconds), renews the lease at half its time, and removes the mapping on ``stop``. Its
``state`` says what happened — ``mapped`` (with the router's external address, which the
node then announces to its friends), ``refused`` (the router said no: UPnP off, the port
taken by another machine) or ``no_router`` (nothing answered the search) — and
``on_change`` hears every change. It uses ``async-upnp-client``, the library Home
Assistant's own ``upnp`` integration uses; nothing leaves the LAN but what the router does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
from dataclasses import KW_ONLY, dataclass, field, replace
import enum
import ipaddress
import logging
import socket
import time
from typing import Any
from urllib.parse import urlparse

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpDevice, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionResponseError, UpnpError
from async_upnp_client.search import SsdpSearchListener
from async_upnp_client.utils import CaseInsensitiveDict

from .invite import format_address

_LOGGER = logging.getLogger(__name__)

IGD_TYPES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
# The services that forward ports, in the order they are tried.
WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
# Where the search goes when no target is given: None, the SSDP multicast group of the LAN.
# (Tests point it at 127.0.0.1, so that no search ever leaves the machine.)
DEFAULT_SEARCH_TARGET: tuple[str, int] | None = None
LEASE = 3600
SEARCH_SECONDS = 3
# After a failure (no router, refused), try again this often (seconds).
RETRY_EVERY = 600.0
# UPnP error: "OnlyPermanentLeasesSupported" (IGD:1 routers that take lease 0 only).
_PERMANENT_ONLY = 725


class MapStatus(enum.StrEnum):
    """What the router did with our request."""

    PENDING = "pending"
    MAPPED = "mapped"
    REFUSED = "refused"
    NO_ROUTER = "no_router"


@dataclass(frozen=True, slots=True)
class MapState:
    """Where the port mapping stands."""

    status: MapStatus = MapStatus.PENDING
    external_address: str | None = None  # "ip:port" as the router reports it
    router: str | None = None  # the router's description URL
    lan_address: str | None = None  # ours, as the mapping points at it
    error: str | None = None
    lease: int = 0
    renewed_at: float | None = None
    protocol: str | None = None  # "upnp" or "natpmp" (``portmap.RouterMapper`` says which)

    @property
    def public(self) -> str | None:
        """The external address, if friends can dial it.

        Not when the router's own address is private: a second router, or carrier-grade
        NAT, sits in front of it.
        """
        if self.status is not MapStatus.MAPPED or self.external_address is None:
            return None
        host = self.external_address.rsplit(":", 1)[0].strip("[]")
        return self.external_address if ipaddress.ip_address(host).is_global else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (a diagnostic sensor's attributes)."""
        return {
            "status": str(self.status),
            "external_address": self.external_address,
            "router": self.router,
            "lan_address": self.lan_address,
            "error": self.error,
            "lease": self.lease,
            "renewed_at": self.renewed_at,
            "public": self.public,
            "protocol": self.protocol,
        }


@dataclass(eq=False)
class PortMapper:
    """Keeps our TCP ``port`` forwarded by the router for as long as it runs.

    ``port`` is mapped as ``external_port`` on the router (the same when not given).
    ``location`` skips the search (the router's description URL); ``search_target`` sends
    the search there instead of the SSDP multicast group (tests).
    """

    port: int
    _: KW_ONLY
    external_port: int = 0
    lease: int = LEASE
    description: str = "MyNAS"
    location: str | None = None
    search_target: tuple[str, int] | None = None
    search_seconds: int = SEARCH_SECONDS
    retry_every: float = RETRY_EVERY
    on_change: Callable[[MapState], None] | None = None
    state: MapState = field(default_factory=MapState, init=False)
    _service: UpnpService | None = field(default=None, init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.external_port = self.external_port or self.port

    def start(self) -> None:
        """Begin mapping (and renewing) in a task of its own."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mynas-upnp")

    async def stop(self) -> None:
        """Stop renewing and remove the mapping from the router (if we made one)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.state.status is MapStatus.MAPPED and self._service is not None:
            try:
                await self._service.async_call_action(
                    "DeletePortMapping",
                    NewRemoteHost="",
                    NewExternalPort=self.external_port,
                    NewProtocol="TCP",
                )
            except (UpnpError, OSError, TimeoutError) as err:
                _LOGGER.info("Could not remove the port mapping: %s", err)
            self._set(replace(self.state, status=MapStatus.PENDING, renewed_at=None))

    async def _run(self) -> None:
        while True:
            try:
                await self.map_once()
            except Exception:
                _LOGGER.exception("UPnP port mapping failed")
                self._set(MapState(MapStatus.REFUSED, error="unexpected error"))
            if self.state.status is MapStatus.MAPPED:
                # A permanent lease (0) is still renewed now and then: routers forget.
                await asyncio.sleep(self.state.lease / 2 if self.state.lease else self.retry_every)
            else:
                await asyncio.sleep(self.retry_every)

    async def map_once(self) -> MapState:
        """Find the router (once) and ask it for the mapping (again: a renewal)."""
        if self._service is None:
            found = await self._find()
            if found is None:
                return self._set(MapState(MapStatus.NO_ROUTER, error="no UPnP router answered"))
            self._service, location = found
            self.state = replace(self.state, router=location)
        service = self._service
        router = self.state.router or ""
        lan = _lan_address(urlparse(router).hostname or "")
        if lan is None:
            return self._set(replace(self.state, status=MapStatus.REFUSED, error="no LAN address"))
        lease = self.lease
        try:
            try:
                await self._add(service, lan, lease)
            except UpnpActionResponseError as err:
                if err.error_code != _PERMANENT_ONLY:
                    raise
                lease = 0
                await self._add(service, lan, lease)
            reply = await service.async_call_action("GetExternalIPAddress")
        except UpnpActionResponseError as err:
            return self._set(
                replace(
                    self.state,
                    status=MapStatus.REFUSED,
                    lan_address=lan,
                    error=f"the router refused (UPnP error {err.error_code})",
                )
            )
        except (UpnpError, OSError, TimeoutError) as err:
            self._service = None  # look for it again next time
            return self._set(
                replace(self.state, status=MapStatus.NO_ROUTER, error=f"router unreachable: {err}")
            )
        external = reply.get("NewExternalIPAddress")
        return self._set(
            MapState(
                MapStatus.MAPPED,
                external_address=_external(external, self.external_port),
                router=router,
                lan_address=lan,
                lease=lease,
                renewed_at=time.time(),
            )
        )

    async def _add(self, service: UpnpService, lan: str, lease: int) -> None:
        await service.async_call_action(
            "AddPortMapping",
            NewRemoteHost="",
            NewExternalPort=self.external_port,
            NewProtocol="TCP",
            NewInternalPort=self.port,
            NewInternalClient=lan,
            NewEnabled=True,
            NewPortMappingDescription=self.description,
            NewLeaseDuration=lease,
        )

    async def _find(self) -> tuple[UpnpService, str] | None:
        """The router's port-forwarding service and its description URL, or None."""
        locations = [self.location] if self.location else await self._search()
        factory = UpnpFactory(AiohttpRequester(), non_strict=True)
        for location in locations:
            try:
                device = await factory.async_create_device(location)
            except (UpnpError, OSError, TimeoutError) as err:
                _LOGGER.debug("Not a router we can use at %s: %s", location, err)
                continue
            service = _wan_service(device)
            if service is not None:
                return service, location
        return None

    async def _search(self) -> list[str]:
        found: list[str] = []

        async def heard(headers: CaseInsensitiveDict) -> None:
            location = headers.get("location")
            if location and location not in found:
                found.append(str(location))

        for search_target in IGD_TYPES:
            with contextlib.suppress(OSError):
                await self._search_for(search_target, heard)
            if found:
                break
        return found

    async def _search_for(
        self, search_target: str, heard: Callable[[CaseInsensitiveDict], Any]
    ) -> None:
        """One SSDP search, its socket closed even if cancelled (``async_search`` isn't)."""
        listener: SsdpSearchListener | None = None

        async def connected() -> None:
            assert listener is not None
            listener.async_search()

        listener = SsdpSearchListener(
            async_callback=heard,
            target=self.search_target or DEFAULT_SEARCH_TARGET,
            timeout=self.search_seconds,
            search_target=search_target,
            async_connect_callback=connected,
        )
        await listener.async_start()
        try:
            await asyncio.sleep(self.search_seconds)
        finally:
            listener.async_stop()

    def _set(self, state: MapState) -> MapState:
        changed = state != self.state
        self.state = state
        if changed:
            _LOGGER.info("UPnP port mapping: %s", state.status)
            if self.on_change is not None:
                self.on_change(state)
        return state


def _wan_service(device: UpnpDevice) -> UpnpService | None:
    for service_type in WAN_SERVICES:
        service = device.find_service(service_type)
        if service is not None and service.has_action("AddPortMapping"):
            return service
    return None


def _lan_address(router_host: str) -> str | None:
    """Our address on the way to the router (a UDP ``connect`` sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((router_host, 1900))
            return str(sock.getsockname()[0])
    except OSError:
        return None


def _external(address: object, port: int) -> str | None:
    try:
        ip = ipaddress.ip_address(str(address))
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    return format_address(str(ip), port)
