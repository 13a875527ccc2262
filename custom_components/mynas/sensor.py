"""Sensors: the node's disk, space and reach; each peer's space, contact, address; pairs."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import PERCENTAGE, EntityCategory, UnitOfInformation, UnitOfTime
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.typing import StateType
from homeassistant.util import dt as dt_util

from .const import CONF_NAME
from .coordinator import MyNasConfigEntry, NodeCoordinator, NodeData, SyncCoordinator
from .engine import JailUsage, Reachability
from .entity import (
    NodeEntity,
    PairEntity,
    PeerHostedEntity,
    PeerStatusEntity,
    ReachNodeEntity,
    ReachPeerEntity,
    add_per_pair,
    add_per_peer,
)
from .models import Encryption, ErrorKind, PairStatus, PeerStatus, SyncState
from .reach import CAUSES, UPNP_STATES, ReachCoordinator, ReachData

# Coordinator-driven: no per-entity polling to throttle.
PARALLEL_UPDATES = 0


def _data_size[D: SensorEntityDescription](description: D, *, quota: bool = False) -> D:
    """Make ``description`` a data-size sensor: bytes natively, shown in a unit that fits.

    A quota is granted in whole GB and shown so. Any other size gets the unit that fits its
    value when the entity is first registered (``fitting_unit``): 5 MB reads "5.0 MB", not
    "0.01 GB". Home Assistant keeps that unit afterwards; the user may pick another one.
    """
    return dataclasses.replace(
        description,
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.BYTES,
        suggested_unit_of_measurement=UnitOfInformation.GIGABYTES if quota else None,
        suggested_display_precision=0 if quota else 1,
    )


def fitting_unit(value: object) -> UnitOfInformation:
    """The unit a size in bytes reads best in (MB for nothing yet: sizes grow from there)."""
    size = value if isinstance(value, int | float) else 0
    if size >= 10**12:
        return UnitOfInformation.TERABYTES
    if size >= 10**9:
        return UnitOfInformation.GIGABYTES
    return UnitOfInformation.MEGABYTES


class _FittedSize(SensorEntity):
    """A data-size sensor whose suggested unit fits its value at registration."""

    def _fit_unit(self) -> None:
        description = self.entity_description
        if (
            description.device_class is SensorDeviceClass.DATA_SIZE
            and description.suggested_unit_of_measurement is None
        ):
            self._attr_suggested_unit_of_measurement = fitting_unit(self._value_now())

    def _value_now(self) -> object:
        """The value, or None when it cannot be read yet."""
        try:
            return self.native_value
        except KeyError, AttributeError, TypeError:
            return None


@dataclass(frozen=True, kw_only=True)
class NodeSensorDescription(SensorEntityDescription):
    """A node figure and how to read it."""

    value_fn: Callable[[NodeData], StateType]


NODE_SENSORS: tuple[NodeSensorDescription, ...] = (
    _data_size(
        NodeSensorDescription(
            key="disk_total",
            translation_key="disk_total",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda data: data.disk.total,
        )
    ),
    _data_size(
        NodeSensorDescription(
            key="disk_used",
            translation_key="disk_used",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda data: data.disk.used,
        )
    ),
    _data_size(
        NodeSensorDescription(
            key="disk_free",
            translation_key="disk_free",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda data: data.disk.free,
        )
    ),
    NodeSensorDescription(
        key="disk_used_percent",
        translation_key="disk_used_percent",
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=1,
        value_fn=lambda data: data.disk.percent,
    ),
    _data_size(
        NodeSensorDescription(
            key="hosted_total",
            translation_key="hosted_total",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda data: data.hosted_total,
        )
    ),
)


@dataclass(frozen=True, kw_only=True)
class HostedSensorDescription(SensorEntityDescription):
    """A figure about one peer's space on our disk."""

    value_fn: Callable[[JailUsage], StateType]


