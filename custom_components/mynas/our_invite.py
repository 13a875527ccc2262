"""Our own invite code: the node's name, the addresses friends use, its public key."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from homeassistant.core import HomeAssistant
from homeassistant.helpers.network import NoURLAvailableError, get_url

from .const import CONF_ADDRESSES, CONF_NODE_NAME, CONF_NODE_PUBLIC_KEY, CONF_PORT
from .engine import MAX_ADDRESSES, Invite, encode_invite, format_address, parse_address


def default_address(hass: HomeAssistant, port: int) -> str:
    """The LAN address Home Assistant knows for itself, with the node's port."""
    try:
        host = urlparse(get_url(hass, allow_external=False, allow_cloud=False)).hostname
    except NoURLAvailableError:
        host = None
    try:
        # A URL may name a host an invite code cannot carry (my_ha.local): not an address.
        return format_address(*parse_address(format_address(host or "", port)))
    except ValueError:
        return format_address("127.0.0.1", port)


def addresses(hass: HomeAssistant, data: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """The addresses in our invite code: the configured ones (port added), else the LAN one."""
    port = int(data[CONF_PORT])
    configured = list(
        dict.fromkeys(with_port(text, port) for text in options.get(CONF_ADDRESSES) or [])
    )
    return configured[:MAX_ADDRESSES] or [default_address(hass, port)]


def with_port(text: str, port: int) -> str:
    """``host`` or ``host:port`` as ``host:port`` (ValueError if it is not an address)."""
    text = text.strip()
    try:
        host, parsed = parse_address(text)
    except ValueError:
        host, parsed = parse_address(format_address(text.strip("[]"), port))
    return format_address(host, parsed)


def split_addresses(text: str | None) -> list[str]:
    """The addresses typed in a text box: one per line (commas and spaces also separate)."""
    return [part for part in re.split(r"[\s,;]+", text or "") if part]


def canonical_addresses(text: str | None, port: int) -> list[str]:
    """Typed addresses as ``host:port`` (``port`` added where missing), without repeats.

    Raises ValueError for the first one that is not an address.
    """
    return list(dict.fromkeys(with_port(part, port) for part in split_addresses(text)))


def our_code(hass: HomeAssistant, data: dict[str, Any], options: dict[str, Any]) -> str:
    """Return our invite code."""
    return encode_invite(
        Invite(
            name=data[CONF_NODE_NAME],
            addresses=tuple(addresses(hass, data, options)),
            public_key=data[CONF_NODE_PUBLIC_KEY],
        )
    )
