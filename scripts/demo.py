"""Two paired MyNAS nodes here: Alice (:8123) and Bob (:8124), each a real Home Assistant.

``scripts/demo`` (which runs ``scripts/setup`` first) calls this module with the venv's python.

What a run does, all under one demo directory (default ``demo/`` at the repository root):

- writes a small, deterministic set of sample files (photos, documents, a nested tree, an empty
  folder, odd file names) into ``<dir>/<node>/Family`` for each node, once;
- prepares both Home Assistant config dirs with ``ha_bootstrap`` (owner account, onboarding
  done, 127.0.0.1 only), installs the MyNAS dashboard (``dashboards/mynas.yaml``) as a
  YAML-mode dashboard declared in configuration.yaml, and copies the automation blueprints
  (``blueprints/automation/mynas``) into each config dir;
- starts both instances (Alice first: the very first start pip-installs the frontend);
- sets MyNAS up on each through the config-flow REST API, reads each node's invite code from
  the options flow (menu "Show our invite code"), pairs the nodes by pasting each other's code
  in a peer subentry flow, and protects each node's ``Family`` folder on the other node through
  a folder subentry flow -- whatever already exists (a second run) is kept, not added again;
  a new node alerts at once when the other is unreachable (options flow), not after 3 days;
- runs a first sync on both (``mynas.sync`` with ``wait: true``) and waits for the sensors.

Then, by mode:

- default: prints the URLs, the login and where the files are, and runs until Ctrl-C;
- ``--headless-check``: checks that each node's folder is encrypted on the other's disk (no
  name or content in clear; opened with the owner's key, byte-identical), that it reads
  encrypted and its monthly verify is planned, that a second folder of Alice's set up plain
  is converted through its repair issue's dialog (then nothing of it is in clear on Bob's
  disk outside his trash), that a byte flipped in Alice's copy on Bob's disk is found by a
  verify (``mynas.verify`` with ``repair``, as the monthly one runs), sent again and
  reported in a repair issue, that both "last backup" sensors are set, that each node sees its
  peer connected, that every entity the dashboard names exists and that Home Assistant
  loads the blueprints;
  that Alice backs Home Assistant itself up to Bob through HA's backup API (the backup is
  listed on Alice, its archive is on Bob's disk in Alice's space, sealed: opened with
  Alice's key it equals her own copy, and downloading it through HA gives those bytes too);
  then stops Bob and checks that Alice's next sync fails and raises the "unreachable" repair
  issue; then the house fire: Alice saves her recovery kit (its repair issue's fix flow
  shows the code and a QR code, and goes only once the box is ticked), her node is stopped
  (it burnt), Bob starts again, and a third, fresh Home Assistant ("Rebuilt", on free ports)
  is set up from Alice's recovery code with an empty disk, pastes Bob's invite code and
  restores Family from Bob with ``mynas.restore``: byte-identical with Alice's folder;
  prints a summary, stops, and exits 0 (all good) or 1 (CI runs it);
- ``--exec CMD ...``: runs CMD with the demo's URLs and login in its environment
  (MYNAS_DEMO_*), then stops and exits with CMD's status (``scripts/screenshots`` uses it).

Ports: Home Assistant on 127.0.0.1:8123/8124, the MyNAS nodes on 8022/8023 (``--ha-ports``,
``--ssh-ports`` on a first run; a demo directory keeps its ports, in ``demo.json``). The login is
the same on both instances, kept in ``<dir>/.mynas-develop-login``.

Storage roots are plain directories in the demo directory (``<dir>/<node>/disk``), created with
"I know this is not a separate disk" ticked: unlike /dev/shm they survive a reboot (a second run
finds each node's disk and marker again) and are not limited by a container's small /dev/shm.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Iterator
import contextlib
from dataclasses import dataclass, field
import errno
import functools
import itertools
import json
import os
from pathlib import Path
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from typing import Any

import aiohttp
import ha_bootstrap as hb
import yaml

REPO_ROOT = hb.REPO_ROOT
sys.path.insert(0, str(REPO_ROOT))

from custom_components.mynas.engine import (  # noqa: E402
    identity as identity_codec,
    invite as invite_codec,
    recovery_code as recovery_codec,
)
from custom_components.mynas.engine.owner import sealed  # noqa: E402
from custom_components.mynas.engine.owner.backup_area import SealedArea  # noqa: E402
from custom_components.mynas.engine.owner.keys import DataKeys  # noqa: E402
from custom_components.mynas.engine.owner.replica import SealedLayout  # noqa: E402

DEFAULT_DIR = REPO_ROOT / "demo"
DEMO_USER = "demo"
FOLDER = "Family"
# A second folder of Alice's, set up plain (as before encryption existed), then converted
# through its repair issue (the headless check).
PLAIN_FOLDER = "Archive"
PLAIN_FILES = {
    "Old letters/letter-1987.txt": b"Dear Alice, the archive of 1987.\n" * 40,
    "Old letters/letter-1991.txt": b"Dear Alice, the archive of 1991.\n" * 40,
    "Receipts 2019.csv": b"date,amount\n2019-01-02,12.50\n" * 30,
}
QUOTA_GB = 10
EXCLUDE = ("*.tmp", ".DS_Store")
DASHBOARD_SOURCE = REPO_ROOT / "dashboards" / "mynas.yaml"
DASHBOARD_FILE = "dashboards/mynas.yaml"  # relative to each config dir
DASHBOARD_URL = "dashboard-mynas"
# The same dashboard in French (dashboards/mynas.fr.yaml).
DASHBOARD_FR_SOURCE = REPO_ROOT / "dashboards" / "mynas.fr.yaml"
DASHBOARD_FR_FILE = "dashboards/mynas.fr.yaml"
DASHBOARD_FR_URL = "dashboard-mynas-fr"
BLUEPRINTS_SOURCE = REPO_ROOT / "blueprints" / "automation" / "mynas"
BLUEPRINTS_DIR = "blueprints/automation/mynas"  # relative to each config dir
# First start of a fresh venv: Home Assistant pip-installs its frontend (~110 MB) and compiles
# a few packages. Later starts take seconds.
START_TIMEOUT = 900
SYNC_TIMEOUT = 300
STOP_TIMEOUT = 60

_T0 = time.monotonic()
# Printed last, once everything has stopped (the headless check's "N passed, N failed").
CLOSING: list[str] = []


class DemoError(Exception):
    """Something went wrong; the message says what and where to look."""


def say(message: str) -> None:
    """Print one progress line with the time since start.

    A reader that went away (``scripts/demo | head``) must not stop the demo halfway, with
    its Home Assistants left running: from then on, progress goes nowhere.
    """
    try:
        print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# --- the two nodes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One demo node: a Home Assistant, its MyNAS port, its disk and the folder it protects."""

    name: str
    ha_port: int
    ssh_port: int
    base: Path

    @property
    def slug(self) -> str:
        return self.name.lower()

    @property
    def home(self) -> Path:
        return self.base / self.slug

    @property
    def config(self) -> Path:
        return self.home / "config"

    @property
    def disk(self) -> Path:
        return self.home / "disk"

    @property
    def folder(self) -> Path:
        return self.home / FOLDER

    @property
    def log(self) -> Path:
        return self.home / "hass.log"

    @property
    def url(self) -> str:
        return hb.base_url(self.ha_port)


DEFAULT_HA_PORTS = (8123, 8124)
DEFAULT_SSH_PORTS = (8022, 8023)
SETTINGS_FILE = "demo.json"


def demo_nodes(
    base: Path, ha_ports: tuple[int, int], ssh_ports: tuple[int, int]
) -> tuple[Node, Node]:
    """Alice and Bob, on ports that do not clash."""
    ports = [*ha_ports, *ssh_ports]
    if len(set(ports)) != len(ports):
        raise DemoError(f"the demo needs four different ports, not {ports}")
    return (
        Node("Alice", ha_ports[0], ssh_ports[0], base),
        Node("Bob", ha_ports[1], ssh_ports[1], base),
    )


def demo_settings(base: Path, args: argparse.Namespace) -> tuple[tuple[Node, Node], dict[str, Any]]:
    """The nodes of the demo in ``base``: its saved ports, or those asked for on its first run.

    The MyNAS ports live in the nodes' config entries once set up, so a demo directory keeps
    the ports it was made with.
    """
    path = base / SETTINGS_FILE
    wanted = {
        "ha_ports": list(args.ha_ports or DEFAULT_HA_PORTS),
        "ssh_ports": list(args.ssh_ports or DEFAULT_SSH_PORTS),
    }
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        for key, flag in (("ha_ports", args.ha_ports), ("ssh_ports", args.ssh_ports)):
            if flag and list(flag) != saved[key]:
                raise DemoError(
                    f"{base} was made with --{key.replace('_', '-')} "
                    f"{','.join(map(str, saved[key]))}: use those, or another --dir"
                )
        wanted = saved
    return demo_nodes(base, tuple(wanted["ha_ports"]), tuple(wanted["ssh_ports"])), wanted


# --- sample files ---------------------------------------------------------------------------

# 2024-06-01 12:00 UTC: sample files get fixed, plausible modification times.
_EPOCH = 1_717_243_200


def _jpeg(rng: random.Random, size: int) -> bytes:
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head + rng.randbytes(size - len(head) - 2) + b"\xff\xd9"


def _png(rng: random.Random, size: int) -> bytes:
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    return head + rng.randbytes(size - len(head))


def _pdf(title: str, rng: random.Random, size: int) -> bytes:
    text = (
        f"%PDF-1.4\n1 0 obj << /Title ({title}) /Producer (MyNAS demo) >> endobj\n"
        "2 0 obj << /Length 0 >> stream\n"
    ).encode()
    return text + rng.randbytes(max(0, size - len(text) - 20)) + b"\nendstream\n%%EOF\n"