HOSTED_SENSORS: tuple[HostedSensorDescription, ...] = (
    _data_size(
        HostedSensorDescription(
            key="peer_used_here",
            translation_key="peer_used_here",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda usage: usage.used,
        )
    ),
    HostedSensorDescription(
        key="peer_quota_percent",
        translation_key="peer_quota_percent",
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=1,
        value_fn=lambda usage: round(100 * usage.used / usage.quota, 1) if usage.quota else None,
    ),
    _data_size(
        HostedSensorDescription(
            key="peer_quota",
            translation_key="peer_quota",
            entity_category=EntityCategory.DIAGNOSTIC,
            value_fn=lambda usage: usage.quota,
        ),
        quota=True,
    ),
)


@dataclass(frozen=True, kw_only=True)
class PeerSensorDescription(SensorEntityDescription):
    """A figure about a peer's contact with us."""

    value_fn: Callable[[PeerStatus], StateType | datetime]
    # Whether the figure holds now: what the peer told us stops holding once it does not answer.
    available_fn: Callable[[PeerStatus], bool] = lambda status: True


def _answers(status: PeerStatus) -> bool:
    return status.reachability is Reachability.ONLINE


PEER_SENSORS: tuple[PeerSensorDescription, ...] = (
    PeerSensorDescription(
        key="last_seen",
        translation_key="last_seen",
        device_class=SensorDeviceClass.TIMESTAMP,
        value_fn=lambda status: status.last_seen,
    ),
    _data_size(
        PeerSensorDescription(
            key="used_there",
            translation_key="used_there",
            state_class=SensorStateClass.MEASUREMENT,
            value_fn=lambda status: status.used_there,
            available_fn=_answers,
        )
    ),
    _data_size(
        PeerSensorDescription(
            key="quota_there",
            translation_key="quota_there",
            entity_category=EntityCategory.DIAGNOSTIC,
            value_fn=lambda status: status.quota_there,
            available_fn=_answers,
        ),
        quota=True,
    ),
)


def _complete(status: PairStatus) -> bool:
    """At rest after a sync that sent everything: the copy there is the folder as it was."""
    return (
        status.progress is None
        and status.state is SyncState.IDLE
        and status.last_success is not None
        and not status.last_error
    )


RUNNING = (SyncState.SCANNING, SyncState.TRANSFERRING, SyncState.VERIFYING)


def _running_or_complete(status: PairStatus) -> bool:
    """What a run's figures can speak of: a run under way, or a complete copy.

    After a failure, or before the first sync, there is no run and no complete copy: the
    figures have nothing to say and the entities are unavailable (the state and the last
    error say what is wrong), rather than "unknown".
    """
    return status.state in RUNNING or _complete(status)


def _progress(status: PairStatus) -> float | None:
    if status.progress is not None:
        return status.progress.percent  # None while the scan counts what there is
    return None if status.state in RUNNING else 100.0  # a run starting, or a complete copy


def _left(status: PairStatus, files: bool) -> int | None:
    progress = status.progress
    if progress is None:
        return None if status.state in RUNNING else 0  # a run starting, or a complete copy
    if files:
        return max(0, progress.files_total - progress.files_done)
    return max(0, progress.bytes_total - progress.bytes_done)


def _age_hours(status: PairStatus) -> float | None:
    if status.last_success is None:
        return None
    return round((dt_util.utcnow() - status.last_success).total_seconds() / 3600, 2)


@dataclass(frozen=True, kw_only=True)
class PairSensorDescription(SensorEntityDescription):
    """A figure about one folder × peer pair."""

    value_fn: Callable[[PairStatus], StateType | datetime]
    available_fn: Callable[[PairStatus], bool] = lambda status: True
    # Attributes for templates and cards, from the pair's status (and the pair's names).
    attrs_fn: Callable[[PairStatus, str, str], dict[str, Any]] | None = None


def _state_attributes(status: PairStatus, folder: str, peer: str) -> dict[str, Any]:
    """Which pair, and its last success: what a table of all backups needs."""
    return {"folder": folder, "peer": peer, "last_success": status.last_success}


