"""Protecting a folder: which local directory, on which peers, when, and how.

Two steps, as Home Assistant's own flows ask them: what and where (the folder, picked from
those found on the backup disk or typed, the peers, encryption, the retention and limits),
then when (a menu: daily at a time, or every few hours, and only the field that kind needs).

Encryption is chosen once, when the folder is set up (on by default). Changing the folder
does not offer it: an encrypted folder's copies never become readable again, and a plain
one (set up before encryption existed, or by choice) is converted through its repair issue
(``repairs.ConvertFlow``), which re-sends every copy encrypted before the plain one goes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    ConfigSubentryFlow,
    SubentryFlowResult,
)
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
    TimeSelector,
    TimeSelectorConfig,
    make_selector_config_schema,
)
import probatio as vol

from .const import (
    CONF_BWLIMIT,
    CONF_ENCRYPTED,
    CONF_EXCLUDE,
    CONF_HOURS,
    CONF_NAME,
    CONF_PATH,
    CONF_PEERS,
    CONF_RETENTION_DAYS,
    CONF_SCHEDULE,
    CONF_STORAGE_ROOT,
    CONF_TIME,
    CONF_WATCH,
    CONF_WATCH_MINUTES,
    DEFAULT_INTERVAL_HOURS,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_WATCH_MINUTES,
    SCHEDULE_DAILY,
    SCHEDULE_INTERVAL,
    SUBENTRY_FOLDER,
    SUBENTRY_PEER,
)
from .engine import check_folder_name
from .schedule import night_time

# At most this many folders found on the disk are offered (a typed path is always possible).
MAX_OFFERED = 50


class TimeWithoutSeconds(TimeSelector):
    """The time selector, shown without its seconds field (the frontend's ``no_second``).

    Home Assistant's frontend reads ``no_second``; its Python selector does not list it yet.
    """

    CONFIG_SCHEMA = make_selector_config_schema({vol.Optional("no_second"): bool})

    def __init__(self) -> None:
        """Hours and minutes only."""
        super().__init__(cast("TimeSelectorConfig", {"no_second": True}))


def check_local_folder(path: str, storage_root: str) -> str | None:
    """Return an error key for a folder to protect, or None when it is fine (blocking)."""
    folder = Path(path)
    if not folder.is_absolute():
        return "not_absolute"
    if not folder.exists():
        return "not_found"
    if not folder.is_dir():
        return "not_a_directory"
    if not os.access(folder, os.R_OK | os.X_OK):
        return "not_readable"
    real = folder.resolve()
    root = Path(storage_root).resolve()
    # The storage root itself holds what friends store here: backing that up to them again
    # would loop. The household's own folders may sit beside it on the same disk.
    if real == root or root in real.parents or real in root.parents:
        return "inside_storage"
    return None


def folders_on_disk(storage_root: str, config_dir: str | None = None) -> list[str]:
    """Folders beside the storage root (two levels down), to offer for protection (blocking).

    The storage root sits on the backup disk, beside the household's own folders (a Time
    Machine share, File History, photos): those are what there is to protect. Hidden
    folders, the storage root and what holds it, and Home Assistant's own configuration
    (which Home Assistant's backups keep) are left out.
    """
    disk = Path(storage_root).resolve().parent
    config = Path(config_dir).resolve() if config_dir else None
    found: list[str] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            children = sorted(folder.iterdir(), key=lambda path: path.name.casefold())
        except OSError:
            return
        for child in children:
            if len(found) >= MAX_OFFERED:
                return
            if child.name.startswith(".") or child.name == "lost+found" or child.is_symlink():
                continue
            if not child.is_dir():
                continue
            if config is not None and (child == config or config in child.parents):
                continue
            if check_local_folder(str(child), storage_root) is None:
                found.append(str(child))
                if depth < 2:
                    visit(child, depth + 1)

    visit(disk, 1)
    return found


def _number(minimum: float, maximum: float, unit: str, step: float = 1) -> Any:
    return vol.All(
        NumberSelector(
            NumberSelectorConfig(
                min=minimum,
                max=maximum,
                step=step,
                mode=NumberSelectorMode.BOX,
                unit_of_measurement=unit,
            )
        ),
        vol.Coerce(float if step < 1 else int),
    )


def _normalize(path: str) -> str:
    return os.path.normpath(path)  # pure string work, no I/O


class FolderSubentryFlow(ConfigSubentryFlow):
    """Add or change a protected folder."""

    def __init__(self) -> None:
        """Start with nothing answered."""
        # What the first step settled (and, when changing a folder, what it was).
        self._data: dict[str, Any] = {}

    def _peer_options(self) -> list[SelectOptionDict]:
        return [
            SelectOptionDict(value=sub.subentry_id, label=sub.title)
            for sub in self._get_entry().subentries.values()
            if sub.subentry_type == SUBENTRY_PEER
        ]

    async def _schema(self, defaults: dict[str, Any], *, with_name: bool) -> vol.Schema:
        peer_options = self._peer_options()
        # A peer removed since the folder was set up is no longer offered (nor preselected).
        known = {option["value"] for option in peer_options}
        if CONF_PEERS in defaults:
            peers = [peer for peer in defaults[CONF_PEERS] or [] if peer in known]
        else:  # a new folder: with one friend, it is the one to copy to
            peers = list(known) if len(known) == 1 else []
        exclude = defaults.get(CONF_EXCLUDE) or ""
        if not isinstance(exclude, str):  # stored as a list, typed as lines
            exclude = "\n".join(exclude)
        path = defaults.get(CONF_PATH, "")
        found = await self.hass.async_add_executor_job(
            folders_on_disk, self._get_entry().data[CONF_STORAGE_ROOT], self.hass.config.config_dir
        )
        if path and path not in found:
            found.insert(0, path)
        fields: dict[Any, Any] = {}
        if with_name:
            fields[vol.Required(CONF_NAME, default=defaults.get(CONF_NAME, ""))] = TextSelector()
        encryption: dict[Any, Any] = {}
        if with_name:  # chosen once: a new folder's copies are encrypted unless asked otherwise
            encryption[vol.Required(CONF_ENCRYPTED, default=defaults.get(CONF_ENCRYPTED, True))] = (
                BooleanSelector()
            )
        fields.update(
            {
                # The folders found on the disk, or any path typed in.
                vol.Required(CONF_PATH, default=path): SelectSelector(
                    SelectSelectorConfig(
                        options=found, custom_value=True, mode=SelectSelectorMode.DROPDOWN
                    )
                ),
                vol.Required(CONF_PEERS, default=peers): SelectSelector(
                    SelectSelectorConfig(
                        options=peer_options,
                        multiple=True,
                        mode=SelectSelectorMode.LIST,
                    )
                ),
                **encryption,
                vol.Required(
                    # New folders are watched; one set up before the option existed is not
                    # until its owner says so here.
                    CONF_WATCH,
                    default=defaults.get(CONF_WATCH, with_name),
                ): BooleanSelector(),
                vol.Required(
                    CONF_WATCH_MINUTES,
                    default=defaults.get(CONF_WATCH_MINUTES, DEFAULT_WATCH_MINUTES),
                ): _number(1, 24 * 60, "min"),
                vol.Required(
                    CONF_RETENTION_DAYS,
                    default=defaults.get(CONF_RETENTION_DAYS, DEFAULT_RETENTION_DAYS),
                ): _number(1, 3650, "d"),
                vol.Required(CONF_BWLIMIT, default=defaults.get(CONF_BWLIMIT, 0)): _number(
                    0, 10_000, "MB/s", step=0.1
                ),
                vol.Optional(CONF_EXCLUDE, description={"suggested_value": exclude}): (
                    TextSelector(TextSelectorConfig(multiline=True))
                ),
            }
        )
        return vol.Schema(fields)

    async def _validate(self, user_input: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Check the first step's answers; return them as subentry data, and errors."""
        errors: dict[str, str] = {}
        path = user_input[CONF_PATH].strip()
        storage = self._get_entry().data[CONF_STORAGE_ROOT]
        problem = await self.hass.async_add_executor_job(check_local_folder, path, storage)
        if problem:
            errors[CONF_PATH] = problem
        if not user_input.get(CONF_PEERS):
            errors[CONF_PEERS] = "no_peer_selected"
        exclude = [line.strip() for line in (user_input.get(CONF_EXCLUDE) or "").splitlines()]
        data = {
            CONF_PATH: _normalize(path) if not problem else path,
            CONF_PEERS: list(user_input.get(CONF_PEERS) or []),
            CONF_WATCH: bool(user_input[CONF_WATCH]),
            CONF_WATCH_MINUTES: int(user_input[CONF_WATCH_MINUTES]),
            CONF_RETENTION_DAYS: int(user_input[CONF_RETENTION_DAYS]),
            CONF_BWLIMIT: float(user_input[CONF_BWLIMIT]),
            CONF_EXCLUDE: [line for line in exclude if line],
        }
        return data, errors

    def _name_error(self, name: str) -> str | None:
        try:
            check_folder_name(name)
        except ValueError:
            return "bad_folder_name"
        # Names differing only in case would share a replica on many disks (exFAT).
        if any(
            sub.subentry_type == SUBENTRY_FOLDER
            and str(sub.data[CONF_NAME]).casefold() == name.casefold()
            for sub in self._get_entry().subentries.values()
        ):
            return "name_taken"
        return None

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Describe the folder to protect; then, when."""
        if not self._peer_options():
            return self.async_abort(reason="no_peers")
        errors: dict[str, str] = {}
        if user_input is not None:
            name = user_input[CONF_NAME].strip()
            data, errors = await self._validate(user_input)
            if problem := self._name_error(name):
                errors[CONF_NAME] = problem
            if not errors:
                encrypted = bool(user_input.get(CONF_ENCRYPTED, True))
                self._data = {CONF_NAME: name, **data, CONF_ENCRYPTED: encrypted}
                return await self.async_step_schedule()
        return self.async_show_form(
            step_id="user",
            data_schema=await self._schema(user_input or {}, with_name=True),
            errors=errors,
            last_step=False,  # "Next": when comes after
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Change everything but the name (the name is where the replica lives on hosts).

        Nor encryption: an encrypted folder stays so, a plain one is converted from its
        repair issue (the text says so).
        """
        subentry = self._get_reconfigure_subentry()
        errors: dict[str, str] = {}
        if user_input is not None:
            data, errors = await self._validate(user_input)
            if not errors:
                self._data = {**subentry.data, **data}
                return await self.async_step_schedule()
        defaults = dict(subentry.data) if user_input is None else user_input
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=await self._schema(defaults, with_name=False),
            errors=errors,
            description_placeholders={"name": subentry.title},
            last_step=False,
        )

    async def async_step_schedule(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """When: daily at a time, or every few hours."""
        return self.async_show_menu(
            step_id="schedule",
            menu_options=[SCHEDULE_DAILY, SCHEDULE_INTERVAL],
            description_placeholders={"name": self._data[CONF_NAME]},
        )

    async def async_step_daily(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """At which time of day (by default a time at night, spread between nodes)."""
        if user_input is not None:
            # The selector accepted it already; store it in one spelling (03:15:00).
            at = cv.time(user_input[CONF_TIME]).strftime("%H:%M:%S")
            return self._finish(SCHEDULE_DAILY, time=at)
        return self.async_show_form(
            step_id="daily",
            data_schema=vol.Schema(
                {
                    vol.Required(
                        CONF_TIME, default=self._data.get(CONF_TIME) or night_time()
                    ): TimeWithoutSeconds()
                }
            ),
            description_placeholders={"name": self._data[CONF_NAME]},
        )

    async def async_step_interval(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """How many hours apart."""
        if user_input is not None:
            return self._finish(SCHEDULE_INTERVAL, hours=int(user_input[CONF_HOURS]))
        return self.async_show_form(
            step_id="interval",
            data_schema=vol.Schema(
                {
                    vol.Required(
                        CONF_HOURS, default=self._data.get(CONF_HOURS, DEFAULT_INTERVAL_HOURS)
                    ): _number(1, 24 * 7, "h")
                }
            ),
            description_placeholders={"name": self._data[CONF_NAME]},
        )

    def _finish(self, kind: str, **when: Any) -> SubentryFlowResult:
        """Create the folder, or save the change (the other kind's setting is kept)."""
        data = {
            CONF_TIME: night_time(),
            CONF_HOURS: DEFAULT_INTERVAL_HOURS,
            **self._data,
            CONF_SCHEDULE: kind,
            **when,
        }
        if self.source == SOURCE_RECONFIGURE:
            return self.async_update_and_abort(
                self._get_entry(), self._get_reconfigure_subentry(), data=data
            )
        name = data[CONF_NAME]
        return self.async_create_entry(title=name, data=data, unique_id=name)