def _words(rng: random.Random, count: int) -> str:
    vocabulary = [
        *("backup", "disk", "friend", "photo", "holiday", "garden", "kitchen", "recipe"),
        *("invoice", "school", "winter", "summer", "grandma", "birthday", "train"),
        *("mountain", "lake", "bread", "coffee", "letter"),
    ]
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def sample_files(node_name: str) -> dict[bytes, bytes | None]:
    """The sample tree of a node: relative path -> content (None: a directory).

    Deterministic for a given node name; about 4 MB. File names are bytes so that one of
    them can be a name that is not valid UTF-8, as old disks and cameras make.
    """
    rng = random.Random(f"mynas-demo-{node_name}")  # sample data, not secrets
    files: dict[bytes, bytes | None] = {}

    def add(path: str | bytes, content: bytes | None) -> None:
        files[path.encode() if isinstance(path, str) else path] = content

    for year, event, count in (
        ("2023", "Summer holidays", 4),
        ("2024", "Birthday \u2013 Mia", 3),
        ("2025", "Winter in the mountains", 3),
    ):
        for _ in range(count):
            add(
                f"Photos/{year}/{event}/IMG_{rng.randrange(1000, 9999)}.jpg",
                _jpeg(rng, rng.randrange(150_000, 450_000)),
            )
    add("Photos/Scans/Grandma's letters (1962).png", _png(rng, 300_000))
    add("Photos/Scans/.DS_Store", rng.randbytes(6_148))  # excluded
    add("Videos/First steps.mp4", b"\x00\x00\x00\x18ftypmp42" + rng.randbytes(1_200_000))
    add("Documents/Taxes 2024/Tax return 2024.pdf", _pdf("Tax return 2024", rng, 180_000))
    add("Documents/Taxes 2024/Receipts/receipt-0001.pdf", _pdf("Receipt", rng, 40_000))
    add("Documents/Taxes 2024/~$draft.tmp", rng.randbytes(2_000))  # excluded
    add(
        "Documents/Recipes/Cr\u00e8me br\u00fbl\u00e9e.md",
        f"# Cr\u00e8me br\u00fbl\u00e9e\n\n{_words(rng, 60)}\n".encode(),
    )
    add(
        "Documents/Recipes/Sm\u00f8rrebr\u00f8d & co.txt",
        (_words(rng, 40) + "\n").encode(),
    )
    add(
        f"Documents/Notes from {node_name}.txt",
        f"Notes kept by {node_name}.\n{_words(rng, 120)}\n".encode(),
    )
    add(
        "Documents/budget.csv",
        (
            "month,food,energy,other\n"
            + "".join(
                f"2024-{month:02d},{rng.randrange(300, 600)},{rng.randrange(80, 200)},"
                f"{rng.randrange(0, 400)}\n"
                for month in range(1, 13)
            )
        ).encode(),
    )
    add("Projects/website/index.html", b"<!doctype html>\n<title>Our family</title>\n<p>Hi!</p>\n")
    add("Projects/website/css/style.css", b"body { font-family: sans-serif; }\n")
    add("Projects/website/deploy.sh", b"#!/bin/sh\necho deploying\n")  # executable, see below
    add("Projects/website/assets/img/logo.png", _png(rng, 20_000))
    add("Projects/Empty folder", None)
    add("Odd names/  leading spaces.txt", b"leading spaces\n")
    add("Odd names/trailing space .txt", b"trailing space\n")
    add("Odd names/question? star* pipe|.txt", b"characters Windows refuses\n")
    add("Odd names/semi;colon & ampersand $HOME.txt", b"shell characters\n")
    add("Odd names/\u65e5\u672c\u8a9e\u306e\u30d5\u30a1\u30a4\u30eb.txt", b"Japanese\n")
    add("Odd names/party \U0001f389.txt", b"emoji\n")
    add("Odd names/-starts with a dash", b"dash\n")
    add("Odd names/.hidden", b"hidden\n")
    add("Odd names/" + "long name " * 24 + ".txt", b"240 characters\n")
    add(b"Odd names/latin-1 caf\xe9.txt", b"not UTF-8\n")
    add("Odd names/empty file", b"")
    return files


EXECUTABLES = {b"Projects/website/deploy.sh"}


def write_samples(folder: Path, node_name: str) -> int:
    """Write the sample tree into ``folder`` (which must not exist); return its size in bytes."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    total = 0
    base = os.fsencode(tmp)
    for rel, content in sample_files(node_name).items():
        path = os.path.join(base, rel)
        if content is None:
            os.makedirs(path, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(content)
        if rel in EXECUTABLES:
            os.chmod(path, 0o755)
        total += len(content)
    # Fixed modification times, files first, then directories deepest first.
    for index, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(base), reverse=True)):
        for offset, name in enumerate(sorted(filenames)):
            stamp = _EPOCH - 86_400 * (index * 7 + offset)
            os.utime(os.path.join(dirpath, name), (stamp, stamp))
        del dirnames
        os.utime(dirpath, (_EPOCH, _EPOCH))
    tmp.rename(folder)
    return total


def excluded(rel: bytes) -> bool:
    """Whether the demo's exclude patterns leave ``rel`` out."""
    name = os.path.basename(rel)
    return name == b".DS_Store" or name.endswith(b".tmp")


def tree(root: Path) -> dict[bytes, tuple[str, bytes | None, bool]]:
    """Every entry under ``root``: relative path -> (kind, content, executable)."""
    found: dict[bytes, tuple[str, bytes | None, bool]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), base)] = ("dir", None, False)
        for name in filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, base)
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    found[rel] = ("file", file.read(), bool(info.st_mode & 0o100))
            else:
                found[rel] = ("other", None, False)
    return found


def compare_sealed(source: Path, jail: Path, key_file: Path, folder: str) -> list[str]:
    """The differences between a folder and its encrypted replica in ``jail`` (opened with
    the owner's key), and anything of it the host can read in clear.

    Every entry of the folder (excluded files left out) must be where its sealed name says,
    its sealed content must open to the folder's bytes and executable bit, nothing else may
    be stored there, and no name (of five characters or more) and no content of the folder
    may appear on the host's disk.
    """
    layout = SealedLayout(folder, DataKeys.of(identity_codec.load(key_file)))
    root = jail / os.fsdecode(layout.root)
    if not root.is_dir():
        return [f"no encrypted replica at {root}"]
    want = {rel: entry for rel, entry in tree(source).items() if not excluded(rel)}
    expected = {layout.root}
    problems = []
    for rel, (kind, content, executable) in sorted(want.items()):
        stored = layout.stored(rel)
        # Every directory on the way (a long name's continuations included) is expected.
        parts = stored.split(b"/")
        expected.update(b"/".join(parts[:n]) for n in range(1, len(parts) + 1))
        path = jail / os.fsdecode(stored)
        shown = os.fsdecode(rel)
        if kind == "dir":
            if not path.is_dir():
                problems.append(f"missing in replica: {shown!r}")
            continue
        if not path.is_file():
            problems.append(f"missing in replica: {shown!r}")
            continue
        try:
            meta, plain = sealed.open_sealed(
                layout.keys.contents, layout.jail_path(rel), path.read_bytes()
            )
        except sealed.SealedFileError as err:
            problems.append(f"does not open: {shown!r}: {err}")
            continue
        if plain != content:
            problems.append(f"differs: {shown!r}")
        elif bool(meta.mode & 0o100) != executable:
            problems.append(f"executable bit differs: {shown!r}")
    base = os.fsencode(jail)
    on_host = {
        os.path.relpath(os.path.join(dirpath, name), base)
        for dirpath, dirnames, filenames in os.walk(os.fsencode(root))
        for name in (*dirnames, *filenames)
    }
    problems += [f"extra in replica: {os.fsdecode(rel)!r}" for rel in sorted(on_host - expected)]
    return problems + plain_leaks(source, jail, [folder])


def plain_leaks(source: Path, jail: Path, names: list[str]) -> list[str]:
    """What of ``source`` (its names, its files' contents) and of ``names`` ``jail`` shows.

    Names of five characters or more; a 32-byte sample of every file of 64 bytes or more.
    """
    wanted = {rel: entry for rel, entry in tree(source).items() if not excluded(rel)}
    words = {os.fsencode(name) for name in names}
    words |= {part for rel in wanted for part in rel.split(b"/") if len(part) >= 5}
    samples = [c[16:48] for kind, c, _ in wanted.values() if kind == "file" and c and len(c) >= 64]
    leaks = []
    base = os.fsencode(jail)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(path, base))
            leaks += [f"name {os.fsdecode(w)!r} in {rel}" for w in words if w in name]
            if name in filenames:
                with open(path, "rb") as file:
                    data = file.read()
                if any(sample in data for sample in samples):
                    leaks.append(f"content of the folder in {rel}")
    return leaks


def compare_trees(source: Path, replica: Path) -> list[str]:
    """Return the differences between a folder and its replica (excluded files left out)."""
    if not replica.is_dir():
        return [f"no replica at {replica}"]
    want = {rel: entry for rel, entry in tree(source).items() if not excluded(rel)}
    have = tree(replica)
    problems = []
    for rel in sorted(want.keys() | have.keys()):
        shown = os.fsdecode(rel)
        if rel not in have:
            problems.append(f"missing in replica: {shown!r}")
        elif rel not in want:
            problems.append(f"extra in replica: {shown!r}")
        elif want[rel][:2] != have[rel][:2]:
            problems.append(f"differs: {shown!r}")
        elif want[rel][2] != have[rel][2]:
            problems.append(f"executable bit differs: {shown!r}")
    return problems


# --- Home Assistant processes ---------------------------------------------------------------


