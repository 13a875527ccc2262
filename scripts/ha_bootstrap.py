"""Prepare and drive a throwaway Home Assistant for MyNAS development.

Used by ``scripts/develop`` (one instance) and meant for ``scripts/demo`` (two instances on
separate config dirs and ports). Everything takes the config dir and the port as parameters.

What ``prepare_config_dir`` does, all while Home Assistant is stopped:

- writes ``configuration.yaml`` once (``default_config``, a ``homeassistant:`` block, go2rtc
  pointed at a local URL so it does not fail for lack of its binary, debug logging for
  MyNAS), and afterwards keeps only its ``internal_url`` port in step with the port asked for;
- writes ``.storage/http`` so the server listens on 127.0.0.1:<port> (an ``http:`` block in
  YAML would be migrated into a five-minute trial and then reverted);
- links ``custom_components/mynas`` to this repository's integration;
- creates the owner account the way onboarding does (credentials, an owner in the admin group,
  linked together), with a password kept in ``.mynas-develop-login`` (mode 0600), and marks
  onboarding done — so the UI opens straight onto the dashboard.

``run_hass`` starts Home Assistant (like ``hass``) with one change: what its integrations need
is added to the venv but nothing already installed there is upgraded, downgraded or replaced
(see ``venv_keeping_install``), so ``scripts/test`` runs against the same packages before and
after a development session.

Command line (run it with the venv's python, Home Assistant must be importable):

    python scripts/ha_bootstrap.py prepare --config DIR --port 8123 [--name NAME] [--user USER]
    python scripts/ha_bootstrap.py run --config DIR [-- HASS_ARGS...]
    python scripts/ha_bootstrap.py wait --port 8123 [--timeout 300] [--banner --config DIR]
    python scripts/ha_bootstrap.py login --port 8123 --config DIR   # prints an access token
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Iterable, Iterator
import contextlib
from dataclasses import dataclass
import fcntl
from importlib import metadata
import json
import logging
import os
from pathlib import Path
import re
import secrets
import socket
import sys
import tempfile
import time
from typing import Any
import urllib.error
import urllib.parse
import urllib.request

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = REPO_ROOT / "custom_components" / "mynas"

HOST = "127.0.0.1"
DEFAULT_PORT = 8123
DEFAULT_USER = "dev"
DEFAULT_NAME = "MyNAS dev"
LOGIN_FILE = ".mynas-develop-login"
# Home Assistant's own single-instance lock (homeassistant/runner.py).
HA_LOCK_FILE = ".ha_run.lock"
ONBOARDING_DONE = ["user", "core_config", "analytics", "integration"]

_LOGGER = logging.getLogger("mynas.develop")
_INTERNAL_URL_RE = re.compile(
    r"^([ \t]*internal_url:[ \t]*)http://127\.0\.0\.1:\d+/?[ \t]*$", re.MULTILINE
)


class BootstrapError(Exception):
    """Something the person running the script has to fix; the message says what."""


@dataclass(frozen=True)
class Login:
    """The account a development instance is reachable with."""

    username: str
    password: str


def base_url(port: int, host: str = HOST) -> str:
    """Return the URL of the instance listening on ``port``."""
    return f"http://{host}:{port}"


def generate_password() -> str:
    """Return a fresh random password that is easy to copy (letters, digits, - and _)."""
    return secrets.token_urlsafe(12)


def configuration_yaml(name: str, port: int) -> str:
    """Return the configuration.yaml of a development instance."""
    return f"""\
# Home Assistant for MyNAS development, written by scripts/develop on first run.
# Edit freely: later runs keep this file and only update internal_url's port.
# Do not add an `http:` block: the server address lives in .storage/http (Home Assistant
# 2026.10 would migrate an `http:` block into a 5-minute trial and then revert it).
homeassistant:
  name: {json.dumps(name)}
  time_zone: Europe/Berlin
  unit_system: metric
  country: DE
  currency: EUR
  internal_url: {base_url(port)}

default_config:

# default_config loads go2rtc, which fails without its binary unless it has a URL.
go2rtc:
  url: http://127.0.0.1:1984/

logger:
  default: info
  logs:
    custom_components.mynas: debug
