"""The node's port mapped on the router: UPnP first, then NAT-PMP; kept while the node runs.

``RouterMapper`` drives the two protocols' mappers (``upnp.PortMapper``,
``natpmp.NatPmpMapper``) and offers what the node uses of one: ``start``, ``stop``,
``state`` and ``on_change``. UPnP is asked first: it is what most home routers speak, and
a router that speaks both (miniupnpd) makes the same mapping either way. When no UPnP
router answers, or it refuses, the default gateway is asked over NAT-PMP (Apple's routers,
many ISP boxes). Once a protocol has mapped the port, renewals (at half the lease the router
granted) go to it alone; when one fails, both are asked again. When neither maps the port,
the state says the most useful of their answers: a refusal (the router is there, and says
no) before "no router". ``state.protocol`` says which protocol the state comes from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, replace
import logging

from .natpmp import NatPmpMapper
from .upnp import MapState, MapStatus, PortMapper

_LOGGER = logging.getLogger(__name__)


@dataclass(eq=False)
class RouterMapper:
    """Keeps ``upnp``'s or ``natpmp``'s mapping of our port for as long as it runs."""

    upnp: PortMapper
    natpmp: NatPmpMapper
    _: KW_ONLY
    # After a failure (no router, refused), try again this often (None: as ``upnp`` does).
    retry_every: float | None = None
    on_change: Callable[[MapState], None] | None = None
    state: MapState = field(default_factory=MapState, init=False)
    _active: PortMapper | NatPmpMapper | None = field(default=None, init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        """Begin mapping (and renewing) in a task of its own."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mynas-port-mapping")

    async def stop(self) -> None:
        """Stop renewing and remove the mapping from the router (if one was made)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.upnp.stop()
        await self.natpmp.stop()
        self._active = None
        if self.state.status is MapStatus.MAPPED:
            self._set(replace(self.state, status=MapStatus.PENDING, renewed_at=None))

    async def _run(self) -> None:
        while True:
            try:
                await self.map_once()
            except Exception:
                _LOGGER.exception("Port mapping failed")
                self._set(MapState(MapStatus.REFUSED, error="unexpected error"))
            state, retry = self.state, self.retry_every or self.upnp.retry_every
            if state.status is MapStatus.MAPPED:
                # A permanent lease (0) is still renewed now and then: routers forget.
                await asyncio.sleep(state.lease / 2 if state.lease else retry)
            else:
                await asyncio.sleep(retry)

    async def map_once(self) -> MapState:
        """Renew the mapping we have, or ask UPnP, then NAT-PMP, for one."""
        order: list[tuple[str, PortMapper | NatPmpMapper]] = [
            ("upnp", self.upnp),
            ("natpmp", self.natpmp),
        ]
        if self._active is self.natpmp:
            order.reverse()  # a renewal goes where the mapping is
        answers: list[MapState] = []
        for protocol, mapper in order:
            state = replace(await mapper.map_once(), protocol=protocol)
            if state.status is MapStatus.MAPPED:
                self._active = mapper
                return self._set(state)
            answers.append(state)
        self._active = None
        return self._set(_best(answers))

    def _set(self, state: MapState) -> MapState:
        changed = state != self.state
        self.state = state
        if changed:
            _LOGGER.info("Port mapping: %s (%s)", state.status, state.protocol)
            if self.on_change is not None:
                self.on_change(state)
        return state


def _best(answers: list[MapState]) -> MapState:
    """What to show when no protocol mapped the port: a refusal first, else "no router"."""
    for answer in answers:
        if answer.status is MapStatus.REFUSED:
            return answer
    errors = "; ".join(f"{answer.protocol}: {answer.error}" for answer in answers if answer.error)
    return MapState(MapStatus.NO_ROUTER, error=errors or "no router answered")
