"""The helpers of scripts/ha_bootstrap.py (scripts/develop, scripts/demo): fast, no network."""

from __future__ import annotations

from collections.abc import Iterator
import fcntl
import importlib.util
import json
import os
from pathlib import Path
import socket
import stat
import subprocess
import sys
from types import ModuleType
from typing import Any

from homeassistant.components.http.config import (
    HTTP_STORAGE_SCHEMA,
    STORAGE_KEY,
    STORAGE_MINOR_VERSION,
    STORAGE_VERSION,
)
import pytest
import yaml

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ha_bootstrap.py"


@pytest.fixture(scope="module")
def hb() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("ha_bootstrap", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ha_bootstrap"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ha_bootstrap"]


def test_configuration_yaml(hb: ModuleType) -> None:
    config = yaml.safe_load(hb.configuration_yaml("Bob's node", 8124))
    assert config["homeassistant"]["name"] == "Bob's node"
    assert config["homeassistant"]["internal_url"] == "http://127.0.0.1:8124"
    assert config["homeassistant"]["time_zone"] == "Europe/Berlin"
    assert config["homeassistant"]["unit_system"] == "metric"
    assert "default_config" in config
    assert config["go2rtc"] == {"url": "http://127.0.0.1:1984/"}
    assert config["logger"] == {"default": "info", "logs": {"custom_components.mynas": "debug"}}
    # An http: block would become a 5-minute trial that Home Assistant reverts.
    assert "http" not in config


def test_update_internal_url(hb: ModuleType) -> None:
    text = hb.configuration_yaml("dev", 8123) + "# my own line\n"
    moved = hb.update_internal_url(text, 8124)
    assert yaml.safe_load(moved)["homeassistant"]["internal_url"] == "http://127.0.0.1:8124"
    assert moved.replace("8124", "8123") == text
    assert hb.update_internal_url(moved, 8124) == moved
    # A URL someone set by hand to another host is theirs.
    own = "homeassistant:\n  internal_url: http://pi.local:8123\n"
    assert hb.update_internal_url(own, 8124) == own


def test_onboarding_store(hb: ModuleType) -> None:
    assert hb.onboarding_store() == {
        "version": 4,
        "minor_version": 1,
        "key": "onboarding",
        "data": {"done": ["user", "core_config", "analytics", "integration"]},
    }


def test_http_store(hb: ModuleType) -> None:
    store = hb.http_store(8124)
    assert (store["version"], store["minor_version"], store["key"]) == (
        STORAGE_VERSION,
        STORAGE_MINOR_VERSION,
        STORAGE_KEY,
    )
    assert store["data"]["pending"] is None
    assert store["data"]["yaml_migration_done"] is True
    stable = dict(store["data"]["stable"])
    assert stable.pop("error") is None
    assert stable.pop("error_message") is None
    assert stable.pop("created_at")
    assert HTTP_STORAGE_SCHEMA(stable) == stable
    assert stable["server_host"] == ["127.0.0.1"]
    assert stable["server_port"] == 8124


def test_write_store_is_private(hb: ModuleType, tmp_path: Path) -> None:
    hb.write_store(tmp_path, hb.onboarding_store())
    path = tmp_path / ".storage" / "onboarding"
    assert json.loads(path.read_text()) == hb.onboarding_store()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["onboarding"]


