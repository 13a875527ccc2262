"""The automation blueprints and the dashboard: valid for Home Assistant, and naming only what
MyNAS really provides (entity ids from its naming scheme, its services, its event's fields).

Fast and offline: blueprints go through Home Assistant's own blueprint schema and automation
validation, templates are rendered by Home Assistant's template engine.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import timedelta
import json
from pathlib import Path
from typing import Any

from homeassistant.components.automation.config import (
    AUTOMATION_BLUEPRINT_SCHEMA,
    async_validate_config_item,
)
from homeassistant.components.blueprint import importer
from homeassistant.components.blueprint.models import Blueprint, BlueprintInputs
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.template import Template
from homeassistant.util import dt as dt_util, slugify, yaml as yaml_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
import yaml

from custom_components.mynas import binary_sensor, button, sensor
from custom_components.mynas.const import DOMAIN, EVENT_SYNC_FINISHED

ROOT = Path(__file__).parent.parent
BLUEPRINTS = ROOT / "blueprints" / "automation" / "mynas"
DASHBOARD = ROOT / "dashboards" / "mynas.yaml"
# The same dashboard in French: the same cards and entities, French words.
DASHBOARDS = [DASHBOARD, ROOT / "dashboards" / "mynas.fr.yaml"]
INTEGRATION = ROOT / "custom_components" / "mynas"
EN = json.loads((INTEGRATION / "translations" / "en.json").read_text())
SERVICES = yaml.safe_load((INTEGRATION / "services.yaml").read_text())
REPO_URL = "https://github.com/mynas-network/mynas"
# The demo's names (scripts/demo): the dashboard is written for Alice's node.
NODE, PEER, FOLDER = "Alice", "Bob", "Family"


def load_blueprint(name: str) -> Blueprint:
    path = BLUEPRINTS / name
    return Blueprint(
        yaml_util.load_yaml(path),
        path=str(path),
        expected_domain="automation",
        schema=AUTOMATION_BLUEPRINT_SCHEMA,
    )


def substitute(blueprint: Blueprint, inputs: dict[str, Any]) -> dict[str, Any]:
    """The automation a user gets from ``blueprint`` with ``inputs`` (defaults filled in)."""
    instance = BlueprintInputs(
        blueprint, {"use_blueprint": {"path": "mynas/x.yaml", "input": inputs}}
    )
    instance.validate()
    return instance.async_substitute()


def sync_event_fields() -> set[str]:
    """The keys of the data of the ``mynas_sync_finished`` event, read from the source."""
    tree = ast.parse((INTEGRATION / "runs.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "async_fire"
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "EVENT_SYNC_FINISHED"
            and isinstance(node.args[1], ast.Dict)
        ):
            return {key.value for key in node.args[1].keys if isinstance(key, ast.Constant)}
    raise AssertionError("runs.py fires no mynas_sync_finished event")


@pytest.mark.parametrize("name", ["backup_alert.yaml", "sync_when.yaml"])
def test_blueprint_metadata(name: str) -> None:
    blueprint = load_blueprint(name)
    meta = blueprint.metadata
    rel = (BLUEPRINTS / name).relative_to(ROOT).as_posix()
    assert meta["source_url"] == f"{REPO_URL}/blob/main/{rel}"
    # What "Import blueprint" fetches for that URL: this very file.
    assert importer._get_github_import_url(meta["source_url"]) == (
        f"https://raw.githubusercontent.com/mynas-network/mynas/main/{rel}"
    )
    assert meta["name"].startswith("MyNAS")
    assert meta["description"]
    for key, spec in blueprint.inputs.items():
        assert spec.get("name"), f"input {key} has no name"
        assert "selector" in spec, f"input {key} has no selector"


def test_every_blueprint_is_tested() -> None:
    assert {p.name for p in BLUEPRINTS.glob("*.yaml")} == {"backup_alert.yaml", "sync_when.yaml"}


async def test_alert_blueprint_makes_a_valid_automation(hass: HomeAssistant) -> None:
    config = substitute(
        load_blueprint("backup_alert.yaml"),
        {
            "overdue_sensors": ["binary_sensor.family_backup_to_bob_overdue"],
            "notify_action": "notify.mobile_app_alices_phone",
        },
    )
    validated = await async_validate_config_item(hass, "alert", config)
    assert validated is not None
    assert validated.validation_status == "ok", validated.validation_error
    state, event = config["triggers"]
    assert state["entity_id"] == ["binary_sensor.family_backup_to_bob_overdue"]
    assert event["event_type"] == EVENT_SYNC_FINISHED
    assert set(event["event_data"]) <= sync_event_fields()
    assert config["actions"][1]["action"] == "notify.mobile_app_alices_phone"

    variables = config["actions"][0]["variables"]
    failed = {
        "trigger": {
            "id": "failed",
            "event": {
                "data": {"folder": "Family", "peer": "Bob", "error": "Bob is offline"},
            },
        }
    }
    message = Template(variables["message"], hass).async_render(failed)
    assert "Family could not be backed up to Bob: Bob is offline." in " ".join(message.split())
    assert Template(variables["title"], hass).async_render(failed) == "MyNAS: backup failed"
    hass.states.async_set(
        "binary_sensor.family_backup_to_bob_overdue",
        "on",
        {"friendly_name": "Family Backup to Bob overdue"},
    )
    overdue = {
        "trigger": {"id": "overdue", "entity_id": "binary_sensor.family_backup_to_bob_overdue"}
    }
    message = Template(variables["message"], hass).async_render(overdue)
    assert message.startswith("Family Backup to Bob overdue: no successful backup")

    # Every field the message reads is one the event carries.
    used = {"folder", "peer", "error"}
    assert used <= sync_event_fields()


@pytest.mark.parametrize(
    ("inputs", "data"),
    [
        ({}, {}),
        ({"folder": "Family"}, {"folder": "Family"}),
        ({"folder": "Family", "peer": "Bob"}, {"folder": "Family", "peer": "Bob"}),
        ({"node": "01ABC"}, {"config_entry_id": "01ABC"}),
    ],
)
async def test_sync_blueprint_makes_a_valid_automation(
    hass: HomeAssistant, inputs: dict[str, Any], data: dict[str, Any]
) -> None:
    config = substitute(
        load_blueprint("sync_when.yaml"),
        {"condition_entities": ["binary_sensor.solar_surplus"], **inputs},
    )
    validated = await async_validate_config_item(hass, "sync", config)
    assert validated is not None
    assert validated.validation_status == "ok", validated.validation_error
    (action,) = config["actions"]
    assert action["action"] == f"{DOMAIN}.sync"
    rendered = Template(action["data"], hass).async_render(config["variables"])
    assert rendered == data
    assert set(rendered) <= set(SERVICES["sync"]["fields"])


async def test_sync_blueprint_condition_on_entities(hass: HomeAssistant) -> None:
    config = substitute(
        load_blueprint("sync_when.yaml"),
        {"condition_entities": ["binary_sensor.solar_surplus", "person.alice"]},
    )
    template = config["conditions"][1]["value_template"]
    variables = dict(config["variables"], condition_state="on")
    hass.states.async_set("binary_sensor.solar_surplus", "on")
    hass.states.async_set("person.alice", "off")
    assert Template(template, hass).async_render(variables) is False
    hass.states.async_set("person.alice", "on")
    assert Template(template, hass).async_render(variables) is True
    assert Template(template, hass).async_render(dict(variables, condition_entities=[])) is True


# --- the dashboard ----------------------------------------------------------------------------


def _name(platform: str, key: str) -> str:
    return str(EN["entity"][platform][key]["name"]).replace("{peer}", PEER)


def expected_entities() -> dict[str, bool]:
    """Entity id -> enabled by default, for the demo's node, peer and folder.

    Home Assistant names an entity with ``has_entity_name`` "<device> <name>": the node's
    device is the node's name, a peer's and a folder's device their subentry's title.
    """
    found: dict[str, bool] = {}

    def add(domain: str, device: str, description: Any) -> None:
        name = _name(domain, description.translation_key)
        entity_id = f"{domain}.{slugify(f'{device} {name}')}"
        found[entity_id] = description.entity_registry_enabled_default

    for description in sensor.NODE_SENSORS:
        add("sensor", NODE, description)
    for description in (*sensor.HOSTED_SENSORS, *sensor.PEER_SENSORS):
        add("sensor", PEER, description)
    add("binary_sensor", PEER, binary_sensor.CONNECTED)
    for description in sensor.PAIR_SENSORS:
        add("sensor", FOLDER, description)
    add("binary_sensor", FOLDER, binary_sensor.OVERDUE)
    add("button", FOLDER, button.SYNC_NOW)
    add("button", FOLDER, button.VERIFY)
    return found


def _walk(value: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    if isinstance(value, dict):
        for sub_key, sub in value.items():
            yield from _walk(sub, sub_key)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)
    else:
        yield key, value


def dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_names_only_entities_mynas_creates(path: Path) -> None:
    expected = expected_entities()
    named = {
        value
        for key, value in _walk(dashboard(path))
        if key in ("entity", "entity_id") and isinstance(value, str)
    }
    assert named, "the dashboard names no entity"
    unknown = sorted(named - expected.keys())
    assert not unknown, f"not in MyNAS's naming scheme: {unknown}"
    disabled = sorted(entity for entity in named if not expected[entity])
    assert not disabled, f"disabled by default, so without a state: {disabled}"
    # The dashboard shows what the issue asks for.
    for wanted in (
        "sensor.alice_disk_used_percent",
        "binary_sensor.bob_connection",
        "sensor.bob_last_seen",
        "sensor.bob_quota_used_here",
        "sensor.family_last_backup_to_bob",
        "sensor.family_backup_state_on_bob",
        "sensor.family_backup_progress_to_bob",
        "button.family_back_up_to_bob_now",
    ):
        assert wanted in named, wanted


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_calls_only_existing_actions(path: Path) -> None:
    actions = {value for key, value in _walk(dashboard(path)) if key == "perform_action"}
    assert f"{DOMAIN}.sync" in actions
    for action in actions:
        domain, service = action.split(".")
        if domain == DOMAIN:
            assert service in SERVICES, action
        else:
            assert action == "button.press", action


def test_the_french_dashboard_is_the_same_dashboard() -> None:
    """Card for card and entity for entity; only the words differ."""

    def shape(data: dict[str, Any]) -> list[tuple[str | None, Any]]:
        return [
            (key, value)
            for key, value in _walk(data)
            if key in ("type", "entity", "entity_id", "perform_action", "icon", "state_not")
        ]

    english, french = dashboard(DASHBOARDS[0]), dashboard(DASHBOARDS[1])
    assert shape(french) == shape(english)
    assert french != english


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_cards_are_known_types(path: Path) -> None:
    types = {value for key, value in _walk(dashboard(path)) if key == "type"}
    assert types <= {"sections", "grid", "heading", "gauge", "tile", "button", "markdown"}


@pytest.mark.parametrize(
    ("path", "words"),
    [
        (DASHBOARDS[0], ("No protected folder yet", "| Backup | State | Last success |", "ago")),
        (
            DASHBOARDS[1],
            ("Aucun dossier protégé", "| Sauvegarde | État | Dernière réussite |", "/"),
        ),
    ],
    ids=["en", "fr"],
)
async def test_dashboard_overview_template_renders(
    hass: HomeAssistant, path: Path, words: tuple[str, str, str]
) -> None:
    empty, header, when = words
    (content,) = [value for key, value in _walk(dashboard(path)) if key == "content"]
    assert empty in Template(content, hass).async_render()
    # integration_entities() lists a loaded integration's entities, or those of the config
    # entry titled like its argument: the latter stands in for a running node here.
    config_entry = MockConfigEntry(domain=DOMAIN, title=DOMAIN)
    config_entry.add_to_hass(hass)
    registry = er.async_get(hass)
    rows = {"pair-family-bob": ("family_backup_state_on_bob", "idle", 2)}
    rows["pair-docs-bob"] = ("docs_backup_state_on_bob", "error", 2)
    rows["pair-old-bob"] = ("old_backup_state_on_bob", "idle", 48)
    for unique_id, (object_id, state, hours) in rows.items():
        entry = registry.async_get_or_create(
            "sensor", DOMAIN, unique_id, suggested_object_id=object_id, config_entry=config_entry
        )
        hass.states.async_set(
            entry.entity_id,
            state,
            {
                "device_class": "enum",
                "folder": object_id.split("_")[0].capitalize(),
                "peer": "Bob",
                "last_success": dt_util.utcnow() - timedelta(hours=hours),
            },
        )
    rendered = Template(content, hass).async_render()
    assert header in rendered
    lines = {line.split("|")[2].strip(): line for line in rendered.splitlines() if "→" in line}
    assert set(lines) == {"Family → Bob", "Docs → Bob", "Old → Bob"}
    # A check mark only for a recent success while nothing is wrong.
    assert "mdi:check-circle" in lines["Family → Bob"]
    assert "mdi:alert" in lines["Docs → Bob"]  # in error: no check mark
    assert "mdi:alert" in lines["Old → Bob"]  # two days old
    assert when in lines["Family → Bob"]