@dataclass
class Instance:
    """One running Home Assistant (in its own process group, so Ctrl-C reaches us alone)."""

    node: Node
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.node.home.mkdir(parents=True, exist_ok=True)
        with open(self.node.log, "ab") as log:
            log.write(f"\n=== scripts/demo starts {self.node.name} {time.ctime()}\n".encode())
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO_ROOT / "scripts" / "ha_bootstrap.py"),
                    "run",
                    "--config",
                    str(self.node.config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> None:
        code = self.exit_code
        if code is not None:
            raise DemoError(
                f"{self.node.name}'s Home Assistant exited with status {code}; "
                f"see {self.node.log} and {self.node.config / 'home-assistant.log'}\n"
                + tail(self.node.log)
            )

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill_group(self) -> None:
        """Kill whatever is left in the process group (helpers a stopped instance left)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def stop_all(instances: list[Instance], timeout: float = STOP_TIMEOUT) -> None:
    """Stop every instance: SIGTERM (Home Assistant stops cleanly), SIGKILL after ``timeout``."""
    running = [inst for inst in instances if inst.exit_code is None and inst.proc is not None]
    if running:
        say("stopping " + " and ".join(inst.node.name for inst in running))
    for inst in running:
        inst.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for inst in running:
        if not inst.wait(max(0.1, deadline - time.monotonic())):
            say(f"{inst.node.name} did not stop within {timeout:.0f} s: killing it")
            inst.kill_group()
            inst.wait(10)
    for inst in instances:
        inst.kill_group()  # nothing may outlive the demo


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    | {line}" for line in text[-lines:])


def ssh_port_free(port: int) -> bool:
    """Whether a MyNAS node could listen on ``port`` on every interface."""
    if hb.port_in_use(port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_ports(nodes: tuple[Node, ...]) -> None:
    problems = []
    for node in nodes:
        if hb.port_in_use(node.ha_port):
            problems.append(
                f"port {node.ha_port} ({node.name}'s Home Assistant) is in use: another Home"
                " Assistant (scripts/develop, or a demo still running)?"
            )
        if not ssh_port_free(node.ssh_port):
            problems.append(
                f"port {node.ssh_port} ({node.name}'s MyNAS node) is in use on this machine"
            )
    if problems:
        raise DemoError("cannot start the demo:\n  " + "\n  ".join(problems))


# --- configuration files --------------------------------------------------------------------

LOVELACE_BLOCK = f"""
# Added by scripts/demo: the MyNAS dashboard ({DASHBOARD_FILE}, a copy of the repository's
# dashboards/mynas.yaml with this node's names), in the sidebar as "MyNAS".
lovelace:
  dashboards:
    {DASHBOARD_URL}:
      mode: yaml
      title: MyNAS
      icon: mdi:nas
      show_in_sidebar: true
      filename: {DASHBOARD_FILE}
"""
# The French dashboard, added beside (also to a demo directory made before it existed).
LOVELACE_FR_ENTRY = f"""    {DASHBOARD_FR_URL}:
      mode: yaml
      title: MyNAS (français)
      icon: mdi:nas
      show_in_sidebar: true
      filename: {DASHBOARD_FR_FILE}
"""


def dashboard_for(node: Node, other: Node, text: str) -> str:
    """The repository's dashboard (written for Alice, paired with Bob) for ``node``."""
    if node.name == "Alice":
        return text
    swap = {"alice": node.slug, "Alice": node.name, "bob": other.slug, "Bob": other.name}
    return re.sub(r"alice|Alice|bob|Bob", lambda match: swap[match.group(0)], text)


def install_dashboard(node: Node, other: Node) -> None:
    """Declare the YAML dashboard in configuration.yaml (once) and write its file (each run)."""
    yaml_path = node.config / "configuration.yaml"
    text = yaml_path.read_text(encoding="utf-8")
    if not re.search(r"^lovelace:", text, re.MULTILINE):
        text = text.rstrip("\n") + "\n" + LOVELACE_BLOCK
    if DASHBOARD_FR_URL not in text:
        text = text.replace("\n  dashboards:\n", "\n  dashboards:\n" + LOVELACE_FR_ENTRY, 1)
    yaml_path.write_text(text, encoding="utf-8")
    for source, name in (
        (DASHBOARD_SOURCE, DASHBOARD_FILE),
        (DASHBOARD_FR_SOURCE, DASHBOARD_FR_FILE),
    ):
        target = node.config / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            dashboard_for(node, other, source.read_text(encoding="utf-8")), encoding="utf-8"
        )


def install_blueprints(node: Node) -> None:
    """Copy the repository's automation blueprints where Home Assistant lists them."""
    target = node.config / BLUEPRINTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(BLUEPRINTS_SOURCE.glob("*.yaml")):
        shutil.copyfile(source, target / source.name)


def dashboard_entities(text: str) -> set[str]:
    """Every entity id a dashboard names (``entity:``/``entities:`` and action targets)."""
    found: set[str] = set()

    def walk(value: Any, key: str | None = None) -> None:
        if isinstance(value, dict):
            for sub_key, sub in value.items():
                walk(sub, sub_key)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif (
            isinstance(value, str)
            and key in ("entity", "entities", "entity_id")
            and re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", value)
        ):
            found.add(value)

    walk(yaml.safe_load(text))
    return found


def read_jail(config: Path, entry_id: str, peer_title: str) -> str | None:
    """The jail (folder on the disk) a node keeps for the peer ``peer_title`` (read only)."""
    try:
        store = json.loads((config / ".storage" / "core.config_entries").read_text())
    except OSError, ValueError:
        return None
    for entry in store["data"]["entries"]:
        if entry["entry_id"] != entry_id:
            continue
        for sub in entry.get("subentries", []):
            if sub["subentry_type"] == "peer" and sub["title"] == peer_title:
                return str(sub["data"]["jail"])
    return None


# --- talking to Home Assistant --------------------------------------------------------------


class Api:
    """REST and websocket calls to one instance, as its owner."""

    def __init__(self, session: aiohttp.ClientSession, node: Node, token: str) -> None:
        self.session = session
        self.node = node
        self.token = token
        self._ids = itertools.count(1)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method, f"{self.node.url}{path}", json=body, headers=self.headers
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise DemoError(
                    f"{self.node.name}: {method} {path} -> {response.status} {text[:500]}"
                )
            return json.loads(text) if text else None

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.call("POST", path, {} if body is None else body)

    async def ws(self, msg_type: str, **fields: Any) -> Any:
        async with self.session.ws_connect(f"{self.node.url}/api/websocket") as sock:
            await sock.receive_json()  # auth_required
            await sock.send_json({"type": "auth", "access_token": self.token})
            reply = await sock.receive_json()
            if reply.get("type") != "auth_ok":
                raise DemoError(f"{self.node.name}: websocket login failed: {reply}")
            msg_id = next(self._ids)
            await sock.send_json({"id": msg_id, "type": msg_type, **fields})
            while True:
                reply = await sock.receive_json()
                if reply.get("id") == msg_id and reply.get("type") == "result":
                    break
        if not reply.get("success"):
            raise DemoError(f"{self.node.name}: {msg_type} failed: {reply.get('error')}")
        return reply.get("result")

    async def states(self) -> dict[str, dict[str, Any]]:
        return {state["entity_id"]: state for state in await self.get("/api/states")}

    async def mynas_entry(self) -> dict[str, Any] | None:
        entries = await self.get("/api/config/config_entries/entry?domain=mynas")
        return entries[0] if entries else None

    async def subentries(self, entry_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.ws(
            "config_entries/subentries/list", entry_id=entry_id
        )
        return result

    async def mynas_entities(self) -> list[dict[str, Any]]:
        entities = await self.ws("config/entity_registry/list")
        return [entity for entity in entities if entity["platform"] == "mynas"]


Answer = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]


async def run_flow(api: Api, base: str, handler: Any, answers: dict[str, Answer]) -> dict[str, Any]:
    """Start a flow at ``base`` and answer each step it shows from ``answers`` (by step id)."""
    result = await api.post(base, {"handler": handler})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        kind = result["type"]
        if kind in ("create_entry", "abort"):
            return dict(result)
        if kind == "progress":  # e.g. the pairing's connection test: Home Assistant goes on
            await asyncio.sleep(0.5)
            result = await api.get(f"{base}/{result['flow_id']}")
            continue
        step = result["step_id"]
        if step not in answers:
            raise DemoError(f"{api.node.name}: unexpected step {step!r} in {base}: {result}")
        if result.get("errors"):
            raise DemoError(f"{api.node.name}: {base} step {step!r}: {result['errors']}")
        answer = answers[step]
        body = answer(result) if callable(answer) else answer
        if kind == "menu":
            body = {"next_step_id": body["next_step_id"]}
        result = await api.post(f"{base}/{result['flow_id']}", body)
    raise DemoError(f"{api.node.name}: {base} did not finish: {result}")


async def wait_for[T](
    what: str, probe: Callable[[], Awaitable[T | None]], limit: float, every: float = 0.5
) -> T:
    """Call ``probe`` until it returns something other than None (``limit`` seconds at most)."""
    deadline = time.monotonic() + limit
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {limit:.0f} s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class NodeState:
    """What the demo learnt about a running node."""

    node: Node
    api: Api
    entry_id: str = ""
    code: str = ""
    peer_id: str = ""
    folder_id: str = ""
    last_backup_entity: str = ""
    notes: list[str] = field(default_factory=list)


async def wait_running(inst: Instance, session: aiohttp.ClientSession, login: hb.Login) -> Api:
    """Wait until the instance answers, log in, and wait until Home Assistant is running."""
    node = inst.node
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        inst.check_alive()
        try:
            async with session.get(
                f"{node.url}/manifest.json", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                if response.status == 200:
                    break
        except aiohttp.ClientError, TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"{node.name} did not answer within {START_TIMEOUT} s; see {node.log}")
        await asyncio.sleep(1)
    token = await asyncio.to_thread(hb.login, node.url, login.username, login.password)
    api = Api(session, node, token)

    async def running() -> bool | None:
        inst.check_alive()
        return True if (await api.get("/api/config")).get("state") == "RUNNING" else None

    await wait_for(f"{node.name} to finish starting", running, START_TIMEOUT)
    return api


async def wait_loaded(api: Api, entry_id: str, limit: float = 120) -> None:
    async def loaded() -> bool | None:
        entry = await api.mynas_entry()
        if entry is None or entry["entry_id"] != entry_id:
            return None
        if entry["state"] in ("setup_error", "setup_retry", "failed_unload"):
            raise DemoError(
                f"{api.node.name}: MyNAS did not start ({entry['state']}: "
                f"{entry.get('reason')}); see {api.node.config / 'home-assistant.log'}"
            )
        return True if entry["state"] == "loaded" else None

    await wait_for(f"{api.node.name}'s MyNAS node to load", loaded, limit)