def _verify_time(
    key: str, read: Callable[[PairStatus], datetime | None], **more: Any
) -> PairSensorDescription:
    """A diagnostic timestamp of the pair's verifies, available only while there is one."""
    return PairSensorDescription(
        key=key,
        translation_key=key,
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=read,
        available_fn=lambda status: read(status) is not None,
        **more,
    )


PAIR_SENSORS: tuple[PairSensorDescription, ...] = (
    PairSensorDescription(
        key="last_success",
        translation_key="last_success",
        device_class=SensorDeviceClass.TIMESTAMP,
        value_fn=lambda status: status.last_success,
    ),
    PairSensorDescription(
        key="last_sync_age",
        translation_key="last_sync_age",
        device_class=SensorDeviceClass.DURATION,
        state_class=SensorStateClass.MEASUREMENT,
        native_unit_of_measurement=UnitOfTime.HOURS,
        # No display precision: the frontend shows hours as "5h 12m" from the value itself
        # (with one decimal, a fresh backup read "0h").
        value_fn=_age_hours,
    ),
    PairSensorDescription(
        key="sync_state",
        translation_key="sync_state",
        device_class=SensorDeviceClass.ENUM,
        options=[state.value for state in SyncState],
        value_fn=lambda status: status.state.value,
        attrs_fn=_state_attributes,
    ),
    PairSensorDescription(
        key="progress",
        translation_key="progress",
        native_unit_of_measurement=PERCENTAGE,
        suggested_display_precision=0,
        value_fn=_progress,
        available_fn=_running_or_complete,
    ),
    PairSensorDescription(
        key="files_left",
        translation_key="files_left",
        # A measurement: it changes every second of a run, the logbook leaves it out.
        state_class=SensorStateClass.MEASUREMENT,
        entity_registry_enabled_default=False,
        value_fn=lambda status: _left(status, files=True),
        available_fn=_running_or_complete,
    ),
    _data_size(
        PairSensorDescription(
            key="bytes_left",
            translation_key="bytes_left",
            entity_registry_enabled_default=False,
            value_fn=lambda status: _left(status, files=False),
            available_fn=_running_or_complete,
        )
    ),
    PairSensorDescription(
        key="last_files_sent",
        translation_key="last_files_sent",
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda status: status.last_files_sent,
    ),
    _data_size(
        PairSensorDescription(
            key="last_bytes_sent",
            translation_key="last_bytes_sent",
            entity_category=EntityCategory.DIAGNOSTIC,
            entity_registry_enabled_default=False,
            value_fn=lambda status: status.last_bytes_sent,
        )
    ),
    PairSensorDescription(
        key="last_duration",
        translation_key="last_duration",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.SECONDS,
        suggested_display_precision=0,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda status: status.last_duration,
    ),
    PairSensorDescription(
        key="encryption",
        translation_key="encryption",
        # What a friend with access to that disk can read: nothing (encrypted), or all.
        device_class=SensorDeviceClass.ENUM,
        options=[kind.value for kind in Encryption],
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda status: status.encryption.value,
    ),
    # Never verified yet: nothing to say (the next verify's sensor says when).
    _verify_time(
        "last_verify",
        lambda status: status.last_verify,
        attrs_fn=lambda status, folder, peer: {
            "checked": status.last_verify_checked,
            "host_damaged": status.last_verify_damaged,
            "repaired": status.last_verify_repaired,
        },
    ),
    # Verifying turned off, or nothing copied yet to verify: none.
    _verify_time("next_verify", lambda status: status.next_verify),
    PairSensorDescription(
        key="last_error",
        translation_key="last_error",
        # What went wrong, in the household's words (translated); the engine's text, which
        # names addresses and errno, is the "details" attribute.
        device_class=SensorDeviceClass.ENUM,
        options=[kind.value for kind in ErrorKind],
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda status: status.last_error_kind.value if status.last_error_kind else None,
        # No error to tell: nothing to say (rather than "unknown").
        available_fn=lambda status: status.last_error_kind is not None,
        attrs_fn=lambda status, folder, peer: {"details": (status.last_error or "")[:1000]},
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MyNasConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the node's, every peer's and every pair's sensors."""
    runtime = entry.runtime_data
    async_add_entities(NodeSensor(runtime.node_data, desc) for desc in NODE_SENSORS)
    async_add_entities(ReachSensor(runtime.reach, desc) for desc in REACH_SENSORS)
    add_per_peer(
        entry,
        async_add_entities,
        lambda peer: [
            *(HostedSensor(runtime.node_data, peer, desc) for desc in HOSTED_SENSORS),
            *(PeerSensor(runtime.syncs, peer, desc) for desc in PEER_SENSORS),
            PeerAddressSensor(runtime.reach, peer),
        ],
    )
    add_per_pair(
        entry,
        async_add_entities,
        lambda folder, peer: [PairSensor(runtime.syncs, folder, peer, d) for d in PAIR_SENSORS],
    )


class NodeSensor(NodeEntity, _FittedSize):
    """A figure about the node's disk."""

    entity_description: NodeSensorDescription

    def __init__(self, coordinator: NodeCoordinator, description: NodeSensorDescription) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, description.key)
        self.entity_description = description
        self._fit_unit()

    @property
    def native_value(self) -> StateType:
        """The figure from the latest reading."""
        return self.entity_description.value_fn(self.coordinator.data)


class HostedSensor(PeerHostedEntity, _FittedSize):
    """A figure about the space one peer uses here."""

    entity_description: HostedSensorDescription

    def __init__(
        self,
        coordinator: NodeCoordinator,
        peer: ConfigSubentry,
        description: HostedSensorDescription,
    ) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, peer, description.key)
        self.entity_description = description
        self._fit_unit()

    @property
    def available(self) -> bool:
        """Available while the disk is, for a peer the server knows."""
        return super().available and self.peer_id in self.coordinator.data.hosted

    @property
    def native_value(self) -> StateType:
        """The figure from the latest reading."""
        return self.entity_description.value_fn(self.coordinator.data.hosted[self.peer_id])


