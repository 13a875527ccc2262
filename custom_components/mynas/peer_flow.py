"""Pairing a peer: paste the friend's invite code, check it, grant a quota, test, done.

Both keys end up pinned with no trust-on-first-use: the friend's key comes from their code,
and they pin ours from the code this flow shows to send back.
"""

from __future__ import annotations

import re
from typing import Any

from homeassistant.config_entries import ConfigSubentryFlow, SubentryFlowResult
from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    TextSelector,
    TextSelectorConfig,
)
import probatio as vol

from . import our_invite
from .const import (
    CONF_ADDRESSES,
    CONF_INVITE,
    CONF_JAIL,
    CONF_NAME,
    CONF_NODE_PUBLIC_KEY,
    CONF_PORT,
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    CONF_QUOTA_GB,
    GB,
    SUBENTRY_PEER,
)
from .engine import invite, node as engine_node
from .engine.errors import InvalidInvite
from .engine.identity import fingerprint
from .engine.node import Reachability
from .engine.replicator import PeerTarget
from .engine.storage import validate_peer_name

DEFAULT_QUOTA_GB = 100

QUOTA_SELECTOR = vol.All(
    NumberSelector(
        NumberSelectorConfig(
            min=1, max=100_000, step=1, mode=NumberSelectorMode.BOX, unit_of_measurement="GB"
        )
    ),
    vol.Coerce(int),
)


def jail_name(name: str, taken: set[str]) -> str:
    """A folder name on our disk for a new peer's data: its name, made safe and unique."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")[:48] or "peer"
    candidate, number = base, 2
    while candidate.casefold() in {t.casefold() for t in taken} or candidate == "":
        candidate = f"{base}-{number}"
        number += 1
    return validate_peer_name(candidate)


class PeerSubentryFlow(ConfigSubentryFlow):
    """Add or change a peer of this node."""

    def __init__(self) -> None:
        """Start with no invite read."""
        self._invite: invite.Invite | None = None
        self._quota_gb = DEFAULT_QUOTA_GB

    def _peer_subentries(self) -> list[Any]:
        return [
            sub
            for sub in self._get_entry().subentries.values()
            if sub.subentry_type == SUBENTRY_PEER
        ]

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Paste the friend's invite code."""
        errors: dict[str, str] = {}
        placeholders = {"reason": ""}
        entry = self._get_entry()
        if user_input is not None:
            try:
                parsed = invite.decode(user_input[CONF_INVITE])
            except InvalidInvite as err:
                errors[CONF_INVITE] = "invalid_invite"
                placeholders["reason"] = str(err)
            else:
                if parsed.public_key.split()[:2] == entry.data[CONF_NODE_PUBLIC_KEY].split()[:2]:
                    errors[CONF_INVITE] = "own_invite"
                elif any(sub.unique_id == parsed.fingerprint for sub in self._peer_subentries()):
                    return self.async_abort(reason="already_configured")
                else:
                    self._invite = parsed
                    return await self.async_step_confirm()
        return self.async_show_form(
            step_id="user",
            data_schema=vol.Schema(
                {vol.Required(CONF_INVITE): TextSelector(TextSelectorConfig(multiline=True))}
            ),
            errors=errors,
            description_placeholders=placeholders,
        )

    def _our_code(self) -> str:
        entry = self._get_entry()
        return our_invite.our_code(self.hass, dict(entry.data), dict(entry.options))

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Show who the code names, ask for the quota we grant, then test the connection."""
        assert self._invite is not None
        if user_input is not None and CONF_QUOTA_GB in user_input:
            self._quota_gb = int(user_input[CONF_QUOTA_GB])
            return await self._async_test()
        return self.async_show_form(
            step_id="confirm",
            data_schema=vol.Schema(
                {vol.Required(CONF_QUOTA_GB, default=self._quota_gb): QUOTA_SELECTOR}
            ),
            description_placeholders=self._placeholders(),
        )

    def _placeholders(self) -> dict[str, str]:
        assert self._invite is not None
        return {
            "name": self._invite.name,
            "addresses": ", ".join(self._invite.addresses),
            "fingerprint": self._invite.fingerprint,
            "our_code": self._our_code(),
        }

    async def _async_test(self) -> SubentryFlowResult:
        """Try the connection; show the outcome in its own words (creating is still allowed)."""
        assert self._invite is not None
        entry = self._get_entry()
        runtime = getattr(entry, "runtime_data", None)
        if runtime is None:
            return self._create()
        target = PeerTarget("test", self._invite.addresses, self._invite.public_key)
        result = await runtime.engine.run(engine_node.probe(runtime.node.identity, target))
        if result.status is Reachability.ONLINE:
            return self._create()
        placeholders = self._placeholders()
        placeholders["error"] = result.error or ""
        return self.async_show_form(
            step_id=f"tested_{result.status.value}",
            data_schema=vol.Schema({}),
            description_placeholders=placeholders,
        )

    async def async_step_tested_waiting(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """The friend has not added us yet: pair anyway; syncs start once they do."""
        return self._create()

    async def async_step_tested_unreachable(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """The friend's node did not answer: pair anyway; the connection is retried."""
        return self._create()

    async def async_step_tested_key_mismatch(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Another key answers there: pair the code's key (only it ever receives data)."""
        return self._create()

    def _create(self) -> SubentryFlowResult:
        assert self._invite is not None
        taken = {sub.data[CONF_JAIL] for sub in self._peer_subentries()}
        return self.async_create_entry(
            title=self._invite.name,
            data={
                CONF_NAME: self._invite.name,
                CONF_JAIL: jail_name(self._invite.name, taken),
                CONF_ADDRESSES: list(self._invite.addresses),
                CONF_PUBLIC_KEY: self._invite.public_key,
                CONF_QUOTA: self._quota_gb * GB,
            },
            unique_id=self._invite.fingerprint,
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Change a peer's addresses or the quota we grant it."""
        subentry = self._get_reconfigure_subentry()
        port = int(self._get_entry().data[CONF_PORT])
        errors: dict[str, str] = {}
        if user_input is not None:
            lines = [line for line in user_input[CONF_ADDRESSES].split() if line]
            try:
                addresses = [our_invite.with_port(line, port) for line in lines]
            except ValueError:
                errors[CONF_ADDRESSES] = "bad_address"
            else:
                if not addresses:
                    errors[CONF_ADDRESSES] = "bad_address"
                else:
                    return self.async_update_and_abort(
                        self._get_entry(),
                        subentry,
                        data={
                            **subentry.data,
                            CONF_ADDRESSES: addresses,
                            CONF_QUOTA: int(user_input[CONF_QUOTA_GB]) * GB,
                        },
                    )
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=vol.Schema(
                {
                    vol.Required(
                        CONF_ADDRESSES, default="\n".join(subentry.data[CONF_ADDRESSES])
                    ): TextSelector(TextSelectorConfig(multiline=True)),
                    vol.Required(
                        CONF_QUOTA_GB, default=max(1, int(subentry.data[CONF_QUOTA]) // GB)
                    ): QUOTA_SELECTOR,
                }
            ),
            errors=errors,
            description_placeholders={
                "name": subentry.title,
                "fingerprint": fingerprint(subentry.data[CONF_PUBLIC_KEY]),
            },
        )