async def wait_subentry_entities(api: Api, entry_id: str, subentry_id: str) -> None:
    """Wait until the node reloaded with a new subentry: its entities have states."""

    async def ready() -> bool | None:
        entities = [
            e
            for e in await api.mynas_entities()
            if e["config_subentry_id"] == subentry_id and not e["disabled_by"]
        ]
        if not entities:
            return None
        states = await api.states()
        if any(e["entity_id"] not in states for e in entities):
            return None
        return True

    await wait_for(f"{api.node.name}'s new entities", ready, 120)
    await wait_loaded(api, entry_id)


async def ensure_node(state: NodeState) -> None:
    """Set MyNAS up on the node through the config flow, unless it already is."""
    api, node = state.api, state.node
    entry = await api.mynas_entry()
    if entry is None:
        await set_up(state, node.name)
        say(f"{node.name}: MyNAS set up (config flow), disk {node.disk}, port {node.ssh_port}")
        await wait_loaded(api, state.entry_id)
        await alert_at_once(state)
    else:
        state.entry_id = entry["entry_id"]
        say(f"{node.name}: MyNAS already set up ({entry['title']})")
    await wait_loaded(api, state.entry_id)


async def alert_at_once(state: NodeState) -> None:
    """Raise "unreachable" at the first failed contact (options flow), not after 3 days.

    So that stopping one demo node shows the repair issue on the other at its next sync or
    connection test; a second run keeps whatever the user set since.
    """
    api = state.api
    base = "/api/config/config_entries/options/flow"
    menu = await api.post(base, {"handler": state.entry_id})
    form = await api.post(f"{base}/{menu['flow_id']}", {"next_step_id": "settings"})
    shown = {field["name"]: field.get("default") for field in form.get("data_schema", [])}
    if shown.get("unreachable_hours") == 0:  # already so: close the form, change nothing
        await api.call("DELETE", f"{base}/{form['flow_id']}")
        return
    done = await api.post(
        f"{base}/{form['flow_id']}",
        {"overdue_hours": 36, "unreachable_hours": 0, "upnp": False, "inbound": "auto"},
    )
    if done["type"] != "create_entry":
        raise DemoError(f"{state.node.name}: setting the alerts failed: {done}")
    say(f"{state.node.name}: alerts when the other node is unreachable at once (options flow)")


async def change_settings(state: NodeState, **changes: Any) -> None:
    """Submit the node's "Addresses and alerts" with ``changes``, the rest as shown."""
    api = state.api
    base = "/api/config/config_entries/options/flow"
    menu = await api.post(base, {"handler": state.entry_id})
    form = await api.post(f"{base}/{menu['flow_id']}", {"next_step_id": "settings"})
    shown = {
        field["name"]: field["default"]
        for field in form.get("data_schema", [])
        if "default" in field
    }
    done = await api.post(f"{base}/{form['flow_id']}", {**shown, **changes})
    if done["type"] != "create_entry":
        raise DemoError(f"{state.node.name}: changing its settings failed: {done}")


async def read_invite_code(state: NodeState) -> None:
    """Read the node's invite code from the options flow's "Show our invite code" step."""
    api = state.api
    base = "/api/config/config_entries/options/flow"
    menu = await api.post(base, {"handler": state.entry_id})
    if menu["type"] != "menu" or "invite" not in menu["menu_options"]:
        raise DemoError(f"{state.node.name}: unexpected options flow: {menu}")
    form = await api.post(f"{base}/{menu['flow_id']}", {"next_step_id": "invite"})
    await api.call("DELETE", f"{base}/{form['flow_id']}")  # nothing to change: close it
    state.code = form["description_placeholders"]["code"]
    invite_codec.decode(state.code)  # a valid code, or this raises


async def subentry(state: NodeState, kind: str, unique_id: str) -> dict[str, Any] | None:
    """The node's subentry of ``kind`` ("peer", "folder") with ``unique_id``, if it has one."""
    for sub in await state.api.subentries(state.entry_id):
        if sub["subentry_type"] == kind and sub["unique_id"] == unique_id:
            return sub
    return None


async def ensure_peer(state: NodeState, other: NodeState) -> None:
    """Pair with ``other`` by pasting its invite code (once)."""
    api = state.api
    fingerprint = invite_codec.decode(other.code).fingerprint
    if (paired := await subentry(state, "peer", fingerprint)) is not None:
        state.peer_id = paired["subentry_id"]
        say(f"{state.node.name}: already paired with {paired['title']}")
        return
    result = await run_flow(
        api,
        "/api/config/config_entries/subentries/flow",
        [state.entry_id, "peer"],
        {
            "user": {"invite_code": other.code},
            "confirm": {"quota_gb": QUOTA_GB},
            # Submitting these finishes pairing; which one shows says how the test went.
            "tested_waiting": {},
            "tested_unreachable": {},
        },
    )
    if result["type"] != "create_entry":
        raise DemoError(f"{state.node.name}: pairing with {other.node.name} failed: {result}")
    if (paired := await subentry(state, "peer", fingerprint)) is not None:
        state.peer_id = paired["subentry_id"]
    say(
        f"{state.node.name}: paired with {other.node.name} (pasted its invite code,"
        f" granted {QUOTA_GB} GB)"
    )
    await wait_subentry_entities(api, state.entry_id, state.peer_id)


async def ensure_folder(state: NodeState) -> None:
    """Protect the node's sample folder on its peer (once)."""
    api, node = state.api, state.node
    if (protected := await subentry(state, "folder", FOLDER)) is not None:
        state.folder_id = protected["subentry_id"]
        say(f"{node.name}: already protects {FOLDER}")
        return
    state.folder_id = await protect(
        state, FOLDER, node.folder, encrypted=True, exclude="\n".join(EXCLUDE), at="03:00:00"
    )
    say(f"{node.name}: protects {node.folder} as {FOLDER!r}, daily at 03:00")
    await wait_subentry_entities(api, state.entry_id, state.folder_id)


async def protect(
    state: NodeState, name: str, path: Path, *, encrypted: bool, exclude: str, at: str
) -> str:
    """Protect ``path`` as ``name`` on the node's peer, daily ``at``; its subentry id."""
    result = await run_flow(
        state.api,
        "/api/config/config_entries/subentries/flow",
        [state.entry_id, "folder"],
        {
            "user": {
                "name": name,
                "path": str(path),
                "peers": [state.peer_id],
                "encrypted": encrypted,
                "retention_days": 30,
                "bwlimit_mbps": 0,
                "exclude": exclude,
            },
            "schedule": {"next_step_id": "daily"},
            "daily": {"time": at},
        },
    )
    if result["type"] != "create_entry":
        raise DemoError(f"{state.node.name}: protecting {name} failed: {result}")
    protected = await subentry(state, "folder", name)
    if protected is None:
        raise DemoError(f"{state.node.name}: {name} is protected but not listed")
    return str(protected["subentry_id"])


async def sync_now(state: NodeState) -> None:
    """Run ``mynas.sync`` with ``wait: true``; retry while the peer is still reloading."""
    api, node = state.api, state.node
    for attempt in range(1, 6):
        started = time.monotonic()
        reply = await api.post(
            "/api/services/mynas/sync?return_response", {"folder": FOLDER, "wait": True}
        )
        results = reply["service_response"]["results"]
        failed = [r for r in results if r.get("status") != "success"]
        if not failed:
            for result in results:
                files = result.get("files_sent", 0)
                sent = (
                    f"{files} files, {result.get('bytes_sent', 0) / 1e6:.1f} MB sent"
                    if files
                    # The first backup ran when the folder was protected: all is there.
                    else "the copy there is already complete: nothing to send"
                )
                say(
                    f"{node.name}: synced {result['folder']} to {result['peer']} in"
                    f" {time.monotonic() - started:.1f} s ({sent})"
                )
            return
        say(f"{node.name}: sync attempt {attempt} failed: {failed[0].get('error')}")
        await asyncio.sleep(3)
    raise DemoError(f"{node.name}: the first sync kept failing; see {node.log}")


async def list_folders(state: NodeState, peer_name: str) -> list[dict[str, Any]]:
    """The folders ``peer_name`` keeps for this node: ``mynas.list_folders`` over the websocket.

    Each as the service says it (``name``, ``encrypted``, ``files``, ``stored_bytes``,
    ``stored_size``, ``last_update``, ``home_assistant_backups``); DemoError if the friend
    could not answer. What the headless check asks of a node rebuilt from its key.
    """
    result = await state.api.ws(
        "call_service",
        domain="mynas",
        service="list_folders",
        service_data={"peer": peer_name},
        return_response=True,
    )
    (peer,) = result["response"]["peers"]
    if peer.get("error"):
        raise DemoError(f"{state.node.name}: {peer_name} could not list: {peer['error']}")
    folders: list[dict[str, Any]] = peer["folders"]
    return folders


async def wait_last_backup(state: NodeState) -> str:
    """Wait until the folder's "last backup" sensor has a time; return its entity id."""
    api = state.api

    async def ready() -> str | None:
        entity = next(
            (
                e["entity_id"]
                for e in await api.mynas_entities()
                if e.get("translation_key") == "last_success"
                and e["config_subentry_id"] == state.folder_id
            ),
            None,
        )
        if entity is None:
            return None
        current = (await api.states()).get(entity)
        if current is None or current["state"] in ("unknown", "unavailable"):
            return None
        return entity

    state.last_backup_entity = await wait_for(f"{state.node.name}'s last-backup sensor", ready, 120)
    return state.last_backup_entity


async def pair_state(state: NodeState, folder_id: str, key: str) -> str | None:
    """The state of the folder's ``key`` sensor for the node's peer (None: no such sensor)."""
    entity = next(
        (
            e["entity_id"]
            for e in await state.api.mynas_entities()
            if e.get("translation_key") == key and e["config_subentry_id"] == folder_id
        ),
        None,
    )
    if entity is None:
        return None
    current = (await state.api.states()).get(entity)
    return None if current is None else str(current["state"])