class PeerSensor(PeerStatusEntity, _FittedSize):
    """A figure about a peer's contact."""

    entity_description: PeerSensorDescription

    def __init__(
        self,
        coordinator: SyncCoordinator,
        peer: ConfigSubentry,
        description: PeerSensorDescription,
    ) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, peer, description.key)
        self.entity_description = description
        self._fit_unit()

    @property
    def available(self) -> bool:
        """Available while the figure holds (space figures: while the peer answers)."""
        return super().available and self.entity_description.available_fn(self.status)

    @property
    def native_value(self) -> StateType | datetime:
        """The figure from the peer's status."""
        return self.entity_description.value_fn(self.status)


class PairSensor(PairEntity, _FittedSize):
    """A figure about one folder × peer pair."""

    entity_description: PairSensorDescription

    def __init__(
        self,
        coordinator: SyncCoordinator,
        folder: ConfigSubentry,
        peer: ConfigSubentry,
        description: PairSensorDescription,
    ) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, folder, peer, description.key)
        self.entity_description = description
        self._fit_unit()
        self._names = (str(folder.data.get(CONF_NAME, folder.title)), peer.title)

    @property
    def extra_state_attributes(self) -> dict[str, Any] | None:
        """Which pair this is (the state sensor), or the error's details (the last error)."""
        attrs_fn = self.entity_description.attrs_fn
        return attrs_fn(self.status, *self._names) if attrs_fn else None

    @property
    def available(self) -> bool:
        """Available while the figure has something to say."""
        return super().available and self.entity_description.available_fn(self.status)

    @property
    def native_value(self) -> StateType | datetime:
        """The figure from the pair's status."""
        return self.entity_description.value_fn(self.status)


# --- reachability ------------------------------------------------------------------------------


