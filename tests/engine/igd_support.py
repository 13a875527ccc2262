"""A real UPnP InternetGatewayDevice (async-upnp-client's server side), as a router runs it.

It serves its description, SCPD and SOAP control over HTTP and answers SSDP searches;
``WANIPConnection`` keeps its port mappings in ``mappings`` and logs every call in
``calls``, so a test sees what a router would have done. ``refuse`` makes it answer
AddPortMapping with a UPnP error, as a router with UPnP switched off for us does.

(No ``from __future__ import annotations`` here: the library checks action arguments
against the real annotation types.)
"""

import asyncio
from collections.abc import AsyncIterator
import contextlib
from typing import Any, ClassVar
import xml.etree.ElementTree as ET

from async_upnp_client.const import DeviceInfo, ServiceInfo
from async_upnp_client.exceptions import UpnpActionError
from async_upnp_client.server import (
    UpnpServer,
    UpnpServerDevice,
    UpnpServerService,
    callable_action,
    create_state_var,
)

EXTERNAL_IP = "203.0.113.7"  # what the router says its public address is (never dialed)


class WanIpConnection(UpnpServerService):
    """WANIPConnection:1 with the three actions a port mapper uses."""

    SERVICE_DEFINITION = ServiceInfo(
        service_id="urn:upnp-org:serviceId:WANIPConn1",
        service_type="urn:schemas-upnp-org:service:WANIPConnection:1",
        control_url="/upnp/control/WANIPConn1",
        event_sub_url="/upnp/event/WANIPConn1",
        scpd_url="/WANIPCn.xml",
        xml=ET.Element("server_service"),
    )
    STATE_VARIABLE_DEFINITIONS: ClassVar[dict[str, Any]] = {
        "ExternalIPAddress": create_state_var("string"),
        "RemoteHost": create_state_var("string"),
        "ExternalPort": create_state_var("ui2"),
        "PortMappingProtocol": create_state_var("string", allowed=["TCP", "UDP"]),
        "InternalPort": create_state_var("ui2"),
        "InternalClient": create_state_var("string"),
        "PortMappingEnabled": create_state_var("boolean"),
        "PortMappingDescription": create_state_var("string"),
        "PortMappingLeaseDuration": create_state_var("ui4"),
    }
    # What the routers of this test answer, and what they saw (shared: one router per test).
    mappings: ClassVar[dict[tuple[str, int], dict[str, Any]]] = {}
    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    refuse: int | None = None
    permanent_only = False  # refuses any lease but 0 (error 725), as old IGD:1 routers do
    external_ip = EXTERNAL_IP

    @callable_action(
        name="AddPortMapping",
        in_args={
            "NewRemoteHost": "RemoteHost",
            "NewExternalPort": "ExternalPort",
            "NewProtocol": "PortMappingProtocol",
            "NewInternalPort": "InternalPort",
            "NewInternalClient": "InternalClient",
            "NewEnabled": "PortMappingEnabled",
            "NewPortMappingDescription": "PortMappingDescription",
            "NewLeaseDuration": "PortMappingLeaseDuration",
        },
        out_args={},
    )
    async def add_port_mapping(
        self,
        NewRemoteHost: str,
        NewExternalPort: int,
        NewProtocol: str,
        NewInternalPort: int,
        NewInternalClient: str,
        NewEnabled: bool,
        NewPortMappingDescription: str,
        NewLeaseDuration: int,
    ) -> dict[str, Any]:
        args = {
            "external_port": NewExternalPort,
            "protocol": NewProtocol,
            "internal_port": NewInternalPort,
            "internal_client": NewInternalClient,
            "description": NewPortMappingDescription,
            "lease": NewLeaseDuration,
        }
        self.calls.append(("AddPortMapping", args))
        if self.refuse is not None:
            raise UpnpActionError(error_code=self.refuse, error_desc="refused")
        if self.permanent_only and NewLeaseDuration:
            raise UpnpActionError(error_code=725, error_desc="OnlyPermanentLeasesSupported")
        self.mappings[(NewProtocol, NewExternalPort)] = args
        return {}

    @callable_action(
        name="DeletePortMapping",
        in_args={
            "NewRemoteHost": "RemoteHost",
            "NewExternalPort": "ExternalPort",
            "NewProtocol": "PortMappingProtocol",
        },
        out_args={},
    )
    async def delete_port_mapping(
        self, NewRemoteHost: str, NewExternalPort: int, NewProtocol: str
    ) -> dict[str, Any]:
        self.calls.append(("DeletePortMapping", {"external_port": NewExternalPort}))
        self.mappings.pop((NewProtocol, NewExternalPort), None)
        return {}

    @callable_action(
        name="GetExternalIPAddress",
        in_args={},
        out_args={"NewExternalIPAddress": "ExternalIPAddress"},
    )
    async def get_external_ip_address(self) -> dict[str, Any]:
        self.calls.append(("GetExternalIPAddress", {}))
        return {"NewExternalIPAddress": self.external_ip}


def _device(device_type: str, name: str, udn: str) -> DeviceInfo:
    return DeviceInfo(
        device_type=device_type,
        friendly_name=name,
        manufacturer="MyNAS tests",
        manufacturer_url=None,
        model_description=None,
        model_name=name,
        model_number=None,
        model_url=None,
        serial_number=None,
        udn=udn,
        upc=None,
        presentation_url=None,
        url="/device.xml",
        icons=[],
        xml=ET.Element("server_device"),
    )


class WanConnectionDevice(UpnpServerDevice):
    DEVICE_DEFINITION = _device(
        "urn:schemas-upnp-org:device:WANConnectionDevice:1",
        "WAN connection",
        "uuid:3e1b6b1c-0000-4000-8000-00000000c0de",
    )
    EMBEDDED_DEVICES = ()
    SERVICES = (WanIpConnection,)


class WanDevice(UpnpServerDevice):
    DEVICE_DEFINITION = _device(
        "urn:schemas-upnp-org:device:WANDevice:1",
        "WAN",
        "uuid:3e1b6b1c-0000-4000-8000-00000000beef",
    )
    EMBEDDED_DEVICES = (WanConnectionDevice,)
    SERVICES = ()


class Router(UpnpServerDevice):
    DEVICE_DEFINITION = _device(
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        "Test router",
        "uuid:3e1b6b1c-0000-4000-8000-000000000001",
    )
    EMBEDDED_DEVICES = (WanDevice,)
    SERVICES = ()


@contextlib.asynccontextmanager
async def router(http_port: int, ssdp_port: int) -> AsyncIterator[UpnpServer]:
    """Run the IGD on 127.0.0.1: HTTP on ``http_port``, SSDP searches on ``ssdp_port``."""
    WanIpConnection.mappings = {}
    WanIpConnection.calls = []
    WanIpConnection.refuse = None
    WanIpConnection.permanent_only = False
    WanIpConnection.external_ip = EXTERNAL_IP
    server = UpnpServer(
        Router,
        ("127.0.0.1", 0),
        target=("127.0.0.1", ssdp_port),
        http_port=http_port,
    )
    await server.async_start()
    try:
        yield server
    finally:
        await server.async_stop()
        # What async_stop leaves open in 0.48 (and the garbage collector would otherwise
        # report in some later test): the search responder's reply socket, and the HTTP
        # runner with the connections it accepted.
        responder = server._search_responder
        if responder is not None and responder._response_transport is not None:
            responder._response_transport.close()
        if server._site is not None:
            await server._site._runner.cleanup()
        await asyncio.sleep(0)