async def connection_entity(state: NodeState) -> str | None:
    """The node's "Connection" sensor for its peer (None: no such sensor yet)."""
    return next(
        (
            e["entity_id"]
            for e in await state.api.mynas_entities()
            if e.get("translation_key") == "connected" and e["config_subentry_id"] == state.peer_id
        ),
        None,
    )


async def peer_connected(state: NodeState) -> str | None:
    """The state of the node's "Connection" sensor for its peer (None: no such sensor yet)."""
    entity = await connection_entity(state)
    if entity is None:
        return None
    current = (await state.api.states()).get(entity)
    return None if current is None else str(current["state"])


async def refresh_figures(state: NodeState) -> None:
    """Reload the node once so that its peer test runs now, with both nodes up.

    The peer's "Connected" and "space we use there" come from the peer test, which runs when
    the node starts and then every 10 minutes: reloading runs one now, so the dashboard shows
    the first sync's figures at once. Call it for one node at a time (a node that reloads
    does not answer its peer's test).
    """
    await state.api.post(f"/api/config/config_entries/entry/{state.entry_id}/reload")
    await wait_loaded(state.api, state.entry_id)

    async def tested() -> bool | None:
        # A reload shows the last known state at once; "last_test" comes with the new test.
        entity = await connection_entity(state)
        current = (await state.api.states()).get(entity or "", {})
        if current.get("attributes", {}).get("last_test") is None:
            return None
        return True if current.get("state") == "on" else None

    try:
        await wait_for(f"{state.node.name}'s peer test", tested, 60)
    except DemoError as err:
        say(f"{state.node.name}: {err}")


async def bring_up(
    nodes: tuple[Node, Node],
    instances: list[Instance],
    login: hb.Login,
    session: aiohttp.ClientSession,
) -> tuple[NodeState, NodeState]:
    states = []
    for inst in instances:
        say(f"starting {inst.node.name}'s Home Assistant on {inst.node.url} (log: {inst.node.log})")
        inst.start()
        api = await wait_running(inst, session, login)
        say(f"{inst.node.name} is running")
        states.append(NodeState(inst.node, api))
    alice, bob = states
    await asyncio.gather(ensure_node(alice), ensure_node(bob))
    await asyncio.gather(read_invite_code(alice), read_invite_code(bob))
    # Alice pastes Bob's code first (the test says Bob has not added her yet), then Bob
    # pastes Alice's (the test passes at once).
    await ensure_peer(alice, bob)
    await ensure_peer(bob, alice)
    await ensure_folder(alice)
    await ensure_folder(bob)
    await asyncio.gather(sync_now(alice), sync_now(bob))
    await asyncio.gather(wait_last_backup(alice), wait_last_backup(bob))
    await refresh_figures(alice)
    await refresh_figures(bob)
    return alice, bob


# --- checks and the banner ------------------------------------------------------------------


@dataclass
class Checks:
    """The outcome of the headless check: what passed, what failed and why."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def record(self, what: str, problems: list[str]) -> None:
        if problems:
            self.failed.append(what)
            for problem in problems[:20]:
                say(f"FAIL: {what}: {problem}")
        else:
            self.passed.append(what)
            say(f"ok:   {what}")

    @property
    def line(self) -> str:
        """The closing line CI reads: 'N passed, N failed'."""
        return f"headless-check: {len(self.passed)} passed, {len(self.failed)} failed"


async def headless_check(states: tuple[NodeState, NodeState]) -> Checks:
    """Check the replicas, the sensors and the dashboard's entities."""
    checks = Checks()
    for state, other in (states, states[::-1]):
        node = state.node
        # Home Assistant writes its config entries a moment after a change.
        with contextlib.suppress(DemoError):
            await wait_for(
                f"{other.node.name}'s stored peers",
                functools.partial(
                    asyncio.to_thread, read_jail, other.node.config, other.entry_id, node.name
                ),
                20,
            )
        jail = read_jail(other.node.config, other.entry_id, node.name)
        space = other.node.disk / (jail or node.name)
        count = sum(1 for rel in tree(node.folder) if not excluded(rel))
        [key_file] = (node.config / "mynas").glob("*.key")
        checks.record(
            f"{node.name}'s {FOLDER} ({count} entries) is on {other.node.name}'s disk"
            f" encrypted (no name, no content in clear), and opens byte-identical with"
            f" {node.name}'s key",
            [f"{other.node.name} has no peer called {node.name}"]
            if jail is None
            else await asyncio.to_thread(compare_sealed, node.folder, space, key_file, FOLDER),
        )
        states_now = await state.api.states()
        last = states_now.get(state.last_backup_entity, {}).get("state")
        checks.record(
            f"{node.name}: {state.last_backup_entity} is set ({last})",
            [f"it is {last}"] if last in (None, "unknown", "unavailable") else [],
        )
        shown = {
            key: await pair_state(state, state.folder_id, key)
            for key in ("encryption", "next_verify")
        }
        checks.record(
            f"{node.name}: its {FOLDER} copy on {other.node.name} reads encrypted, and its"
            f" monthly verify is planned ({shown['next_verify']})",
            []
            if shown["encryption"] == "encrypted"
            and shown["next_verify"] not in (None, "unknown", "unavailable")
            else [f"Encryption {shown['encryption']}, Next verify {shown['next_verify']}"],
        )
        connected = await peer_connected(state)
        checks.record(
            f"{node.name}: {other.node.name} is connected",
            [] if connected == "on" else [f"its Connection sensor is {connected}"],
        )
        try:
            kept = {item["name"] for item in await list_folders(state, other.node.name)}
            problems = [] if FOLDER in kept else [f"it lists {sorted(kept)}"]
        except DemoError as err:
            problems = [str(err)]
        checks.record(
            f"{node.name}: mynas.list_folders names {FOLDER} kept at {other.node.name}", problems
        )
        named = dashboard_entities((node.config / DASHBOARD_FILE).read_text(encoding="utf-8"))
        missing = sorted(named - states_now.keys())
        checks.record(
            f"{node.name}: the {len(named)} entities the dashboard names exist",
            [f"unknown entities: {missing}"] if missing else [],
        )
        unknown = await unknown_while_idle(state)
        checks.record(f"{node.name}: no MyNAS entity reads unknown while all is at rest", unknown)
        raw = await raw_translation_keys(state)
        checks.record(
            f"{node.name}: the texts Home Assistant serves for MyNAS (en, fr) are all written out",
            raw,
        )
        listed = await state.api.ws("blueprint/list", domain="automation")
        ours = {path: item for path, item in listed.items() if path.startswith("mynas/")}
        wanted = {f"mynas/{path.name}" for path in BLUEPRINTS_SOURCE.glob("*.yaml")}
        checks.record(
            f"{node.name}: Home Assistant loads the {len(wanted)} blueprints",
            [f"{path}: {ours.get(path, {}).get('error', 'not listed')}" for path in sorted(wanted)]
            if any("metadata" not in ours.get(path, {}) for path in wanted)
            else [],
        )
    return checks


# Categories of the texts Home Assistant serves the frontend for an integration.
TRANSLATION_CATEGORIES = (
    "config",
    "config_subentries",
    "options",
    "entity",
    "exceptions",
    "issues",
    "services",
    "selector",
)


async def unknown_while_idle(state: NodeState) -> list[str]:
    """MyNAS entities that read "unknown" once every backup is at rest (they should not).

    Buttons are left out: a button's state is when it was last pressed, "unknown" until the
    first press for every button in Home Assistant.
    """
    api = state.api
    entities = [
        e for e in await api.mynas_entities() if not e.get("disabled_by") and e["entity_id"]
    ]
    sync_states = [e["entity_id"] for e in entities if e.get("translation_key") == "sync_state"]

    async def idle() -> dict[str, dict[str, Any]] | None:
        now = await api.states()
        return now if all(now.get(e, {}).get("state") == "idle" for e in sync_states) else None

    now = await wait_for(f"{state.node.name}'s backups at rest", idle, 120)
    return sorted(
        f"{e['entity_id']} is unknown"
        for e in entities
        if not e["entity_id"].startswith("button.")
        and now.get(e["entity_id"], {}).get("state") == "unknown"
    )


async def raw_translation_keys(state: NodeState) -> list[str]:
    """Texts Home Assistant serves for MyNAS that are a raw ``[%key:…%]`` reference."""
    raw = []
    for language in ("en", "fr"):
        served = 0
        for category in TRANSLATION_CATEGORIES:
            reply = await state.api.ws(
                "frontend/get_translations",
                language=language,
                category=category,
                integration=["mynas"],
            )
            texts = reply["resources"]
            served += len(texts)
            raw += [f"{language}: {key}" for key, text in texts.items() if "[%key:" in text]
        if not served:
            raw.append(f"{language}: Home Assistant serves no text for MyNAS")
    return raw


HA_BACKUP_NAME = "MyNAS demo backup"