def _when(seconds: object) -> str | None:
    """An engine time (seconds since the epoch) as ISO 8601, for an attribute."""
    if not isinstance(seconds, int | float):
        return None
    return dt_util.utc_from_timestamp(seconds).isoformat()


@dataclass(frozen=True, kw_only=True)
class ReachSensorDescription(SensorEntityDescription):
    """A figure about whether friends can reach us, and its details."""

    value_fn: Callable[[ReachData], StateType]
    attributes_fn: Callable[[ReachData], dict[str, Any]]


def _report_attributes(data: ReachData) -> dict[str, Any]:
    report = data.report
    if report is None:
        return {}
    return {
        "checked_at": _when(report.get("at")),
        "addresses": report.get("addresses", []),
        "lan_address": report.get("lan_address"),
        "seen_from": report.get("seen_from", []),
        "answered_by": report.get("answered_by", []),
        "port": report.get("port"),
        "not_checked_by": sorted(report.get("errors", {})),
    }


def _upnp_attributes(data: ReachData) -> dict[str, Any]:
    upnp = data.upnp
    if upnp is None:
        return {}
    return {
        "external_address": upnp.get("external_address"),
        "lan_address": upnp.get("lan_address"),
        "error": upnp.get("error"),
        "renewed_at": _when(upnp.get("renewed_at")),
        "protocol": upnp.get("protocol"),
    }


def _cause(report: dict[str, Any] | None) -> str:
    cause = str(report["cause"]) if report else "not_checked"
    return cause if cause in CAUSES else "not_checked"


REACH_SENSORS: tuple[ReachSensorDescription, ...] = (
    ReachSensorDescription(
        key="reachability",
        translation_key="reachability",
        device_class=SensorDeviceClass.ENUM,
        options=list(CAUSES),
        value_fn=lambda data: _cause(data.report),
        attributes_fn=_report_attributes,
    ),
    ReachSensorDescription(
        key="upnp",
        translation_key="upnp",
        device_class=SensorDeviceClass.ENUM,
        options=list(UPNP_STATES),
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda data: str(data.upnp["status"]) if data.upnp else "off",
        attributes_fn=_upnp_attributes,
    ),
)


class ReachSensor(ReachNodeEntity, SensorEntity):
    """Whether friends can reach this node (the last check), or how port mapping fared."""

    entity_description: ReachSensorDescription

    def __init__(self, coordinator: ReachCoordinator, description: ReachSensorDescription) -> None:
        """Create the sensor for ``description``."""
        super().__init__(coordinator, description.key)
        self.entity_description = description

    @property
    def native_value(self) -> StateType:
        """The verdict."""
        return self.entity_description.value_fn(self.coordinator.data)

    @property
    def extra_state_attributes(self) -> dict[str, Any]:
        """What the verdict rests on."""
        return self.entity_description.attributes_fn(self.coordinator.data)


class PeerAddressSensor(ReachPeerEntity, SensorEntity):
    """Where we last reached a peer, since when, and every address we know for it."""

    _attr_translation_key = "peer_address"

    def __init__(self, coordinator: ReachCoordinator, peer: ConfigSubentry) -> None:
        """Create the peer's address sensor."""
        super().__init__(coordinator, peer, "peer_address")

    @property
    def _view(self) -> dict[str, Any]:
        return self.coordinator.data.peers.get(self.peer_id) or {}

    @property
    def native_value(self) -> StateType:
        """The address in use (the last one that answered)."""
        in_use = self._view.get("in_use")
        return str(in_use["address"])[:255] if in_use else None

    @property
    def extra_state_attributes(self) -> dict[str, Any]:
        """Since when, and the typed, learned (with since when) and hinted addresses."""
        view = self._view
        in_use = view.get("in_use")
        hint = view.get("hint")
        return {
            "since": _when(in_use["since"]) if in_use else None,
            "typed": view.get("typed", []),
            "learned": [
                {"address": seen["address"], "since": _when(seen["since"])}
                for seen in view.get("learned", [])
            ],
            "connected_from": hint["address"] if hint else None,
        }
