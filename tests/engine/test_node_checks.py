"""Node.check_folder: is a protected folder there to be backed up (before any sync)?"""

from __future__ import annotations

from collections.abc import AsyncIterator
import os
from pathlib import Path

import pytest

from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.node import FolderConfig, Node, PeerConfig, Reachability

from .conftest import address


@pytest.fixture
async def node(alice_id: Identity, tmp_path: Path, server: NodeServer) -> AsyncIterator[Node]:
    """Alice's node, with the host serving her as a peer."""
    storage = tmp_path / "alice-storage"
    storage.mkdir()
    running = Node(alice_id, storage)
    peer = PeerConfig("host", "Host", "host", (address(server),), server.identity.public_line, 0)
    await running.start("127.0.0.1", 0, [peer])
    yield running
    await running.stop()


async def test_a_folder_that_is_there(node: Node, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    folder = FolderConfig("photos", "Photos", str(photos))
    # Empty and never sent: a new folder, nothing wrong.
    assert await node.check_folder(folder) is None
    (photos / "a.jpg").write_bytes(b"a")
    assert await node.check_folder(folder) is None


async def test_missing_or_not_a_folder(node: Node, tmp_path: Path) -> None:
    gone = FolderConfig("photos", "Photos", str(tmp_path / "nowhere"))
    assert "missing or unreadable" in str(await node.check_folder(gone))
    (tmp_path / "file").write_bytes(b"x")
    a_file = FolderConfig("photos", "Photos", str(tmp_path / "file"))
    assert "missing or unreadable" in str(await node.check_folder(a_file))


async def test_empty_while_a_peer_holds_its_files(node: Node, tmp_path: Path) -> None:
    """The mount point of an unplugged disk: empty, while the index says the host has files."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"a")
    (photos / "b.jpg").write_bytes(b"b")
    folder = FolderConfig("photos", "Photos", str(photos))
    await node.push(folder, "host")
    for name in ("a.jpg", "b.jpg"):
        (photos / name).unlink()
    reason = await node.check_folder(folder)
    assert reason is not None
    assert "is empty while the peer holds 2 file(s) of it (is the disk mounted?)" in reason


async def test_a_folder_that_cannot_be_read(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while looking (a disk going away under us) is a reason too."""
    photos = tmp_path / "photos"
    photos.mkdir()

    def failing(path: object) -> object:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "scandir", failing)
    reason = await node.check_folder(FolderConfig("photos", "Photos", str(photos)))
    assert reason is not None
    assert "cannot be read (Input/output error)" in reason


async def test_a_connection_test_reports_the_host_s_free_space(node: Node) -> None:
    result = await node.probe("host")
    assert result.status is Reachability.ONLINE
    assert result.disk_free_there is not None
    assert result.disk_free_there > 0