async def check_ha_backup(states: tuple[NodeState, NodeState], checks: Checks) -> None:
    """Alice backs Home Assistant up to Bob through HA's backup API, and gets it back.

    ``backup/generate`` with the MyNAS location for Bob (and Alice's local one, to compare
    with); the backup is listed on Alice, its archive is on Bob's disk inside Alice's space
    there, and a download through HA's own view from the MyNAS location equals both.
    """
    state, other = states
    api = state.api
    agents = (await api.ws("backup/agents/info"))["agents"]
    ours = [a["agent_id"] for a in agents if a["agent_id"].startswith("mynas.")]
    named = [a["agent_id"] for a in agents if a["agent_id"] in ours and a["name"] == "Bob"]
    checks.record(
        f"{state.node.name}: {other.node.name} is a backup location in Home Assistant",
        [] if named else [f"backup agents: {agents}"],
    )
    if not named:
        return
    agent_id = named[0]
    for old in (await api.ws("backup/info"))["backups"]:  # an earlier run's
        if old["name"] == HA_BACKUP_NAME:
            await api.ws("backup/delete", backup_id=old["backup_id"])
    await api.ws(
        "backup/generate",
        agent_ids=["backup.local", agent_id],
        include_homeassistant=True,
        include_database=True,
        name=HA_BACKUP_NAME,
    )

    async def made() -> dict[str, Any] | None:
        info = await api.ws("backup/info")
        event = info.get("last_action_event") or {}
        if event.get("manager_state") == "create_backup" and event.get("state") == "failed":
            raise DemoError(f"{state.node.name}: the backup failed: {event}")
        if info["state"] != "idle":
            return None
        found = [b for b in info["backups"] if b["name"] == HA_BACKUP_NAME]
        return found[0] if found else None

    backup = await wait_for(f"{state.node.name}'s Home Assistant backup", made, SYNC_TIMEOUT)
    backup_id = backup["backup_id"]
    checks.record(
        f"{state.node.name}: backup {backup_id} is listed at {other.node.name}",
        []
        if agent_id in backup["agents"] and not backup.get("failed_agent_ids")
        else [f"listed as {backup}"],
    )
    jail = read_jail(other.node.config, other.entry_id, state.node.name) or state.node.name
    local = [p for p in (state.node.config / "backups").glob("*.tar") if _tar_slug(p) == backup_id]
    uploaded = local[0].read_bytes() if local else b""
    # Sealed on Bob's disk: found and opened with Alice's own key, as only she can.
    [key_file] = (state.node.config / "mynas").glob("*.key")
    keys = DataKeys.of(identity_codec.load(key_file))
    area = SealedArea(keys)
    name = f"{backup_id}.tar".encode()
    on_bob = other.node.disk / jail / os.fsdecode(area.stored(name))
    stored = on_bob.read_bytes() if on_bob.is_file() else b""
    try:
        opened = sealed.open_sealed(keys.contents, area.jail_path(name), stored)[1]
    except sealed.SealedFileError as err:
        opened = b""
        say(f"{other.node.name}'s copy does not open: {err}")
    plain_names = [p for p in (other.node.disk / jail).rglob("*") if backup_id in p.name]
    checks.record(
        f"{state.node.name}: its {len(uploaded) / 1e6:.1f} MB are on {other.node.name}'s disk"
        f" in {state.node.name}'s space, sealed ({on_bob.relative_to(other.node.disk)})",
        []
        if uploaded and opened == uploaded and stored != uploaded and not plain_names
        else [
            f"{on_bob}: {len(stored)} bytes ({len(opened)} once opened), Alice's own copy"
            f" {len(uploaded)} bytes; its id in names there: {plain_names}"
        ],
    )
    url = f"{state.node.url}/api/backup/download/{backup_id}?agent_id={agent_id}"
    async with api.session.get(url, headers=api.headers) as response:
        downloaded = await response.read() if response.status == 200 else b""
        status = response.status
    checks.record(
        f"{state.node.name}: downloading it from {other.node.name} through HA gives it back",
        []
        if downloaded and downloaded == uploaded
        else [f"HTTP {status}, {len(downloaded)} bytes, {len(uploaded)} uploaded"],
    )
    say(
        f"{state.node.name}: Home Assistant backup {backup_id} kept at {other.node.name}"
        f" ({len(uploaded) / 1e6:.1f} MB, sealed there)"
    )


async def check_conversion(states: tuple[NodeState, NodeState], checks: Checks) -> None:
    """A plain folder of Alice's, converted through its repair issue as a user would.

    Alice protects a second folder with "Encrypt the copy" unticked (as folders set up
    before encryption existed are): it lands plain on Bob's disk and raises the repair
    issue; its fix flow, driven over Home Assistant's REST API, sends it again encrypted;
    then Bob's disk holds no plain name or content of it outside his trash.
    """
    state, other = states
    api, node = state.api, state.node
    source = node.home / PLAIN_FOLDER
    jail = read_jail(other.node.config, other.entry_id, node.name) or node.name
    space = other.node.disk / jail
    plain = await subentry(state, "folder", PLAIN_FOLDER)
    folder_id = None if plain is None else str(plain["subentry_id"])
    if folder_id is None:  # a first run: set it up plain
        for rel, content in PLAIN_FILES.items():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes(content)
        folder_id = await protect(
            state, PLAIN_FOLDER, source, encrypted=False, exclude="", at="04:00:00"
        )
        await wait_subentry_entities(api, state.entry_id, folder_id)

        async def plain_there() -> bool | None:
            return True if (space / PLAIN_FOLDER / "Receipts 2019.csv").is_file() else None

        await wait_for(f"{PLAIN_FOLDER} on {other.node.name}'s disk", plain_there, SYNC_TIMEOUT)
        say(f"{node.name}: protects {source} as {PLAIN_FOLDER!r}, plain (encryption unticked)")
    issue_id = f"convert_plain_{folder_id}"
    listed = await api.ws("repairs/list_issues")
    raised = [i for i in listed["issues"] if i["domain"] == "mynas" and i["issue_id"] == issue_id]
    if raised:  # a first run (or one cut short): readable at Bob's, and the issue says so
        checks.record(
            f"{node.name}: {PLAIN_FOLDER} is plain on {other.node.name}'s disk, and a repair"
            " issue says the friend can read it",
            []
            if await pair_state(state, folder_id, "encryption") == "plain"
            and (space / PLAIN_FOLDER).is_dir()
            else [f"Encryption {await pair_state(state, folder_id, 'encryption')}"],
        )
        base = "/api/repairs/issues/fix"
        result = await api.post(base, {"handler": "mynas", "issue_id": issue_id})
        if result.get("step_id") == "confirm":
            result = await api.post(f"{base}/{result['flow_id']}", {})
        deadline = time.monotonic() + SYNC_TIMEOUT
        while result.get("type") == "progress" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            result = await api.get(f"{base}/{result['flow_id']}")
        checks.record(
            f"{node.name}: the repair issue's dialog encrypts {PLAIN_FOLDER}'s copy",
            [] if result.get("type") == "create_entry" else [f"the flow ended with {result}"],
        )
        await wait_loaded(api, state.entry_id)

    async def encrypted() -> str | None:
        shown = await pair_state(state, folder_id, "encryption")
        return shown if shown == "encrypted" else None

    with contextlib.suppress(DemoError):
        await wait_for(f"{PLAIN_FOLDER} to read encrypted", encrypted, 60)
    listed = await api.ws("repairs/list_issues")
    left = [i for i in listed["issues"] if i["domain"] == "mynas" and i["issue_id"] == issue_id]
    [key_file] = (node.config / "mynas").glob("*.key")
    problems = await asyncio.to_thread(compare_sealed, source, space, key_file, PLAIN_FOLDER)
    shown = await pair_state(state, folder_id, "encryption")
    checks.record(
        f"{node.name}: {PLAIN_FOLDER} is now encrypted on {other.node.name}'s disk (no name,"
        " no content in clear; the plain copy went to the trash), the issue is gone",
        problems
        + ([f"Encryption reads {shown}"] if shown != "encrypted" else [])
        + ([f"the issue is still there: {left}"] if left else []),
    )


async def check_scrub(states: tuple[NodeState, NodeState], checks: Checks) -> None:
    """A file of Alice's copy rots on Bob's disk; her verify finds it and sends it again.

    What the monthly verify (a scrub) does, asked now with ``mynas.verify`` (``repair``, as
    the monthly run repairs): one byte of the stored file of Alice's largest photo is
    flipped on Bob's disk, the way a failing disk damages it. The verify names it, sends it
    again, says so in a repair issue and in the "last verify" sensor, and Bob's copy then
    opens byte-identical again — without a download: Bob's node computed the checksums.
    """
    state, other = states
    api, node = state.api, state.node
    jail = read_jail(other.node.config, other.entry_id, node.name) or node.name
    space = other.node.disk / jail
    [key_file] = (node.config / "mynas").glob("*.key")
    source = node.home / FOLDER
    layout = SealedLayout(FOLDER, DataKeys.of(identity_codec.load(key_file)))
    sizes = {
        rel: len(content or b"")
        for rel, (kind, content, _) in tree(source).items()
        if kind == "file" and not excluded(rel)
    }
    rel = max(sizes, key=sizes.__getitem__)
    stored = space / os.fsdecode(layout.stored(rel))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    say(f"{other.node.name}'s disk: one byte of {os.fsdecode(rel)!r}'s stored copy flipped")

    reply = await api.post(
        "/api/services/mynas/verify?return_response", {"folder": FOLDER, "repair": True}
    )
    [result] = reply["service_response"]["results"]
    listed = await api.ws("repairs/list_issues")
    raised = [
        i["issue_id"]
        for i in listed["issues"]
        if i["domain"] == "mynas" and i["issue_id"].startswith("verify_damage_")
    ]
    last_verify = await pair_state(state, state.folder_id, "last_verify")
    problems = await asyncio.to_thread(compare_sealed, source, space, key_file, FOLDER)
    found = (result.get("host_damaged"), result.get("repaired"), result.get("status"))
    checks.record(
        f"{node.name}: a verify finds the byte rotted on {other.node.name}'s disk"
        f" ({os.fsdecode(rel)}), sends that file again, says so in a repair issue and in"
        " its Last verify sensor; the copy there opens byte-identical again",
        ([] if found == (1, 1, "success") else [f"the verify said {result}"])
        + ([] if raised else ["no verify_damage repair issue"])
        + (
            []
            if last_verify not in (None, "unknown", "unavailable")
            else [f"Last verify {last_verify}"]
        )
        + problems,
    )


def _tar_slug(path: Path) -> str | None:
    """The backup id (``slug``) a Home Assistant backup archive names in its backup.json."""
    try:
        with tarfile.open(path) as archive:
            member = archive.extractfile("./backup.json")
            return None if member is None else str(json.loads(member.read())["slug"])
    except OSError, tarfile.TarError, KeyError, ValueError:
        return None


