"""Can a friend reach us? One dial to one address, what it found, and what that means.

The reachability check (``protocol`` CHECK) runs on the *friend's* node: we ask a peer to
connect back to the addresses we announced, and it reports, per address, what it saw. This
module is the vocabulary both sides share and the dial itself:

- ``dial_check`` connects to one address with a short timeout, first plain TCP (refused, timed
  out, unreachable), then the SSH key exchange with the expected key pinned: our key's SSH
  banner, another key (another host answers on that port), or something that is not SSH.
- ``diagnose`` turns the outcomes of all addresses into one ``Cause`` the user can act on:
  reachable, the port is closed (forward it), another host answers (the forward points at
  the wrong machine, or the router itself answers), nothing answers at all (no inbound
  connection is possible: carrier-grade NAT, most likely).

No server of ours is involved (design invariant 10): only the friends' nodes and their routers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
import contextlib
from dataclasses import asdict, dataclass
import enum
import socket
from typing import Any

import asyncssh

from .identity import Identity, fingerprint, parse_public_key, pinned_login
from .invite import parse_address

# Each address gets this long (seconds) for TCP and the SSH key exchange together.
CHECK_TIMEOUT = 5.0


class Outcome(enum.StrEnum):
    """What one dial to one address found."""

    OURS = "ours"  # an SSH server with the expected key: reachable there
    OTHER_KEY = "other_key"  # an SSH server with another key
    NOT_SSH = "not_ssh"  # something accepted the connection but did not speak SSH
    REFUSED = "refused"  # the address answered that nothing listens on that port
    TIMEOUT = "timeout"  # nothing answered at all
    UNREACHABLE = "unreachable"  # no route, unknown name, bad address
    SKIPPED = "skipped"  # not dialed: not announced, or over the limit


class Cause(enum.StrEnum):
    """What a node's reachability check concludes, as the user needs to hear it."""

    REACHABLE = "reachable"  # a friend reached us on one of our addresses
    PORT_CLOSED = "port_closed"  # our public address answers, but the port is not forwarded
    OTHER_HOST = "other_host"  # something else answers there: the router, another machine
    NO_INBOUND = "no_inbound"  # nothing answers: carrier-grade NAT most likely
    NO_ADDRESS = "no_address"  # we know no address of ours to give friends
    UNKNOWN = "unknown"  # no friend could be asked (none online, none new enough)


# The causes that mean friends cannot connect to us.
UNREACHABLE_CAUSES = frozenset({Cause.PORT_CLOSED, Cause.OTHER_HOST, Cause.NO_INBOUND})


@dataclass(frozen=True, slots=True)
class AddressCheck:
    """One address dialed, and what was found there."""

    address: str
    outcome: Outcome
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the CHECK reply carries a list of these)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> AddressCheck:
        """Read one entry of a CHECK reply; an unknown outcome reads as SKIPPED."""
        if not isinstance(data, dict):
            return cls("?", Outcome.SKIPPED, "malformed answer")
        try:
            outcome = Outcome(str(data.get("outcome")))
        except ValueError:
            outcome = Outcome.SKIPPED
        return cls(str(data.get("address", "?"))[:300], outcome, str(data.get("detail", ""))[:300])


def diagnose(checks: Iterable[AddressCheck]) -> Cause:
    """Say what the outcomes of one check mean, the most useful verdict first."""
    outcomes = {check.outcome for check in checks}
    if not outcomes:
        return Cause.NO_ADDRESS
    if Outcome.OURS in outcomes:
        return Cause.REACHABLE
    if outcomes <= {Outcome.SKIPPED}:
        return Cause.UNKNOWN
    if outcomes & {Outcome.OTHER_KEY, Outcome.NOT_SSH}:
        return Cause.OTHER_HOST
    if Outcome.REFUSED in outcomes:
        return Cause.PORT_CLOSED
    return Cause.NO_INBOUND


class _Seen(asyncssh.SSHClient):
    """Remembers the host key presented when it is not the expected one."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None
        self.connected = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = key
        return False

    def auth_completed(self) -> None:
        self.connected = True


async def dial_check(
    address: str,
    expected_key: str,
    *,
    identity: Identity | None = None,
    seconds: float = CHECK_TIMEOUT,
) -> AddressCheck:
    """Connect to ``address`` and say whether the node with ``expected_key`` answers there.

    ``identity``, when given, logs in with that key (a paired node lets us in, so the check
    leaves no failed login behind there); the verdict rests on the host key alone. The
    whole dial takes at most ``seconds``.
    """
    timeout = seconds
    try:
        host, port = parse_address(address)
    except ValueError as err:
        return AddressCheck(address, Outcome.UNREACHABLE, str(err))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        return AddressCheck(address, Outcome.TIMEOUT, "the name did not resolve in time")
    except (socket.gaierror, UnicodeError) as err:
        return AddressCheck(address, Outcome.UNREACHABLE, f"unknown host ({err})")
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    handed_over = False
    try:
        try:
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await loop.sock_connect(sock, sockaddr)
        except TimeoutError:
            return AddressCheck(address, Outcome.TIMEOUT, f"no answer within {timeout:g} s")
        except ConnectionRefusedError:
            return AddressCheck(address, Outcome.REFUSED, "connection refused")
        except OSError as err:
            return AddressCheck(address, Outcome.UNREACHABLE, err.strerror or str(err))
        handed_over = True
        return await _key_exchange(address, sock, expected_key, identity, deadline - loop.time())
    finally:
        if not handed_over:
            sock.close()


async def _key_exchange(
    address: str,
    sock: socket.socket,
    expected_key: str,
    identity: Identity | None,
    time_left: float,
) -> AddressCheck:
    """Run the SSH key exchange on a connected socket (which it then owns and closes)."""
    pinned = parse_public_key(expected_key)
    seen = _Seen()
    try:
        async with asyncio.timeout(max(0.1, time_left)):
            conn, _ = await asyncssh.create_connection(
                lambda: seen,
                sock=sock,
                **pinned_login(pinned, identity),
                encoding=None,
            )
    except asyncssh.HostKeyNotVerifiable:
        shown = fingerprint(seen.presented) if seen.presented is not None else "unknown"
        return AddressCheck(address, Outcome.OTHER_KEY, f"an SSH server with key {shown}")
    except asyncssh.PermissionDenied:
        return AddressCheck(address, Outcome.OURS, "our key answered (login refused)")
    except (TimeoutError, asyncssh.Error, OSError, asyncio.IncompleteReadError) as err:
        return AddressCheck(
            address, Outcome.NOT_SSH, f"something answered but did not speak SSH ({err!r})"[:300]
        )
    finally:
        if not seen.connected:
            sock.close()  # a no-op where the failed connection closed it already
    conn.close()
    with contextlib.suppress(Exception):
        await conn.wait_closed()
    return AddressCheck(address, Outcome.OURS, "our key answered")
