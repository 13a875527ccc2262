"""The reachability check from a friend's side, through a real router with NAT.

Alice's node sits in a home LAN behind a router namespace (masquerade, nftables); Bob's is
outside. Alice asks Bob to dial back her public address; what the router does with the
port decides what Bob sees, and the check must name it: forwarded (reachable), closed
("refused": forward the port), another SSH server on the router ("another host answers"),
and carrier-grade NAT (nothing answers at all).
"""

from __future__ import annotations

from pathlib import Path

from custom_components.mynas.engine.host.limits import Limits
from custom_components.mynas.engine.reachability import Cause, Outcome
from custom_components.mynas.engine.threaded_node import ThreadedNode

from .friends_support import friend
from .netns_support import (
    LAN_HOME,
    PORT,
    WAN_FRIEND,
    WAN_ROUTER,
    Home,
    Namespaces,
    in_namespace,
)

PUBLIC = f"{WAN_ROUTER}:{PORT}"
# Bob dials back at once and gives up quickly: this is a test.
QUICK = Limits(check_every=0.0, check_timeout=2.0)


async def test_the_check_names_what_the_router_does_with_the_port(
    netns: Namespaces, tmp_path: Path
) -> None:
    home = Home(netns)
    alice = friend(tmp_path, "alice")
    bob = friend(tmp_path, "bob", limits=QUICK, dial_timeout=3.0)
    in_namespace(alice.node, home.home)
    in_namespace(bob.node, home.friend)
    router_key = friend(tmp_path, "router").identity
    router = in_namespace(ThreadedNode(router_key, tmp_path / "router" / "storage"), home.router)
    try:
        # Alice typed her public address (the router's) when she made her invite code.
        await alice.node.start(
            "", PORT, [bob.peer_config((f"{WAN_FRIEND}:{PORT}",))], addresses=(PUBLIC,)
        )
        await bob.node.start("", PORT, [alice.peer_config((PUBLIC,))])

        # The router forwards nothing yet: it answers "refused" on its public port.
        report = await alice.node.check_reachability()
        assert report.cause is Cause.PORT_CLOSED
        assert [(c.address, c.outcome) for c in report.checks["bob"]] == [(PUBLIC, Outcome.REFUSED)]
        assert report.lan_address == LAN_HOME  # "forward port 8022 to this Pi's address"
        assert report.seen_from == [WAN_ROUTER]  # Bob sees her come from the router
        assert report.port == PORT

        # Something else listens there: the router's own SSH server (not Alice's key).
        await router.start("", PORT, [])
        try:
            report = await alice.node.check_reachability()
        finally:
            await router.stop()
        assert report.cause is Cause.OTHER_HOST
        assert report.checks["bob"][0].outcome is Outcome.OTHER_KEY
        assert router_key.fingerprint in report.checks["bob"][0].detail
        assert report.answered_by == [PUBLIC]

        # Carrier-grade NAT: nothing gets in, not even a refusal.
        home.no_inbound()
        report = await alice.node.check_reachability()
        assert report.cause is Cause.NO_INBOUND
        assert report.checks["bob"][0].outcome is Outcome.TIMEOUT

        # The port forwarded to the Pi, as the README says: Bob reaches Alice's node.
        home.forward()
        report = await alice.node.check_reachability()
        assert report.cause is Cause.REACHABLE
        assert report.checks["bob"][0].outcome is Outcome.OURS
        assert report.as_dict()["cause"] == "reachable"
    finally:
        await alice.node.stop()
        await bob.node.stop()


async def test_a_check_without_addresses_or_friends_says_so(tmp_path: Path) -> None:
    lonely = friend(tmp_path, "lonely")
    try:
        await lonely.node.start("127.0.0.1", 0, [])
        assert (await lonely.node.check_reachability()).cause is Cause.NO_ADDRESS
        await lonely.node.set_addresses(["127.0.0.1:9"])
        report = await lonely.node.check_reachability()
        assert report.cause is Cause.UNKNOWN
        assert report.errors == {}
        # A friend that cannot be reached is named, with why.
        await lonely.node.set_peers([friend(tmp_path, "gone").peer_config(("127.0.0.1:9",))])
        report = await lonely.node.check_reachability()
        assert report.cause is Cause.UNKNOWN
        assert "127.0.0.1:9" in report.errors["gone"]
    finally:
        await lonely.node.stop()