async def check_address_change(states: tuple[NodeState, NodeState], checks: Checks) -> None:
    """Bob's node moves to another port; Alice's next sync finds it, nothing edited on her side.

    Bob changes his own node (its port and the address he gives friends, as after a move);
    his next sync to Alice tells her node where he is now, over the connection her node
    trusts by his key.
    Then Bob moves back, the same way, so that a demo directory stays usable.
    """
    alice, bob = states
    moves = range(bob.node.ssh_port + 100, bob.node.ssh_port + 200)
    new_port = next(port for port in moves if ssh_port_free(port))
    found: list[str] = []
    for port in (new_port, bob.node.ssh_port):
        flow = await bob.api.post(
            "/api/config/config_entries/flow", {"handler": "mynas", "entry_id": bob.entry_id}
        )
        done = await bob.api.post(
            f"/api/config/config_entries/flow/{flow['flow_id']}",
            {"node_name": bob.node.name, "port": port},
        )
        if done.get("reason") != "reconfigure_successful":
            raise DemoError(f"{bob.node.name}: moving to port {port} failed: {done}")
        await wait_loaded(bob.api, bob.entry_id)
        # The address he gives friends: typed at the new place (back home: none, as before).
        await change_settings(bob, addresses="127.0.0.1" if port == new_port else "")
        await wait_loaded(bob.api, bob.entry_id)
        await sync_now(bob)  # Bob → Alice: announces where he is now
        reply = await alice.api.post(
            "/api/services/mynas/sync?return_response", {"folder": FOLDER, "wait": True}
        )
        results = reply["service_response"]["results"]
        in_use = await peer_address(alice)
        outcome = ", ".join(str(r.get("status")) for r in results) or "nothing ran"
        say(
            f"{bob.node.name} moved to port {port}; {alice.node.name}'s next sync: {outcome},"
            f" reaching him at {in_use}"
        )
        if not results or any(r.get("status") != "success" for r in results):
            found.append(f"with Bob on port {port} her sync gave {results}")
        elif in_use != f"127.0.0.1:{port}":
            found.append(f"with Bob on port {port} her node says it reached him at {in_use}")
    checks.record(
        f"{alice.node.name}: Bob's node moved (port {bob.node.ssh_port} → {new_port} and"
        " back) and her next sync found it, nothing edited on her side",
        found,
    )


async def peer_address(state: NodeState) -> str | None:
    """The state of the node's "Address in use" sensor for its peer."""
    entity = next(
        (
            e["entity_id"]
            for e in await state.api.mynas_entities()
            if e.get("translation_key") == "peer_address"
            and e["config_subentry_id"] == state.peer_id
        ),
        None,
    )
    current = (await state.api.states()).get(entity or "")
    return None if current is None else str(current["state"])


async def check_peer_stopped(
    states: tuple[NodeState, NodeState], other: Instance, checks: Checks
) -> None:
    """Stop Bob: Alice's next sync fails, says why, and raises the "unreachable" issue."""
    state = states[0]
    await alert_at_once(state)  # whatever an earlier run left in the options
    await wait_loaded(state.api, state.entry_id)
    await asyncio.to_thread(stop_all, [other])
    reply = await state.api.post(
        "/api/services/mynas/sync?return_response", {"folder": FOLDER, "wait": True}
    )
    results = reply["service_response"]["results"]
    checks.record(
        f"{state.node.name}: with {other.node.name} stopped, the sync fails and says why",
        []
        if results and all(r["status"] == "failed" and r.get("error") for r in results)
        else [f"results {results}"],
    )
    listed = await state.api.ws("repairs/list_issues")
    issues = [
        issue
        for issue in listed["issues"]
        if issue["domain"] == "mynas" and issue["translation_key"] == "peer_unreachable"
    ]
    checks.record(
        f"{state.node.name}: a repair issue says {other.node.name} is unreachable",
        []
        if issues and issues[0]["translation_placeholders"]["peer"] == other.node.name
        else [f"mynas issues: {[i for i in listed['issues'] if i['domain'] == 'mynas']}"],
    )


# --- after a house fire: a new node from the recovery kit ------------------------------------

# The third node: a fresh Home Assistant that the household sets up after losing Alice's.
REBUILT = "Rebuilt"
QR_URI = "data:image/svg+xml;base64,"


def free_port() -> int:
    """A TCP port nothing listens on now (for the rebuilt node, made afresh at each check)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def kit_issue(state: NodeState) -> dict[str, Any] | None:
    """The node's "Save your recovery kit" repair issue, if it is raised."""
    listed = await state.api.ws("repairs/list_issues")
    wanted = f"recovery_kit_{state.entry_id}"
    return next(
        (i for i in listed["issues"] if i["domain"] == "mynas" and i["issue_id"] == wanted),
        None,
    )