def test_login_is_created_once(hb: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(hb.BootstrapError, match="prepare the config dir first"):
        hb.read_login(tmp_path)
    login = hb.load_or_create_login(tmp_path, "alice")
    assert login.username == "alice"
    assert len(login.password) >= 16
    path = tmp_path / hb.LOGIN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert hb.load_or_create_login(tmp_path, "someone-else") == login
    assert hb.read_login(tmp_path) == login
    assert hb.generate_password() != login.password


def test_link_integration(hb: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "config"
    hb.link_integration(config)
    link = config / "custom_components" / "mynas"
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == hb.INTEGRATION_DIR
    hb.link_integration(config)
    assert link.resolve() == hb.INTEGRATION_DIR
    link.unlink()
    link.mkdir()
    with pytest.raises(hb.BootstrapError, match="is not a link"):
        hb.link_integration(config)


def test_ha_stopped_refuses_a_running_instance(hb: ModuleType, tmp_path: Path) -> None:
    with hb.ha_stopped(tmp_path):
        pass
    with open(tmp_path / hb.HA_LOCK_FILE, "a+", encoding="utf-8") as running:
        fcntl.flock(running.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(hb.BootstrapError, match="already running"), hb.ha_stopped(tmp_path):
            pass


def test_banner(hb: ModuleType, tmp_path: Path) -> None:
    login = hb.Login("dev", "s3cret-Pa55")
    text = hb.banner(tmp_path, 8124, login)
    for expected in ("http://127.0.0.1:8124/", "dev", "s3cret-Pa55", str(tmp_path), "Ctrl-C"):
        assert expected in text
    assert "Ready:" in hb.ready_banner(tmp_path, 8124, login)


def test_constraints_for_new_packages(hb: ModuleType) -> None:
    lines = [
        "# a comment\n",
        "Anyio==4.14.2\n",
        "home_assistant_frontend==20260930.5\n",
        "uuid==1000000000.0.0  # blocks a package\n",
        "-c other.txt\n",
        "\n",
    ]
    kept = hb.constraints_for_new_packages(lines, lambda name: name == "anyio")
    assert kept == [
        "home_assistant_frontend==20260930.5",
        "uuid==1000000000.0.0  # blocks a package",
    ]


def test_installed_package_is_kept(hb: ModuleType) -> None:
    calls: list[Any] = []
    logged: list[str] = []
    install = hb.venv_keeping_install(
        lambda *args, **kwargs: calls.append((args, kwargs)) or True,
        installed=lambda name: True,
        log=logged.append,
    )
    assert install("pytest==1.0", upgrade=True, constraints="/nonexistent")
    assert calls == []
    assert "pytest" in logged[0]
    assert "pytest==1.0" in logged[0]


def test_missing_package_is_added_without_upgrades(hb: ModuleType, tmp_path: Path) -> None:
    constraints = tmp_path / "package_constraints.txt"
    constraints.write_text("anyio==4.14.2\nnew-package==2.0\n")
    seen: dict[str, Any] = {}

    def original(package: str, **kwargs: Any) -> bool:
        seen.update(kwargs, package=package)
        if "constraints" in kwargs:
            seen["constraints_text"] = Path(kwargs["constraints"]).read_text()
        return True

    install = hb.venv_keeping_install(original, installed=lambda name: name == "anyio")
    assert install("new-package==2.0", upgrade=True, constraints=str(constraints), timeout=60)
    assert seen["package"] == "new-package==2.0"
    assert seen["upgrade"] is False
    assert seen["timeout"] == 60
    assert seen["constraints_text"] == "new-package==2.0\n"
    assert not Path(seen["constraints"]).exists()

    seen.clear()
    assert install("other==1.0")
    assert seen == {"package": "other==1.0", "upgrade": False, "target": None, "timeout": None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stored(config: Path, key: str) -> Any:
    return json.loads((config / ".storage" / key).read_text())["data"]


PREPARE_TWICE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import ha_bootstrap as hb
config, port, other_port = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(hb.prepare_config_dir(config, port, "alice", name="Alice"))
auth = (config / ".storage" / "auth").read_text()
yaml_path = config / "configuration.yaml"
yaml_path.write_text(yaml_path.read_text() + "# mine\\n")
print(hb.prepare_config_dir(config, other_port, "bob"))
print(auth)
"""


@pytest.mark.usefixtures("socket_enabled")
def test_prepare_config_dir(hb: ModuleType, tmp_path: Path) -> None:
    """The whole preparation, run twice, Home Assistant's auth store included (no server).

    In a subprocess: the test plugin keeps Home Assistant's storage in memory.
    """
    config = tmp_path / "config"
    port, other_port = free_port(), free_port()
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            PREPARE_TWICE,
            str(SCRIPT.parent),
            str(config),
            str(port),
            str(other_port),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    login = hb.read_login(config)
    assert login.username == "alice"
    # The second run keeps the login (and ignores another user name).
    assert output[0] == output[1] == repr(login)
    auth_after_first_run = json.loads("\n".join(output[2:]))["data"]
    auth = stored(config, "auth")
    assert auth == auth_after_first_run
    (owner,) = [user for user in auth["users"] if not user["system_generated"]]
    assert owner["is_owner"]
    assert owner["group_ids"] == ["system-admin"]
    assert owner["name"] == "Alice"
    (credential,) = auth["credentials"]
    assert credential["user_id"] == owner["id"]
    assert credential["data"] == {"username": "alice"}
    assert stored(config, "onboarding") == hb.onboarding_store()["data"]
    assert stored(config, "http")["stable"]["server_port"] == other_port
    assert (config / "custom_components" / "mynas").resolve() == hb.INTEGRATION_DIR
    text = (config / "configuration.yaml").read_text()
    assert f"internal_url: http://127.0.0.1:{other_port}\n" in text
    assert text.endswith("# mine\n")
