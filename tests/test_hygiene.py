"""Repository hygiene: what hassfest and HACS check, and what a missing string would break.

Translation keys are collected from the source itself (the ``translation_key=`` and error/
abort literals the code can produce), so a new string in code without its text fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
import struct

import homeassistant
import pytest
import yaml

from custom_components.mynas.engine.storage_root import RootProblem

ROOT = Path(__file__).parent.parent
INTEGRATION = ROOT / "custom_components" / "mynas"
EN = json.loads((INTEGRATION / "translations" / "en.json").read_text())
ICONS = json.loads((INTEGRATION / "icons.json").read_text())
PLATFORMS = ("sensor", "binary_sensor", "button")


def _tree(name: str) -> ast.Module:
    return ast.parse((INTEGRATION / name).read_text())


def _keyword_literals(tree: ast.AST, keyword: str) -> set[str]:
    """String literals passed as ``keyword=`` anywhere in ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.keyword)
            and node.arg == keyword
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.add(node.value.value)
    return found


def _assigned_errors(tree: ast.AST) -> set[str]:
    """Literals assigned as ``errors[...] = "key"``."""
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Subscript)
            and isinstance(node.targets[0].value, ast.Name)
            and node.targets[0].value.id == "errors"
            and isinstance(node.value, ast.Constant)
        ):
            found.add(node.value.value)
    return found


def _call_literals(tree: ast.AST, function: str, position: int) -> set[str]:
    """String literals passed at ``position`` to calls of ``function``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name == function and len(node.args) > position:
                arg = node.args[position]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
    return found


def _returned_literals(tree: ast.AST, function: str) -> set[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return {
                ret.value.value
                for ret in ast.walk(node)
                if isinstance(ret, ast.Return)
                and isinstance(ret.value, ast.Constant)
                and isinstance(ret.value.value, str)
            }
    raise AssertionError(f"{function} not found")


def test_manifest_order_and_keys() -> None:
    manifest = json.loads((INTEGRATION / "manifest.json").read_text())
    keys = list(manifest)
    assert keys[:2] == ["domain", "name"]
    assert keys[2:] == sorted(keys[2:])
    for key in (
        "codeowners",
        "config_flow",
        "documentation",
        "integration_type",
        "iot_class",
        "issue_tracker",
        "loggers",
        "requirements",
        "version",
    ):
        assert key in manifest, key
    assert manifest["domain"] == "mynas"
    assert manifest["config_flow"] is True
    # Same pins as the core integrations that use these libraries, and as requirements.txt.
    pins = set((ROOT / "requirements.txt").read_text().split())
    assert (
        set(manifest["requirements"])
        == {
            "async-upnp-client==0.48.2",
            "asyncssh==2.24.0",
            "psutil==7.2.2",
            "PyQRCode==1.2.1",
            "watchdog==6.0.0",
        }
        <= pins
    )
    # Exactly what Home Assistant's own integrations pin (so installing MyNAS never fights).
    core = Path(homeassistant.__file__).parent / "components"
    for library, integration in (
        ("asyncssh", "sftp_storage"),
        ("psutil", "systemmonitor"),
        ("watchdog", "folder_watcher"),
        ("async-upnp-client", "upnp"),
        ("PyQRCode", "homekit"),
    ):
        theirs = json.loads((core / integration / "manifest.json").read_text())["requirements"]
        ours = [pin for pin in manifest["requirements"] if pin.startswith(f"{library}==")]
        assert ours == [pin for pin in theirs if pin.startswith(f"{library}==")], library


def test_brand_icon_is_a_256_png() -> None:
    data = (INTEGRATION / "brand" / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (256, 256)
    assert (INTEGRATION / "brand" / "logo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_never_imports_home_assistant() -> None:
    engine = INTEGRATION / "engine"
    for path in engine.rglob("*.py"):
        depth = len(path.relative_to(engine).parts)  # 1 at engine/, 2 in owner/ or host/
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                # A relative import climbing out of the engine reaches the HA layer.
                assert node.level <= depth, f"{path.name} imports from outside the engine"
            assert not any(name.split(".")[0] == "homeassistant" for name in names), path.name


def _engine_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of the engine in an HA-layer module, made absolute."""
    package = "custom_components.mynas"
    engine = f"{package}.engine"
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith(engine)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                module = f"{package}.{module}" if module else package
            names = [alias.name for alias in node.names]
            if module == package and "engine" in names:
                found.append((engine, []))  # ``from . import engine``
            elif module.startswith(engine):
                found.append((module, names))
    return found


def test_the_ha_layer_imports_the_engine_only_through_its_api() -> None:
    """``from .engine import <a name of engine.__all__>``, never a submodule of the engine."""
    from custom_components.mynas import engine  # noqa: PLC0415

    for path in sorted(INTEGRATION.glob("*.py")):
        for module, names in _engine_imports(ast.parse(path.read_text())):
            assert module == "custom_components.mynas.engine", f"{path.name} imports {module}"
            assert names, f"{path.name} imports the engine package itself, not names from it"
            assert set(names) <= set(engine.__all__), (path.name, set(names) - set(engine.__all__))