def code_from_key(config: Path) -> str:
    """The recovery code as the engine's command line prints it from the node's key file."""
    [key_file] = (config / "mynas").glob("*.key")
    command = [sys.executable, "-m", "custom_components.mynas.engine", "recovery-code"]
    done = subprocess.run(
        [*command, "--key", str(key_file)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return done.stdout.strip()


async def save_recovery_kit(state: NodeState, checks: Checks) -> str:
    """Alice opens "Save your recovery kit", keeps the code it shows, and confirms it.

    Returns the code. A demo directory whose kit was confirmed in an earlier run has no
    issue left: the code is then read from the key file with the engine's command line.
    """
    api, name = state.api, state.node.name
    issue = await kit_issue(state)
    if issue is None:
        code = await asyncio.to_thread(code_from_key, state.node.config)
        say(f"{name}: the recovery kit was saved in an earlier run; code read from the key file")
        return code
    fix = "/api/repairs/issues/fix"
    form = await api.post(fix, {"handler": "mynas", "issue_id": issue["issue_id"]})
    shown = form.get("description_placeholders") or {}
    code, qr = shown.get("code", ""), shown.get("qr", "")
    try:
        recovery_codec.decode(code)
        problems = [] if qr.startswith(QR_URI) else [f"no QR image: {qr[:60]!r}"]
    except recovery_codec.RecoveryCodeError as err:
        problems = [f"the code shown does not read back: {err}"]
    checks.record(
        f"{name}: the recovery kit issue shows the recovery code and its QR code", problems
    )
    refused = await api.post(f"{fix}/{form['flow_id']}", {"stored": False})
    kept = await kit_issue(state)
    done = await api.post(f"{fix}/{form['flow_id']}", {"stored": True})
    gone = await kit_issue(state)
    checks.record(
        f"{name}: the kit issue stays until the box is ticked, then goes",
        []
        if refused.get("errors") == {"stored": "kit_not_stored"}
        and kept is not None
        and done["type"] == "create_entry"
        and gone is None
        else [f"unticked: {refused}, then {done}; issue left: {gone}"],
    )
    say(f"{name}: recovery kit saved (the code is kept outside the house)")
    return code


async def start_rebuilt(
    node: Node, login: hb.Login, session: aiohttp.ClientSession, instances: list[Instance]
) -> NodeState:
    """A fresh Home Assistant for the rebuilt node (an earlier run's is removed first)."""
    shutil.rmtree(node.home, ignore_errors=True)
    await asyncio.to_thread(
        hb.prepare_config_dir, node.config, node.ha_port, login.username, login.password, node.name
    )
    # The restore goes to a folder of this machine: Home Assistant must be allowed to write it.
    (node.home / "restored").mkdir(parents=True)
    yaml_path = node.config / "configuration.yaml"
    allowed = json.dumps(str(node.home / "restored"))
    text = yaml_path.read_text(encoding="utf-8")
    text = text.replace(
        "homeassistant:\n", f"homeassistant:\n  allowlist_external_dirs:\n    - {allowed}\n", 1
    )
    yaml_path.write_text(text, encoding="utf-8")
    inst = Instance(node)
    instances.append(inst)
    say(f"starting {node.name}'s Home Assistant on {node.url} (a fresh one; log: {node.log})")
    inst.start()
    api = await wait_running(inst, session, login)
    say(f"{node.name} is running")
    return NodeState(node, api)


async def set_up(state: NodeState, name: str, **more: Any) -> None:
    """The node's setup flow on its disk and port, as the user step asks (``more`` added)."""
    api, node = state.api, state.node
    node.disk.mkdir(parents=True, exist_ok=True)
    answers = {
        "node_name": name,
        "storage_root": str(node.disk),
        "port": node.ssh_port,
        "allow_same_disk": True,
        # The demo's nodes talk to each other only: no router is asked for a port.
        "upnp": False,
        **more,
    }
    result = await run_flow(api, "/api/config/config_entries/flow", "mynas", {"user": answers})
    if result["type"] != "create_entry":
        raise DemoError(f"{node.name}: setting MyNAS up failed: {result}")
    state.entry_id = result["result"]["entry_id"]


async def set_up_from_code(state: NodeState, code: str) -> None:
    """The setup flow, with the recovery code typed in as a person copies it off paper."""
    await set_up(state, "Alice", recovery_code=code.lower().replace("-", " "))
    node = state.node
    say(f"{node.name}: MyNAS set up from Alice's recovery code, a fresh disk {node.disk}")
    await wait_loaded(state.api, state.entry_id)


async def check_house_fire(
    states: tuple[NodeState, NodeState],
    starting: Awaitable[NodeState],
    instances: list[Instance],
    login: hb.Login,
    checks: Checks,
) -> None:
    """Alice's house burns: a new node, her recovery code and Bob's invite code get it all back.

    Alice's node is stopped first: it burnt. (Were it still running, Bob would know two nodes
    by one pinned key, and might dial the old one's address for her.) Bob, stopped by the
    previous check, is started again. The new node's Home Assistant (``starting``: started
    while the other checks ran, MyNAS not set up) is set up from the code with a fresh
    storage root, pastes Bob's invite code (Bob still trusts her key: the same identity, so
    Bob does nothing), and restores Family from Bob into an empty folder with mynas.restore.
    """
    alice, bob = states
    code = await save_recovery_kit(alice, checks)
    by_node = {inst.node.name: inst for inst in instances}
    bob_inst = by_node[bob.node.name]

    async def alice_burns() -> None:
        await asyncio.to_thread(stop_all, [by_node[alice.node.name]])
        say(f"{alice.node.name}'s house burns down: her node is gone, her recovery code is not")

    async def bob_again() -> None:
        if bob_inst.exit_code is not None:
            say(f"starting {bob.node.name}'s Home Assistant again")
            bob_inst.start()
            bob.api = await wait_running(bob_inst, bob.api.session, login)
            await wait_loaded(bob.api, bob.entry_id)

    _, _, rebuilt = await asyncio.gather(alice_burns(), bob_again(), starting)
    node = rebuilt.node
    await set_up_from_code(rebuilt, code)
    await read_invite_code(rebuilt)
    theirs = invite_codec.decode(alice.code).fingerprint
    ours = invite_codec.decode(rebuilt.code).fingerprint
    checks.record(
        f"{REBUILT}: set up from Alice's recovery code, it has Alice's identity ({ours})",
        [] if ours == theirs else [f"its key is {ours}, Alice's was {theirs}"],
    )
    checks.record(
        f"{REBUILT}: a new node asks for its recovery kit too",
        [] if await kit_issue(rebuilt) is not None else ["no recovery kit issue"],
    )
    await ensure_peer(rebuilt, bob)
    # Nothing to remember after a fire: the rebuilt node reads what Bob keeps for it.
    held = await list_folders(rebuilt, bob.node.name)
    names = sorted(str(item["name"]) for item in held if not item["home_assistant_backups"])
    backups = (
        " and Home Assistant's backups" if any(i["home_assistant_backups"] for i in held) else ""
    )
    say(f"{REBUILT}: {bob.node.name} keeps for it: {', '.join(names) or 'no folder'}{backups}")
    checks.record(
        f"{REBUILT}: mynas.list_folders names {FOLDER} kept at {bob.node.name}, read back"
        " with the rebuilt key",
        [] if FOLDER in names else [f"{bob.node.name} lists {held}"],
    )
    target = node.home / "restored" / FOLDER
    reply = await rebuilt.api.post(
        "/api/services/mynas/restore?return_response",
        {"folder": FOLDER, "peer": bob.node.name, "target": str(target)},
    )
    restored = reply["service_response"]
    say(
        f"{REBUILT}: restored {restored['folder']} from {restored['peer']}: {restored['files']}"
        f" files, {restored['size']} in {restored['seconds']} s into {target}"
    )
    problems = await asyncio.to_thread(compare_trees, alice.node.folder, target)
    if restored.get("failed"):
        problems.append(f"failed authentication: {restored.get('failures')}")
    count = sum(1 for rel in tree(alice.node.folder) if not excluded(rel))
    checks.record(
        f"{REBUILT}: Alice's {FOLDER} ({count} entries), restored from {bob.node.name} with"
        " mynas.restore, is byte-identical",
        problems,
    )


def banner(states: tuple[NodeState, NodeState], login: hb.Login, base: Path) -> str:
    lines = ["", "  MyNAS demo: two paired nodes", ""]
    for state, other in (states, states[::-1]):
        node = state.node
        jail = read_jail(other.node.config, other.entry_id, node.name) or node.name
        lines += [
            f"  {node.name}:  {node.url}/   (dashboard: {node.url}/{DASHBOARD_URL}/backups)",
            f"    protects  {node.folder}",
            f"    replica   {other.node.disk / jail}   (on {other.node.name}'s disk, encrypted)",
            f"    disk      {node.disk}   (MyNAS listens on port {node.ssh_port})",
            f"    log       {node.log}",
            "",
        ]
    lines += [
        f"  login (both): username {login.username}   password {login.password}",
        f"  demo directory: {base}   (a second run reuses it; delete it to start afresh)",
        "  stop: Ctrl-C",
        "",
    ]
    return "\n".join(lines)


def demo_env(states: tuple[NodeState, NodeState], login: hb.Login, base: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MYNAS_DEMO_DIR=str(base),
        MYNAS_DEMO_USER=login.username,
        MYNAS_DEMO_PASSWORD=login.password,
        MYNAS_DEMO_PYTHON=sys.executable,
        MYNAS_DEMO_DASHBOARD=DASHBOARD_URL,
        MYNAS_DEMO_DASHBOARD_FR=DASHBOARD_FR_URL,
    )
    for state in states:
        prefix = f"MYNAS_DEMO_{state.node.name.upper()}"
        env[f"{prefix}_URL"] = state.node.url
        env[f"{prefix}_ENTRY"] = state.entry_id
        env[f"{prefix}_CODE"] = state.code
    return env


# --- main -----------------------------------------------------------------------------------


class Stop(Exception):
    """Ctrl-C or SIGTERM."""


def _raise_stop(signum: int, frame: Any) -> None:
    del frame
    raise Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prepare(nodes: tuple[Node, Node], base: Path, settings: dict[str, Any]) -> hb.Login:
    """Ports, sample files, config dirs, login and dashboard; every step keeps what exists."""
    check_ports(nodes)
    base.mkdir(parents=True, exist_ok=True)
    (base / SETTINGS_FILE).write_text(json.dumps(settings) + "\n", encoding="utf-8")
    login = hb.load_or_create_login(base, DEMO_USER)
    for node, other in (nodes, nodes[::-1]):
        if not node.folder.exists():
            size = write_samples(node.folder, node.name)
            say(f"{node.name}: wrote {size / 1e6:.1f} MB of sample files into {node.folder}")
        hb.prepare_config_dir(
            node.config, node.ha_port, login.username, login.password, name=node.name
        )
        install_dashboard(node, other)
        install_blueprints(node)
    return login


async def run(
    args: argparse.Namespace,
    base: Path,
    nodes: tuple[Node, Node],
    login: hb.Login,
    instances: list[Instance],
) -> int:
    instances += [Instance(node) for node in nodes]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SYNC_TIMEOUT)) as session:
        states = await bring_up(nodes, instances, login, session)
        say(f"both nodes are up, paired and synced ({time.monotonic() - _T0:.0f} s)")
        if args.headless_check:
            # The house fire's new Home Assistant starts meanwhile (MyNAS not set up yet).
            rebuilt = Node(REBUILT, free_port(), free_port(), base)
            starting = asyncio.create_task(start_rebuilt(rebuilt, login, session, instances))
            checks = await headless_check(states)
            await check_conversion(states, checks)
            await check_scrub(states, checks)
            await check_ha_backup(states, checks)
            await check_address_change(states, checks)
            bob = next(inst for inst in instances if inst.node is states[1].node)
            await check_peer_stopped(states, bob, checks)
            await check_house_fire(states, starting, instances, login, checks)
            CLOSING.append(checks.line)
            print()
            if checks.failed:
                print(f"HEADLESS CHECK FAILED: {', '.join(checks.failed)}")
                return 1
            print(
                f"HEADLESS CHECK PASSED in {time.monotonic() - _T0:.0f} s: both replicas are"
                " encrypted on the other's disk and open byte-identical, a plain folder is"
                " converted from its repair issue, the verify is planned and repairs a byte"
                " rotted at the friend's, both last-backup"
                " sensors are set, the peers are connected,"
                " no entity reads unknown at rest, every text is written out (en, fr),"
                " the dashboard's entities exist, the blueprints load, Home Assistant's own"
                " backup is kept at Bob and comes back byte-identical, Bob's node moved and"
                " Alice found it, a stopped peer raises its repair issue, and after a house"
                " fire a new node set up from Alice's recovery code gets her folder back from"
                " Bob, byte-identical"
            )
            return 0
        if args.exec:
            command = args.exec[1:] if args.exec[0] == "--" else args.exec
            say(f"running {' '.join(command)}")
            child = await asyncio.create_subprocess_exec(
                *command, env=demo_env(states, login, base), cwd=REPO_ROOT
            )
            return await child.wait()
    print(banner(states, login, base), flush=True)
    # Run until Ctrl-C; a restart asked for in the UI (exit status 100) starts it again.
    while True:
        for inst in instances:
            code = inst.exit_code
            if code == 100:
                say(f"{inst.node.name} asked to restart; starting it again")
                inst.start()
            elif code is not None:
                inst.check_alive()
        await asyncio.sleep(1)


def port_pair(text: str) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two ports, e.g. 8022,8023") from None
    if not all(1024 <= port <= 65535 for port in (first, second)):
        raise argparse.ArgumentTypeError(f"{text!r}: ports must be within 1024-65535")
    return first, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description=__doc__.split("\n", 1)[0] if __doc__ else None
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="demo directory (default: demo/)"
    )
    parser.add_argument(
        "--ha-ports",
        type=port_pair,
        metavar="A,B",
        help="Home Assistant ports of Alice and Bob (default 8123,8124; first run only)",
    )
    parser.add_argument(
        "--ssh-ports",
        type=port_pair,
        metavar="A,B",
        help="MyNAS node ports of Alice and Bob (default 8022,8023; first run only)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--headless-check",
        action="store_true",
        help="bring up, check replicas and sensors, stop; exit 0 when all is well",
    )
    mode.add_argument(
        "--exec",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="bring up, run CMD with MYNAS_DEMO_* in its environment, stop",
    )
    args = parser.parse_args(argv)
    instances: list[Instance] = []
    status = 1
    with signals_stop():
        try:
            base: Path = args.dir.resolve()
            nodes, settings = demo_settings(base, args)
            login = prepare(nodes, base, settings)  # runs Home Assistant code: no event loop
            status = asyncio.run(run(args, base, nodes, login, instances))
        except Stop as stop:
            say(f"{stop}: stopping")
            status = 130 if str(stop) == "SIGINT" else 143
        except (DemoError, hb.BootstrapError) as err:
            print(f"scripts/demo: error: {err}", file=sys.stderr)
            if args.headless_check:
                CLOSING.append("headless-check: 0 passed, 1 failed")
            status = 1
        finally:
            # A second Ctrl-C while stopping kills at once.
            signal.signal(signal.SIGINT, lambda *_: stop_all(instances, 0))
            stop_all(instances)
    say(f"done ({time.monotonic() - _T0:.0f} s)")
    for line in CLOSING:
        print(line, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