"""


def update_internal_url(text: str, port: int) -> str:
    """Return ``text`` with a local ``internal_url`` moved to ``port`` (other text untouched)."""
    return _INTERNAL_URL_RE.sub(lambda match: f"{match.group(1)}{base_url(port)}", text)


def onboarding_store() -> dict[str, Any]:
    """Return the .storage/onboarding document that marks every onboarding step done."""
    return {
        "version": 4,
        "minor_version": 1,
        "key": "onboarding",
        "data": {"done": list(ONBOARDING_DONE)},
    }


def http_store(port: int, host: str = HOST) -> dict[str, Any]:
    """Return the .storage/http document of a server on ``host:port``.

    The stable slot is filled in by Home Assistant's own schema (its defaults for CORS, bans,
    SSL profile...), so it stays right for the installed version; no pending trial.
    """
    from homeassistant.components.http.config import (  # noqa: PLC0415
        HTTP_STORAGE_SCHEMA,
        STORAGE_KEY,
        STORAGE_MINOR_VERSION,
        STORAGE_VERSION,
    )

    stable = dict(HTTP_STORAGE_SCHEMA({"server_host": [host], "server_port": port}))
    stable.update(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        error=None,
        error_message=None,
    )
    return {
        "version": STORAGE_VERSION,
        "minor_version": STORAGE_MINOR_VERSION,
        "key": STORAGE_KEY,
        "data": {"stable": stable, "pending": None, "yaml_migration_done": True},
    }


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def write_store(config_dir: Path, document: dict[str, Any]) -> None:
    """Write a Home Assistant storage document into ``config_dir/.storage``."""
    write_private(config_dir / ".storage" / document["key"], json.dumps(document, indent=2) + "\n")


def read_login(config_dir: Path) -> Login:
    """Return the login kept in ``config_dir``."""
    path = config_dir / LOGIN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BootstrapError(f"no {path}: prepare the config dir first") from None
    return Login(data["username"], data["password"])


def save_login(config_dir: Path, login: Login) -> None:
    """Keep ``login`` in ``config_dir`` (mode 0600)."""
    write_private(
        config_dir / LOGIN_FILE,
        json.dumps({"username": login.username, "password": login.password}) + "\n",
    )


def load_or_create_login(config_dir: Path, username: str = DEFAULT_USER) -> Login:
    """Return the login kept in ``config_dir``, creating it (mode 0600) on first use."""
    if (config_dir / LOGIN_FILE).exists():
        os.chmod(config_dir / LOGIN_FILE, 0o600)
        return read_login(config_dir)
    login = Login(username, generate_password())
    save_login(config_dir, login)
    return login


def link_integration(config_dir: Path, integration_dir: Path = INTEGRATION_DIR) -> None:
    """Make ``config_dir/custom_components/mynas`` a relative link to ``integration_dir``."""
    link = config_dir / "custom_components" / integration_dir.name
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(integration_dir, link.parent)
    if link.is_symlink():
        if os.readlink(link) == target:
            return
        link.unlink()
    elif link.exists():
        raise BootstrapError(f"{link} exists and is not a link; move it away")
    link.symlink_to(target)


def port_in_use(port: int, host: str = HOST) -> bool:
    """Return whether something accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