def test_every_name_of_the_engine_api_exists() -> None:
    """Each name of ``__all__`` loads, and is the one its typed import (for mypy) names."""
    from importlib import import_module  # noqa: PLC0415

    from custom_components.mynas import engine  # noqa: PLC0415

    assert len(set(engine.__all__)) == len(engine.__all__)
    typed: dict[str, object] = {}
    for node in ast.walk(ast.parse((INTEGRATION / "engine" / "__init__.py").read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imported in node.body:
                assert isinstance(imported, ast.ImportFrom), ast.unparse(imported)
                source = import_module(f"custom_components.mynas.engine.{imported.module}")
                for alias in imported.names:
                    typed[alias.asname or alias.name] = getattr(source, alias.name)
    assert set(typed) == set(engine.__all__)
    for name in engine.__all__:
        assert getattr(engine, name) is typed[name], name
    assert set(dir(engine)) >= set(engine.__all__)
    with pytest.raises(AttributeError):
        _ = engine.NotAnEngineName  # type: ignore[attr-defined]


def test_importing_the_engine_package_loads_nothing_more() -> None:
    """The command line starts through the package: its names load on first use only."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys; import custom_components.mynas.engine\n"
        "loaded = [m for m in sys.modules if m.startswith('custom_components.mynas.engine.')]\n"
        "assert not loaded and 'asyncssh' not in sys.modules, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_engine_runs_without_home_assistant() -> None:
    """The engine package imports in a process where homeassistant cannot be imported."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys; sys.modules['homeassistant'] = None\n"
        "import custom_components.mynas.engine.__main__, custom_components.mynas.engine.node\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_entity_translation_keys_and_icons() -> None:
    for platform in PLATFORMS:
        used = _keyword_literals(_tree(f"{platform}.py"), "translation_key")
        assert used, platform
        assert used <= set(EN["entity"][platform]), (platform, used - set(EN["entity"][platform]))
        assert used <= set(ICONS["entity"][platform]), platform


def test_enum_sensor_states_are_translated() -> None:
    from custom_components.mynas.models import SyncState  # noqa: PLC0415

    states = EN["entity"]["sensor"]["sync_state"]["state"]
    assert set(states) == {state.value for state in SyncState}


def test_config_flow_strings() -> None:
    flow = _tree("config_flow.py")
    errors = _assigned_errors(flow) | {
        problem.value
        for problem in (
            RootProblem.NOT_ABSOLUTE,
            RootProblem.NOT_FOUND,
            RootProblem.NOT_A_DIRECTORY,
            RootProblem.NOT_WRITABLE,
            RootProblem.SAME_DISK,
        )
    }
    assert errors - {"bad_address", "too_many_addresses"} <= set(EN["config"]["error"])
    assert {"bad_address", "too_many_addresses"} <= set(EN["options"]["error"])
    assert {"user", "reconfigure"} <= set(EN["config"]["step"])
    assert {"init", "invite", "settings"} <= set(EN["options"]["step"])


@pytest.mark.parametrize(
    ("module", "subentry"), [("peer_flow.py", "peer"), ("folder_flow.py", "folder")]
)
def test_subentry_flow_strings(module: str, subentry: str) -> None:
    tree = _tree(module)
    texts = EN["config_subentries"][subentry]
    errors = _assigned_errors(tree)
    if subentry == "folder":
        errors |= _returned_literals(tree, "check_local_folder") - {None}  # type: ignore[operator]
    assert errors <= set(texts["error"]), errors - set(texts["error"])
    aborts = _keyword_literals(tree, "reason") | {"already_configured", "reconfigure_successful"}
    assert aborts <= set(texts["abort"]), aborts - set(texts["abort"])
    steps = {
        node.name.removeprefix("async_step_")
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("async_step_")
    }
    assert steps <= set(texts["step"]), steps - set(texts["step"])


def test_exception_strings() -> None:
    used: set[str] = set()
    for name in ("hass_entry.py", "coordinator.py", "services.py", "backup.py"):
        used |= _keyword_literals(_tree(name), "translation_key")
    used |= _call_literals(_tree("services.py"), "_invalid", 0)
    used |= _call_literals(_tree("backup.py"), "_fail", 0)
    used |= {problem.value for problem in RootProblem}
    used.discard("")
    assert used <= set(EN["exceptions"]), used - set(EN["exceptions"])


def test_issue_strings() -> None:
    tree = _tree("issues.py")
    used = _call_literals(tree, "_create", 2) | {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("storage_")
        and node.value != "storage_"  # the f-string prefix of the issue id
    }
    assert used <= set(EN["issues"]), used - set(EN["issues"])
    for key in ("key_changed", "orphaned_data"):
        assert "fix_flow" in EN["issues"][key]


def test_service_strings_and_icons() -> None:
    services = yaml.safe_load((INTEGRATION / "services.yaml").read_text())
    for service, spec in services.items():
        text = EN["services"][service]
        assert text["name"]
        assert text["description"]
        for field in spec.get("fields", {}):
            assert text["fields"][field]["name"], (service, field)
            assert text["fields"][field]["description"], (service, field)
        assert service in ICONS["services"]


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md is the maintained map: a module it does not name is a stale map."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(INTEGRATION))
        for path in INTEGRATION.rglob("*.py")
        if path.name not in text
    ]
    assert not missing, f"docs/architecture.md does not name {missing}"
