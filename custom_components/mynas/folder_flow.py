"""Protecting a folder: which local directory, on which peers, when, and how."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from homeassistant.config_entries import ConfigSubentryFlow, SubentryFlowResult
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
)
import probatio as vol

from .const import (
    CONF_BWLIMIT,
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

    def _peer_options(self) -> list[SelectOptionDict]:
        return [
            SelectOptionDict(value=sub.subentry_id, label=sub.title)
            for sub in self._get_entry().subentries.values()
            if sub.subentry_type == SUBENTRY_PEER
        ]

    def _schema(self, defaults: dict[str, Any], *, with_name: bool) -> vol.Schema:
        peer_options = self._peer_options()
        # A peer removed since the folder was set up is no longer offered (nor preselected).
        known = {option["value"] for option in peer_options}
        peers = [peer for peer in defaults.get(CONF_PEERS) or [] if peer in known]
        exclude = defaults.get(CONF_EXCLUDE) or ""
        if not isinstance(exclude, str):  # stored as a list, typed as lines
            exclude = "\n".join(exclude)
        fields: dict[Any, Any] = {}
        if with_name:
            fields[vol.Required(CONF_NAME, default=defaults.get(CONF_NAME, ""))] = TextSelector()
        fields.update(
            {
                vol.Required(CONF_PATH, default=defaults.get(CONF_PATH, "")): TextSelector(),
                vol.Required(CONF_PEERS, default=peers): SelectSelector(
                    SelectSelectorConfig(
                        options=peer_options,
                        multiple=True,
                        mode=SelectSelectorMode.LIST,
                    )
                ),
                vol.Required(
                    CONF_SCHEDULE, default=defaults.get(CONF_SCHEDULE, SCHEDULE_DAILY)
                ): SelectSelector(
                    SelectSelectorConfig(
                        options=[SCHEDULE_DAILY, SCHEDULE_INTERVAL],
                        translation_key=CONF_SCHEDULE,
                    )
                ),
                vol.Required(CONF_TIME, default=defaults.get(CONF_TIME) or night_time()): (
                    TimeSelector()
                ),
                vol.Required(
                    CONF_HOURS, default=defaults.get(CONF_HOURS, DEFAULT_INTERVAL_HOURS)
                ): _number(1, 24 * 7, "h"),
                # New folders are watched; one set up before the option existed is not
                # until its owner says so here.
                vol.Required(CONF_WATCH, default=defaults.get(CONF_WATCH, with_name)): (
                    BooleanSelector()
                ),
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
        """Check the answers; return the subentry data (without the name) and errors."""
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
            CONF_SCHEDULE: user_input[CONF_SCHEDULE],
            # The time selector accepted it already; store it in one spelling (03:15:00).
            CONF_TIME: cv.time(user_input[CONF_TIME]).strftime("%H:%M:%S"),
            CONF_HOURS: int(user_input[CONF_HOURS]),
            CONF_WATCH: bool(user_input[CONF_WATCH]),
            CONF_WATCH_MINUTES: int(user_input[CONF_WATCH_MINUTES]),
            CONF_RETENTION_DAYS: int(user_input[CONF_RETENTION_DAYS]),
            CONF_BWLIMIT: float(user_input[CONF_BWLIMIT]),
            CONF_EXCLUDE: [line for line in exclude if line],
        }
        return data, errors

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Describe the folder to protect."""
        if not self._peer_options():
            return self.async_abort(reason="no_peers")
        errors: dict[str, str] = {}
        if user_input is not None:
            name = user_input[CONF_NAME].strip()
            data, errors = await self._validate(user_input)
            try:
                check_folder_name(name)
            except ValueError:
                errors[CONF_NAME] = "bad_folder_name"
            else:
                # Names differing only in case would share a replica on many disks (exFAT).
                if any(
                    sub.subentry_type == SUBENTRY_FOLDER
                    and str(sub.data[CONF_NAME]).casefold() == name.casefold()
                    for sub in self._get_entry().subentries.values()
                ):
                    errors[CONF_NAME] = "name_taken"
            if not errors:
                return self.async_create_entry(
                    title=name, data={CONF_NAME: name, **data}, unique_id=name
                )
        return self.async_show_form(
            step_id="user",
            data_schema=self._schema(user_input or {}, with_name=True),
            errors=errors,
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Change everything but the name (the name is where the replica lives on hosts)."""
        subentry = self._get_reconfigure_subentry()
        errors: dict[str, str] = {}
        if user_input is not None:
            data, errors = await self._validate(user_input)
            if not errors:
                return self.async_update_and_abort(
                    self._get_entry(), subentry, data={**subentry.data, **data}
                )
        defaults = dict(subentry.data) if user_input is None else user_input
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=self._schema(defaults, with_name=False),
            errors=errors,
            description_placeholders={"name": subentry.title},
        )
