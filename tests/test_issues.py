"""Repair issues raised at run time, each cleared once the cause is gone."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from datetime import timedelta
import os
from pathlib import Path
import re
import shutil
import subprocess

from freezegun.api import FrozenDateTimeFactory
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed

from custom_components.mynas import texts
from custom_components.mynas.const import (
    CONF_UNREACHABLE_HOURS,
    DISK_SCAN_INTERVAL,
    DOMAIN,
    PEER_PROBE_INTERVAL,
    SCHEDULER_TICK,
)
from custom_components.mynas.engine import identity, storage_root
from custom_components.mynas.engine.node import Reachability

from .conftest import BOB_ID, PAIR, PHOTOS_ID, Bob, make_tree


def _issue(hass: HomeAssistant, issue_id: str) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, issue_id)


def _raised(hass: HomeAssistant, issue_id: str) -> ir.IssueEntry:
    issue = _issue(hass, issue_id)
    assert issue is not None, issue_id
    return issue


def _placeholders(hass: HomeAssistant, issue_id: str) -> dict[str, str]:
    issue = _raised(hass, issue_id)
    return dict(issue.translation_placeholders or {})


def _contents(root: Path, pattern: str) -> dict[str, bytes]:
    """The files under ``root`` matching ``pattern``, as ``make_tree`` writes them back."""
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob(pattern)}


async def _advance(hass: HomeAssistant, freezer: FrozenDateTimeFactory, delta: timedelta) -> None:
    freezer.tick(delta)
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)


async def _sync(hass: HomeAssistant) -> dict[str, object]:
    response = await hass.services.async_call(
        DOMAIN, "sync", {"wait": True}, blocking=True, return_response=True
    )
    assert response is not None
    (result,) = response["results"]  # type: ignore[misc]
    return result  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("swap_disk", "key"),
    [
        # Unplugged: the mount point is gone (or empty).
        (lambda root: shutil.rmtree(root / ".mynas"), "storage_missing"),
        # Another MyNAS disk is mounted in its place.
        (
            lambda root: storage_root.write_marker(root, storage_root.Marker("other", "Eve")),
            "storage_foreign",
        ),
    ],
)
async def test_storage_disk_gone_at_run_time(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    node_root: Path,
    freezer: FrozenDateTimeFactory,
    swap_disk: object,
    key: str,
) -> None:
    issue_id = f"storage_{synced_node.entry_id}"
    internal = node_root / ".mynas"
    saved = _contents(internal, "node.json")
    assert _issue(hass, issue_id) is None
    swap_disk(node_root)  # type: ignore[operator]
    await _advance(hass, freezer, DISK_SCAN_INTERVAL + timedelta(seconds=1))
    found = texts.since(dt_util.utcnow())
    issue = _raised(hass, issue_id)
    assert issue.translation_key == key
    # Since when, and what is not backed up meanwhile.
    assert issue.translation_placeholders == {
        "node": "Alice",
        "path": str(node_root),
        "since": found,
        "folders": "Photos",
    }
    assert issue.is_fixable  # its fix flow checks again now (MyNAS does every minute)
    # Still gone a few minutes later: the issue still says since when it began.
    for _ in range(3):
        await _advance(hass, freezer, DISK_SCAN_INTERVAL + timedelta(seconds=1))
    assert _placeholders(hass, issue_id)["since"] == found
    # The disk is back.
    make_tree(internal, saved)
    await _advance(hass, freezer, DISK_SCAN_INTERVAL + timedelta(seconds=1))
    assert _issue(hass, issue_id) is None
    assert synced_node.runtime_data.manager.storage_ok


async def test_peer_key_changed(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
) -> None:
    """Bob answers with another key: a critical issue, and nothing is sent to him."""
    issue_id = f"key_changed_{BOB_ID}"
    pinned = bob.identity
    impostor, _ = await hass.async_add_executor_job(
        identity.load_or_create, tmp_path / "impostor.key"
    )
    await bob.restart(key=impostor)
    # The next connection test finds out.
    await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
    issue = _raised(hass, issue_id)
    assert issue.severity is ir.IssueSeverity.CRITICAL
    assert issue.is_fixable
    assert issue.translation_key == "key_changed"
    assert issue.translation_placeholders == {
        "peer": "Bob",
        "old": pinned.fingerprint,
        "new": impostor.fingerprint,
        "since": texts.since(dt_util.utcnow()),
        "folders": "Photos",
    }
    assert issue.data == {
        "entry_id": synced_node.entry_id,
        "peer_id": BOB_ID,
        "new_key": impostor.public_line,
    }
    manager = synced_node.runtime_data.manager
    assert manager.data.peers[BOB_ID].reachability is Reachability.KEY_MISMATCH
    # A sync stops before any data: the new photo never reaches the impostor.
    (tmp_path / "photos" / "secret.jpg").write_bytes(b"private")
    result = await _sync(hass)
    assert result["status"] == "failed"
    assert "presented host key" in str(result["error"])
    assert not (bob.replica("Photos") / "secret.jpg").exists()
    assert not list(bob.storage.rglob("secret.jpg"))
    # The real Bob is back with his pinned key: the issue goes away.
    await bob.restart(key=pinned)
    await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
    assert _issue(hass, issue_id) is None
    assert manager.data.peers[BOB_ID].reachability is Reachability.ONLINE


async def test_peer_unreachable_for_days(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    issue_id = f"unreachable_{BOB_ID}"
    await bob.stop()
    await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
    assert _issue(hass, issue_id) is None  # a few minutes are no reason for alarm
    for _ in range(2 * 24):  # two days, hour by hour
        await _advance(hass, freezer, timedelta(hours=1))
    assert _issue(hass, issue_id) is None
    for _ in range(25):
        await _advance(hass, freezer, timedelta(hours=1))
    issue = _raised(hass, issue_id)
    assert issue.severity is ir.IssueSeverity.WARNING
    assert issue.translation_key == "peer_unreachable"
    assert issue.is_fixable  # try again now, or change the address
    down_since = synced_node.runtime_data.manager.data.peers[BOB_ID].down_since
    assert issue.translation_placeholders == {
        "peer": "Bob",
        "since": texts.since(down_since),
        "folders": "Photos",
    }
    # Bob is back: the next test or sync clears it.
    await bob.start()
    await _advance(hass, freezer, PEER_PROBE_INTERVAL)
    assert _issue(hass, issue_id) is None


async def test_unreachable_counts_across_a_restart(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    """Since when Bob is silent survives a restart of Home Assistant (the Store)."""
    await bob.stop()
    await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
    down_since = synced_node.runtime_data.manager.data.peers[BOB_ID].down_since
    assert down_since is not None
    await _advance(hass, freezer, timedelta(days=2))
    assert await hass.config_entries.async_reload(synced_node.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert synced_node.runtime_data.manager.data.peers[BOB_ID].down_since == down_since
    await _advance(hass, freezer, timedelta(days=1, hours=1))
    issue = _raised(hass, f"unreachable_{BOB_ID}")
    assert (issue.translation_placeholders or {})["since"] == texts.since(down_since)


async def test_unreachable_threshold_is_an_option(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    """With 0 hours the issue comes at the first failed contact; its text never goes stale."""
    issue_id = f"unreachable_{BOB_ID}"
    hass.config_entries.async_update_entry(synced_node, options={CONF_UNREACHABLE_HOURS: 0})
    await hass.config_entries.async_reload(synced_node.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    await bob.stop()
    await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
    first = _placeholders(hass, issue_id)
    assert first["since"] == texts.since(dt_util.utcnow() - timedelta(seconds=1))
    # Said as "since 05:10", not "for less than a minute": still true days later.
    for jump in (PEER_PROBE_INTERVAL, timedelta(hours=23), timedelta(days=1)):
        await _advance(hass, freezer, jump)
        assert _placeholders(hass, issue_id) == first


async def test_quota_refused(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
) -> None:
    issue_id = f"quota_{PHOTOS_ID}_{BOB_ID}"
    (tmp_path / "photos" / "film.mkv").write_bytes(b"f" * 200_000)
    await bob.restart(quota=50_000)  # Bob grants us (much) less than we need
    result = await _sync(hass)
    assert result["status"] == "failed"
    assert "quota exceeded" in str(result["error"])
    issue = _raised(hass, issue_id)
    assert issue.translation_key == "quota_exceeded"
    placeholders = issue.translation_placeholders or {}
    assert (placeholders["folder"], placeholders["peer"]) == ("Photos", "Bob")
    assert placeholders["since"] == texts.since(dt_util.utcnow())
    assert issue.is_fixable  # once Bob grants more, its fix flow backs up again
    # In the units the quota is granted in (and Home Assistant shows sizes in).
    assert placeholders["needed"].endswith(" kB")
    assert placeholders["available"].endswith(" kB")
    assert synced_node.runtime_data.manager.data.pairs[PAIR].quota_refused
    # Bob grants more: the next sync goes through and the issue is gone.
    await bob.restart(quota=10**9)
    assert (await _sync(hass))["status"] == "success"
    assert _issue(hass, issue_id) is None
    assert (bob.replica("Photos") / "film.mkv").stat().st_size == 200_000


async def test_folder_overdue(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    issue_id = f"overdue_{PHOTOS_ID}"
    await bob.stop()
    await _advance(hass, freezer, timedelta(hours=30))
    assert _issue(hass, issue_id) is None
    await _advance(hass, freezer, timedelta(hours=4, minutes=1))
    issue = _raised(hass, issue_id)
    assert issue.severity is ir.IssueSeverity.WARNING
    assert issue.translation_key == "folder_overdue"
    placeholders = dict(issue.translation_placeholders or {})
    assert "connection refused" in placeholders.pop("error")  # what there is to fix
    assert placeholders == {
        "folder": "Photos",
        "peers": "Bob",
        "hours": "36",
        # The last success, two hours before the test began (synced_node).
        "since": texts.since(dt_util.utcnow() - timedelta(hours=36, minutes=1)),
    }
    # Back up again: cleared as soon as the sync succeeds.
    await bob.start()
    assert (await _sync(hass))["status"] == "success"
    assert _issue(hass, issue_id) is None


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    """A real, small disk of its own at ``path`` (a tmpfs; the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        # Lazy: a server may still hold a directory open there until its own teardown.
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_friend_disk_full(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
) -> None:
    """Bob's disk itself fills up (his quota for us has room): an issue at once, then gone."""
    issue_id = f"peer_disk_full_{BOB_ID}"
    (tmp_path / "photos" / "film.mkv").write_bytes(os.urandom(3_000_000))
    await bob.stop()
    with _tmpfs(bob.storage, "2m"):
        await bob.start()  # his storage now on a 2 MB disk; 1 GB granted to us
        result = await _sync(hass)
        assert result["status"] == "failed"
        assert "disk is full" in str(result["error"])
        issue = _raised(hass, issue_id)
        assert issue.translation_key == "peer_disk_full"
        assert issue.severity is ir.IssueSeverity.ERROR
        placeholders = _placeholders(hass, issue_id)
        assert placeholders["peer"] == "Bob"
        # What the host said (or, once the connection test this set off is back, below).
        assert placeholders["detail"].startswith(("No space left on device while", "it has"))
        assert synced_node.runtime_data.manager.data.pairs[PAIR].quota_refused is False
        assert _issue(hass, f"quota_{PHOTOS_ID}_{BOB_ID}") is None
        # The connection test it set off found how little room is left: the issue says so.
        await hass.async_block_till_done(wait_background_tasks=True)
        detail = _placeholders(hass, issue_id)["detail"]
        assert re.fullmatch(r"it has [0-9.]+ (MiB|KiB|B) free", detail), detail
        # Bob frees space (a bigger disk): the next sync goes through, the issue goes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(bob.storage)], check=True)
        assert (await _sync(hass))["status"] == "success"
        assert _issue(hass, issue_id) is None
        assert (bob.replica("Photos") / "film.mkv").stat().st_size == 3_000_000
        await hass.async_block_till_done(wait_background_tasks=True)  # its connection test
        await bob.stop()


async def test_friend_disk_nearly_full_is_found_by_the_connection_test(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    freezer: FrozenDateTimeFactory,
) -> None:
    """No sync needed: a test of the connection that finds next to no room raises it."""
    issue_id = f"peer_disk_full_{BOB_ID}"
    await bob.stop()
    with _tmpfs(bob.storage, "4m"):
        await bob.start()
        assert _issue(hass, issue_id) is None
        await _advance(hass, freezer, PEER_PROBE_INTERVAL + timedelta(seconds=1))
        placeholders = _placeholders(hass, issue_id)
        assert placeholders["peer"] == "Bob"
        assert re.fullmatch(r"it has [0-9.]+ MiB free", placeholders["detail"]), placeholders
        await bob.stop()


@pytest.mark.parametrize("how", ["unmounted", "removed"])
async def test_protected_folder_vanishes(
    hass: HomeAssistant,
    synced_node: MockConfigEntry,
    bob: Bob,
    tmp_path: Path,
    freezer: FrozenDateTimeFactory,
    how: str,
) -> None:
    """The folder's disk is unplugged (or the folder deleted): an issue within a minute."""
    issue_id = f"folder_missing_{PHOTOS_ID}"
    photos = tmp_path / "photos"
    files = _contents(photos, "*.jpg")
    shutil.rmtree(photos)
    with _tmpfs(photos, "4m"):  # the folder lives on a USB disk of its own
        make_tree(photos, files)
        assert (await _sync(hass))["status"] == "success"
        await _advance(hass, freezer, SCHEDULER_TICK)
        assert _issue(hass, issue_id) is None
    # Unplugged: the mount point stays, empty. Deleted: not even that.
    if how == "removed":
        photos.rmdir()
    await _advance(hass, freezer, SCHEDULER_TICK)
    issue = _raised(hass, issue_id)
    assert issue.translation_key == "folder_missing"
    placeholders = _placeholders(hass, issue_id)
    assert (placeholders["folder"], placeholders["path"]) == ("Photos", str(photos))
    reason = placeholders["reason"]
    if how == "unmounted":
        assert "is empty while the peer holds 2 file(s)" in reason
    else:
        assert "missing or unreadable" in reason
    # A sync now fails and deletes nothing on Bob.
    result = await _sync(hass)
    assert result["status"] == "failed"
    assert (bob.replica("Photos") / "a.jpg").read_bytes() == files["a.jpg"]
    assert _issue(hass, issue_id) is not None
    # Plugged in again: gone at the next check.
    with _tmpfs(photos, "4m"):
        make_tree(photos, files)
        await _advance(hass, freezer, SCHEDULER_TICK)
        assert _issue(hass, issue_id) is None
