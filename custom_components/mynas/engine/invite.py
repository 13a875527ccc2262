"""Invite codes: one line that carries a node's name, addresses and public key.

Two people pair their nodes by pasting each other's code, so both keys are pinned from the
start. A code looks like ``mynas1:<payload><check>``:

- ``mynas1:`` names the format; a later format gets a new number, and this version says
  "update MyNAS" for it instead of misreading it;
- ``<payload>`` is unpadded lowercase base32 (RFC 4648: ``a-z`` and ``2-7``) of the 32 raw
  bytes of the Ed25519 public key followed by the UTF-8 text of the name and each address,
  joined by newlines (a name holds no control characters, an address no newline). Base32
  has no punctuation that chat apps turn into formatting (``_``, ``*``) or break lines at;
- ``<check>`` is the first 50 bits of SHA-256 over the exact text before it, in the same
  base32 (10 characters). Any change to the code's text, in the prefix, the payload or the
  check itself, fails it: a truncated or mistyped code gets a clear error, never a wrong
  peer. A code is also read only in its one canonical spelling.

Whitespace anywhere in a code is ignored, since chat apps wrap long lines.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
import hashlib
import ipaddress
import re
import unicodedata

from .errors import InvalidInvite, KeyFileError
from .identity import (
    canonical_key,
    fingerprint,
    parse_public_key,
    public_key_from_raw,
    public_key_line,
    raw_public_key,
)

VERSION = 1
PREFIX = f"mynas{VERSION}:"
MAX_NAME_LENGTH = 64
MAX_ADDRESSES = 8

_CHECK_LENGTH = 10
_RAW_KEY_SIZE = 32
_PAYLOAD = re.compile(r"[a-z2-7]+")
# Any version, in any letter case: tells "newer MyNAS" and "damaged" from "not ours".
_ANY_PREFIX = re.compile(r"mynas([1-9][0-9]{0,8}):", re.IGNORECASE | re.ASCII)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE | re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
# Besides control characters: line and paragraph separators and the bidirectional
# overrides, which would let a name display as something else.
_FORBIDDEN_IN_NAME = frozenset(
    map(chr, (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)))
)
# Invisible characters some apps insert into long words so they can wrap them.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))

NOT_AN_INVITE = f"This is not a MyNAS invite code: a MyNAS invite code starts with {PREFIX!r}."
NEWER_VERSION = (
    "This invite code was made by a newer version of MyNAS: please update MyNAS, then paste "
    "the code again."
)
DAMAGED = "This invite code is damaged or incomplete: copy the whole code again."


@dataclass(frozen=True, slots=True)
class Invite:
    """What an invite code carries: who a node is and where to reach it.

    Fields are checked and brought to canonical form on creation (name stripped, addresses
    as ``format_address`` writes them, public key without comment); a bad field raises
    ``ValueError`` naming it.
    """

    name: str
    addresses: tuple[str, ...]
    public_key: str

    def __post_init__(self) -> None:
        # Canonical fields make equal invites equal and give each one a single code.
        object.__setattr__(self, "name", _check_name(self.name))
        object.__setattr__(self, "addresses", _check_addresses(self.addresses))
        try:
            key = canonical_key(self.public_key)
        except KeyFileError as err:
            raise ValueError(f"invalid public key: {err}") from err
        object.__setattr__(self, "public_key", key)

    @property
    def fingerprint(self) -> str:
        """Return the ``SHA256:…`` fingerprint of the node's public key."""
        return fingerprint(self.public_key)


def encode(invite: Invite) -> str:
    """Return the invite code of ``invite``: one line, ``mynas1:…``."""
    raw_key = raw_public_key(parse_public_key(invite.public_key))
    payload = raw_key + "\n".join((invite.name, *invite.addresses)).encode("utf-8")
    text = PREFIX + base64.b32encode(payload).decode("ascii").rstrip("=").lower()
    return text + _check(text)