@contextlib.contextmanager
def ha_stopped(config_dir: Path) -> Iterator[None]:
    """Hold Home Assistant's own lock on ``config_dir``: fail if an instance runs there."""
    config_dir.mkdir(parents=True, exist_ok=True)
    with open(config_dir / HA_LOCK_FILE, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BootstrapError(
                f"Home Assistant is already running with {config_dir}; stop it first"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def ensure_owner(config_dir: Path, login: Login, name: str) -> None:
    """Give ``login`` an owner account (admin group), as onboarding's user step does.

    ``hass --script auth add`` only stores credentials: the user behind them would be
    created at first login as a plain admin, never as the owner. Idempotent: an existing
    account keeps its id and gets its password reset to ``login.password``.
    """
    from homeassistant import runner  # noqa: PLC0415

    asyncio.run(_ensure_owner(config_dir, login, name), loop_factory=runner.create_event_loop)


async def _ensure_owner(config_dir: Path, login: Login, name: str) -> None:
    # The same set-up as homeassistant/scripts/auth.py, plus what onboarding's user step does.
    from homeassistant.auth import auth_manager_from_config  # noqa: PLC0415
    from homeassistant.auth.const import GROUP_ID_ADMIN  # noqa: PLC0415
    from homeassistant.auth.providers import homeassistant as hass_auth  # noqa: PLC0415
    from homeassistant.config_entries import ConfigEntries  # noqa: PLC0415
    from homeassistant.core import CoreState, HomeAssistant  # noqa: PLC0415
    from homeassistant.helpers import (  # noqa: PLC0415
        device_registry as dr,
        entity_registry as er,
    )

    hass = HomeAssistant(str(config_dir))
    try:
        hass.config_entries = ConfigEntries(hass, {})
        await hass.config_entries.async_initialize()
        dr.async_setup(hass)
        await asyncio.gather(dr.async_load(hass), er.async_load(hass))
        hass.auth = await auth_manager_from_config(hass, [{"type": "homeassistant"}], [])
        provider = hass.auth.auth_providers[0]
        assert isinstance(provider, hass_auth.HassAuthProvider)
        await provider.async_initialize()
        assert provider.data is not None
        try:
            provider.data.validate_login(login.username, login.password)
        except hass_auth.InvalidAuth:
            try:
                provider.data.change_password(login.username, login.password)
            except hass_auth.InvalidUser:
                provider.data.add_auth(login.username, login.password)
            await provider.data.async_save()
        credentials = await provider.async_get_or_create_credentials({"username": login.username})
        user = None
        if not credentials.is_new:
            user = await hass.auth.async_get_user_by_credentials(credentials)
        if user is None:
            # The first user made this way becomes the owner (AuthManager._user_should_be_owner).
            user = await hass.auth.async_create_user(name, group_ids=[GROUP_ID_ADMIN])
            await hass.auth.async_link_user(user, credentials)
        if not user.is_owner or GROUP_ID_ADMIN not in {group.id for group in user.groups}:
            raise BootstrapError(
                f"the account {login.username!r} in {config_dir} is not the owner;"
                " delete the config dir to start afresh"
            )
    finally:
        # A full stop flushes the auth store's delayed save (written at the final-write stage).
        hass.set_state(CoreState.running)
        await hass.async_stop()


def prepare_config_dir(
    config_dir: Path | str,
    port: int = DEFAULT_PORT,
    user: str = DEFAULT_USER,
    password: str | None = None,
    name: str = DEFAULT_NAME,
) -> Login:
    """Make ``config_dir`` ready for ``hass -c config_dir`` on 127.0.0.1:``port``.

    Creates what is missing and keeps what exists (the login, configuration.yaml's edits,
    every entry and entity); ``password`` replaces the stored one when given.
    Returns the login to print. Home Assistant must not be running with ``config_dir``.
    """
    config_dir = Path(config_dir).resolve()
    with ha_stopped(config_dir):
        if port_in_use(port):
            raise BootstrapError(f"something already listens on {HOST}:{port}")
        login = load_or_create_login(config_dir, user)
        if password is not None and password != login.password:
            login = Login(login.username, password)
            save_login(config_dir, login)
        yaml_path = config_dir / "configuration.yaml"
        if yaml_path.exists():
            text = yaml_path.read_text(encoding="utf-8")
            if (updated := update_internal_url(text, port)) != text:
                yaml_path.write_text(updated, encoding="utf-8")
        else:
            yaml_path.write_text(configuration_yaml(name, port), encoding="utf-8")
        link_integration(config_dir)
        write_store(config_dir, http_store(port))
        onboarding = config_dir / ".storage" / "onboarding"
        if not onboarding.exists():
            write_store(config_dir, onboarding_store())
        ensure_owner(config_dir, login, name)
    return login


def banner(config_dir: Path | str, port: int, login: Login) -> str:
    """Return what a newcomer needs to open the UI."""
    return f"""\

  Home Assistant with MyNAS
    URL:       {base_url(port)}/
    username:  {login.username}
    password:  {login.password}
    config:    {Path(config_dir).resolve()}  (login kept in {LOGIN_FILE})
    add MyNAS: Settings -> Devices & services -> Add integration -> MyNAS
    stop:      Ctrl-C
"""


def ready_banner(config_dir: Path | str, port: int, login: Login) -> str:
    """Return the banner repeated once the instance answers (its log has scrolled by then)."""
    return banner(config_dir, port, login).replace("  Home Assistant with MyNAS", "  Ready:")


def package_installed(name: str) -> bool:
    """Return whether a distribution called ``name`` is installed (any version)."""
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def requirement_name(line: str) -> str | None:
    """Return the canonical package name a requirement or constraint line is about."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    try:
        return canonicalize_name(Requirement(line).name)
    except InvalidRequirement:
        return None


def constraints_for_new_packages(
    lines: Iterable[str], installed: Callable[[str], bool]
) -> list[str]:
    """Keep the constraint lines about packages that are not installed yet.

    Home Assistant's constraints pin ~400 packages; applied to an install they would move
    any installed package of the venv to Home Assistant's version. Packages not yet
    installed still get Home Assistant's versions (and its blocks on unwanted packages).
    """
    kept = []
    for line in lines:
        name = requirement_name(line)
        if name is not None and not installed(name):
            kept.append(line.rstrip("\n"))
    return kept


def venv_keeping_install(
    original: Callable[..., bool],
    installed: Callable[[str], bool] = package_installed,
    log: Callable[[str], None] = _LOGGER.warning,
) -> Callable[..., bool]:
    """Wrap ``homeassistant.util.package.install_package`` so it only adds packages.

    Home Assistant calls it for each requirement an integration needs that is not met, and it
    runs ``uv pip install --upgrade REQ --constraint package_constraints.txt``: measured here,
    that downgraded anyio, bleak, cffi, dbus-fast and pycares in .venv. The wrapper:

    - keeps a package that is installed at another version than asked for (a warning says so);
    - installs a missing one without ``--upgrade`` (installed dependencies that fit stay as
      they are) and with the constraints on packages not installed yet only.
    """

    def install_package(
        package: str,
        upgrade: bool = True,
        target: str | None = None,
        constraints: str | None = None,
        timeout: int | None = None,
    ) -> bool:
        del upgrade  # never upgrade what is there
        name = requirement_name(package)
        if name is not None and installed(name):
            log(f"Keeping the venv's {name} {metadata.version(name)} (wanted: {package})")
            return True
        if constraints is None:
            return original(package, upgrade=False, target=target, timeout=timeout)
        with (
            open(constraints, encoding="utf-8") as file,
            tempfile.NamedTemporaryFile(
                "w", prefix="mynas-constraints-", suffix=".txt", encoding="utf-8"
            ) as kept,
        ):
            kept.write("\n".join(constraints_for_new_packages(file, installed)) + "\n")
            kept.flush()
            return original(
                package, upgrade=False, target=target, constraints=kept.name, timeout=timeout
            )

    return install_package


def run_hass(config_dir: Path | str, hass_args: list[str]) -> int:
    """Run Home Assistant on ``config_dir`` as ``hass -c`` does, adding packages only."""
    from homeassistant import __main__ as hass_main  # noqa: PLC0415
    from homeassistant.util import package  # noqa: PLC0415

    package.install_package = venv_keeping_install(package.install_package)
    sys.argv = ["hass", "-c", str(config_dir), *hass_args]
    return hass_main.main()


def wait_until_up(url: str, timeout: float = 300) -> None:
    """Wait until ``url``/manifest.json answers (polling /api/ would count failed logins)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/manifest.json", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BootstrapError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def _post(url: str, body: bytes, content_type: str) -> Any:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise BootstrapError(f"POST {url}: {err.code} {detail}") from err


def login(url: str, user: str, password: str) -> str:
    """Log in through the login flow, as the frontend does; return an access token."""
    client_id = f"{url}/"
    flow = _post(
        f"{url}/auth/login_flow",
        json.dumps(
            {"client_id": client_id, "handler": ["homeassistant", None], "redirect_uri": client_id}
        ).encode(),
        "application/json",
    )
    result = _post(
        f"{url}/auth/login_flow/{flow['flow_id']}",
        json.dumps({"client_id": client_id, "username": user, "password": password}).encode(),
        "application/json",
    )
    if result.get("type") != "create_entry":
        raise BootstrapError(f"login as {user!r} failed: {result.get('errors') or result}")
    tokens = _post(
        f"{url}/auth/token",
        urllib.parse.urlencode(
            {"grant_type": "authorization_code", "code": result["result"], "client_id": client_id}
        ).encode(),
        "application/x-www-form-urlencoded",
    )
    return str(tokens["access_token"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="make a config dir ready and print the login")
    wait = commands.add_parser("wait", help="wait until the instance answers")
    token = commands.add_parser("login", help="print an access token")
    run = commands.add_parser("run", help="run Home Assistant, never changing installed packages")
    for command in (prepare, wait, token):
        command.add_argument("--port", type=int, default=DEFAULT_PORT)
    for command in (prepare, token, run):
        command.add_argument("--config", type=Path, required=True)
    run.add_argument("hass_args", nargs=argparse.REMAINDER, help="passed on to hass")
    prepare.add_argument("--user", default=DEFAULT_USER)
    prepare.add_argument("--name", default=DEFAULT_NAME)
    wait.add_argument("--timeout", type=float, default=300)
    wait.add_argument("--config", type=Path, help="with --banner: where the login is kept")
    wait.add_argument("--banner", action="store_true", help="print the login once it answers")
    args = parser.parse_args(argv)
    if args.command == "run":
        hass_args = args.hass_args[1:] if args.hass_args[:1] == ["--"] else args.hass_args
        return run_hass(args.config, hass_args)
    try:
        if args.command == "prepare":
            account = prepare_config_dir(args.config, args.port, args.user, name=args.name)
            print(banner(args.config, args.port, account))
        elif args.command == "wait":
            wait_until_up(base_url(args.port), args.timeout)
            if args.banner:
                if args.config is None:
                    parser.error("--banner needs --config")
                account = read_login(args.config.resolve())
                print(ready_banner(args.config, args.port, account), flush=True)
        else:
            account = read_login(args.config.resolve())
            print(login(base_url(args.port), account.username, account.password))
    except BootstrapError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
