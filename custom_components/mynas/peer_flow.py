"""Pairing a peer: paste the friend's invite code, check it, grant a quota, test, done.

Both keys end up pinned with no trust-on-first-use: the friend's key comes from their code,
and they pin ours from the code this flow shows to send back.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import (
    ConfigEntryState,
    ConfigSubentry,
    ConfigSubentryFlow,
    SubentryFlowResult,
)
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
    CONF_PUBLIC_KEY,
    CONF_QUOTA,
    CONF_QUOTA_GB,
    CONF_STORAGE_ROOT,
    DEFAULT_PORT,
    GB,
    SUBENTRY_PEER,
)
from .engine import (
    MAX_ADDRESSES,
    InvalidInvite,
    Invite,
    ProbeResult,
    Reachability,
    decode_invite,
    fingerprint,
    names_on_disk,
    parse_address,
    validate_peer_name,
)

if TYPE_CHECKING:
    from .coordinator import MyNasRuntimeData

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
    folded = {t.casefold() for t in taken}
    candidate, number = base, 2
    while candidate.casefold() in folded:
        candidate = f"{base}-{number}"
        number += 1
    return validate_peer_name(candidate)


def peer_port(addresses: list[str]) -> int:
    """The port of a peer's first address (what a bare host typed for it gets)."""
    return parse_address(addresses[0])[1] if addresses else DEFAULT_PORT


def check_addresses(text: str | None, port: int) -> tuple[list[str], str | None]:
    """A peer's typed addresses as ``host:port`` (``port`` where missing), or an error key."""
    try:
        addresses = our_invite.canonical_addresses(text, port)
    except ValueError:
        return [], "bad_address"
    if not addresses:
        return [], "no_address"
    if len(addresses) > MAX_ADDRESSES:
        return [], "too_many_addresses"
    return addresses, None


class PeerSubentryFlow(ConfigSubentryFlow):
    """Add or change a peer of this node."""

    def __init__(self) -> None:
        """Start with no invite read."""
        self._invite: Invite | None = None
        self._quota_gb = DEFAULT_QUOTA_GB
        self._test: asyncio.Task[ProbeResult] | None = None
        self._test_error = ""
        self._online = False

    def _peer_subentries(self) -> list[ConfigSubentry]:
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
                parsed = decode_invite(user_input[CONF_INVITE])
            except InvalidInvite as err:
                errors[CONF_INVITE] = "invalid_invite"
                placeholders["reason"] = str(err)
            else:
                if parsed.public_key.split()[:2] == entry.data[CONF_NODE_PUBLIC_KEY].split()[:2]:
                    errors[CONF_INVITE] = "own_invite"
                elif any(
                    sub.unique_id == parsed.fingerprint
                    or sub.data[CONF_PUBLIC_KEY] == parsed.public_key
                    for sub in self._peer_subentries()
                ):
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
        if user_input is not None:
            self._quota_gb = int(user_input[CONF_QUOTA_GB])
            return await self.async_step_test()
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

    async def async_step_test(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Try the connection (a spinner shows meanwhile); then say how it went."""
        assert self._invite is not None
        entry = self._get_entry()
        if self._online or entry.state is not ConfigEntryState.LOADED:
            # Online: the friend already added us. Not loaded: the node (its disk may be
            # away) is not running to test from; pair now, the node tests once it runs.
            return await self._async_create()
        if self._test is None:
            self._test = self.hass.async_create_task(
                self._probe(entry.runtime_data), "mynas pairing test", eager_start=False
            )
        if not self._test.done():
            return self.async_show_progress(
                step_id="test",
                progress_action="connection_test",
                progress_task=self._test,
                description_placeholders={
                    "name": self._invite.name,
                    "addresses": ", ".join(self._invite.addresses),
                },
            )
        if self._test.cancelled():  # the node stopped under the test
            result = ProbeResult(Reachability.UNREACHABLE, error="the test was interrupted")
        else:
            result = self._test.result()
        self._test = None
        self._test_error = result.error or ""
        if result.status is Reachability.ONLINE:
            self._online = True
            return self.async_show_progress_done(next_step_id="test")
        return self.async_show_progress_done(next_step_id=f"tested_{result.status.value}")

    async def _probe(self, runtime: MyNasRuntimeData) -> ProbeResult:
        assert self._invite is not None
        try:
            return await runtime.node.probe_unpaired(
                self._invite.addresses, self._invite.public_key
            )
        except Exception as err:  # an engine failure is a failed test, not a broken flow
            return ProbeResult(Reachability.UNREACHABLE, error=str(err) or type(err).__name__)

    async def _outcome(self, step_id: str, user_input: dict[str, Any] | None) -> SubentryFlowResult:
        if user_input is not None:
            return await self._async_create()
        placeholders = self._placeholders()
        placeholders["error"] = self._test_error
        return self.async_show_form(
            step_id=step_id, data_schema=vol.Schema({}), description_placeholders=placeholders
        )

    async def async_step_tested_waiting(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """The friend has not added us yet: pair anyway; syncs start once they do."""
        return await self._outcome("tested_waiting", user_input)

    async def async_step_tested_unreachable(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """The friend's node did not answer: pair anyway; the connection is retried."""
        return await self._outcome("tested_unreachable", user_input)

    async def async_step_tested_key_mismatch(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Another key answers there: pair the code's key (only it ever receives data)."""
        return await self._outcome("tested_key_mismatch", user_input)

    async def _async_create(self) -> SubentryFlowResult:
        """Create the peer."""
        assert self._invite is not None
        taken = await self.hass.async_add_executor_job(
            names_on_disk, self._get_entry().data[CONF_STORAGE_ROOT]
        )
        taken |= {sub.data[CONF_JAIL] for sub in self._peer_subentries()}
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
        # A bare host gets the peer's port (from its code), not ours.
        port = peer_port(list(subentry.data[CONF_ADDRESSES]))
        errors: dict[str, str] = {}
        if user_input is not None:
            addresses, problem = check_addresses(user_input[CONF_ADDRESSES], port)
            if problem:
                errors[CONF_ADDRESSES] = problem
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
        if user_input is None:
            typed = "\n".join(subentry.data[CONF_ADDRESSES])
            quota_gb = max(1, int(subentry.data[CONF_QUOTA]) // GB)
        else:  # show the answers again with the error: nothing typed is lost
            typed, quota_gb = user_input[CONF_ADDRESSES], user_input[CONF_QUOTA_GB]
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_ADDRESSES, default=typed): TextSelector(
                        TextSelectorConfig(multiline=True)
                    ),
                    vol.Required(CONF_QUOTA_GB, default=quota_gb): QUOTA_SELECTOR,
                }
            ),
            errors=errors,
            description_placeholders={
                "name": subentry.title,
                "fingerprint": fingerprint(subentry.data[CONF_PUBLIC_KEY]),
                "port": str(port),
            },
        )