def decode(code: str) -> Invite:
    """Read an invite code; raise ``InvalidInvite`` with a message a person can act on."""
    text = "".join(code.translate(_INVISIBLE).split())
    prefix = _ANY_PREFIX.match(text)
    if prefix is None:
        raise InvalidInvite(NOT_AN_INVITE)
    if int(prefix.group(1)) > VERSION:
        raise InvalidInvite(NEWER_VERSION)
    rest = text[prefix.end() :]
    if len(rest) <= _CHECK_LENGTH or not _PAYLOAD.fullmatch(rest):
        raise InvalidInvite(DAMAGED)
    body, check = text[:-_CHECK_LENGTH], text[-_CHECK_LENGTH:]
    if _check(body) != check:
        raise InvalidInvite(DAMAGED)
    # From here the code is exactly what some encoder wrote: errors are about its content.
    invite = _parse_payload(rest[:-_CHECK_LENGTH])
    if encode(invite) != text:
        raise InvalidInvite("This invite code is not valid: it is not written canonically.")
    return invite


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` into a canonical host and a port; raise ``ValueError`` if bad.

    The host is a DNS name (returned in lower case), an IPv4 address, or an IPv6 address in
    brackets (``[2001:db8::1]:8022``, returned without brackets, compressed).
    """
    text = text.strip()
    if text.startswith("["):
        literal, bracket, port_text = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"invalid address {text!r}: write an IPv6 address as [addr]:port")
        host = _ipv6(text, literal)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"invalid address {text!r}: no port, write host:port")
        if ":" in host:
            raise ValueError(
                f"invalid address {text!r}: put an IPv6 address in brackets, "
                "like [2001:db8::1]:8022"
            )
        host = _host(text, host)
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check(text: str) -> str:
    digest = hashlib.sha256(text.encode("ascii")).digest()
    return base64.b32encode(digest[:7]).decode("ascii")[:_CHECK_LENGTH].lower()


def _parse_payload(payload: str) -> Invite:
    try:
        data = base64.b32decode(payload.upper() + "=" * (-len(payload) % 8))
    except binascii.Error as err:
        raise InvalidInvite("This invite code is not valid: its payload is malformed.") from err
    if len(data) < _RAW_KEY_SIZE:
        raise InvalidInvite("This invite code is not valid: it is too short to hold a key.")
    try:
        text = data[_RAW_KEY_SIZE:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInvite("This invite code is not valid: its text is not UTF-8.") from err
    name, *addresses = text.split("\n")
    key = public_key_line(public_key_from_raw(data[:_RAW_KEY_SIZE]))
    try:
        return Invite(name, tuple(addresses), key)
    except ValueError as err:
        raise InvalidInvite(f"This invite code is not valid: {err}.") from err


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"the node name must be 1 to {MAX_NAME_LENGTH} characters long")
    for char in name:
        if unicodedata.category(char) in ("Cc", "Cs") or char in _FORBIDDEN_IN_NAME:
            raise ValueError(f"the node name contains a control character ({ord(char):#06x})")
    return name


def _check_addresses(addresses: tuple[str, ...]) -> tuple[str, ...]:
    if not addresses:
        raise ValueError("at least one address (host:port) is needed")
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"at most {MAX_ADDRESSES} addresses are allowed")
    canonical = tuple(format_address(*parse_address(address)) for address in addresses)
    if len(set(canonical)) != len(canonical):
        raise ValueError("an address is listed twice")
    return canonical


def _ipv6(text: str, literal: str) -> str:
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError as err:
        raise ValueError(f"invalid address {text!r}: not an IPv6 address") from err
    if address.scope_id is not None:
        # A zone (%eth0) names an interface of one machine: meaningless to a friend's node.
        raise ValueError(f"invalid address {text!r}: an IPv6 zone (%...) is not allowed")
    return str(address)


def _host(text: str, host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    # A name whose last label is all digits would be read as a (malformed) IPv4 address.
    if len(host) > 253 or not _HOSTNAME.fullmatch(host) or host.rpartition(".")[2].isdigit():
        raise ValueError(f"invalid address {text!r}: not a valid host name or IP address")
    return host.lower()
