"""After a fire: a node rebuilt from its key file lists what its friends hold for it.

Alice's node pushes an encrypted folder, a plain one and a Home Assistant backup to a live
host on 127.0.0.1; then her house burns: a new Identity is loaded from the same key file,
on a new storage root with no index, and lists the folders kept at the host by name. The
host's answer covers the asker's own jail only, whatever the request says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
import functools
from pathlib import Path
import time

import pytest

from custom_components.mynas.engine import (
    FolderConfig,
    HeldFolder,
    NewBackup,
    PeerConfig,
    ThreadedNode,
    load_identity,
    protocol,
)
from custom_components.mynas.engine.errors import ProtocolError
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client, holdings
from custom_components.mynas.engine.owner.sealed import stored_size

from .conftest import address


def _query(req: int, request: dict[str, str]) -> bytes:
    return protocol.query(req, request)


def _host(server: NodeServer) -> PeerConfig:
    return PeerConfig(
        "host", "Host", "host", (address(server),), server.identity.public_line, 1 << 20
    )


@pytest.fixture
async def nodes() -> AsyncIterator[list[ThreadedNode]]:
    """Nodes a test starts, stopped at its end."""
    started: list[ThreadedNode] = []
    yield started
    for node in started:
        await node.stop()


async def _burnt_house(
    tmp_path: Path, alice_id: Identity, server: NodeServer, nodes: list[ThreadedNode]
) -> float:
    """Alice backs up Photos (encrypted), Docs (plain) and a backup; return when."""
    (tmp_path / "old-root").mkdir()
    node = ThreadedNode(alice_id, tmp_path / "old-root")
    nodes.append(node)
    await node.start("127.0.0.1", 0, [_host(server)])
    photos = tmp_path / "Photos"
    (photos / "2024").mkdir(parents=True)
    (photos / "2024" / "beach.jpg").write_bytes(b"J" * 3000)
    (photos / "cat.jpg").write_bytes(b"C" * 10)
    docs = tmp_path / "Docs"
    docs.mkdir()
    (docs / "tax.pdf").write_bytes(b"P" * 500)
    before = time.time()
    await node.push(FolderConfig("f1", "Photos", str(photos), encrypted=True), "host")
    await node.push(FolderConfig("f2", "Docs", str(docs), encrypted=False), "host")

    async def archive() -> AsyncIterator[bytes]:
        yield b"tar" * 100

    async def open_stream() -> AsyncIterator[bytes]:
        return archive()

    await node.upload_backup("host", NewBackup("b1", {"name": "b1"}, 300, open_stream))
    await node.stop()
    return before


async def test_a_node_rebuilt_from_its_key_lists_its_friend_s_folders(
    tmp_path: Path,
    alice_id: Identity,
    key_file: Callable[[str], Path],
    server: NodeServer,
    nodes: list[ThreadedNode],
) -> None:
    before = await _burnt_house(tmp_path, alice_id, server, nodes)
    rebuilt = load_identity(key_file("alice"))  # a new Identity from the same key file
    (tmp_path / "new-root").mkdir()
    node = ThreadedNode(rebuilt, tmp_path / "new-root")  # no index: a new disk
    nodes.append(node)
    await node.start("127.0.0.1", 0, [_host(server)])
    assert await node.known_pairs() == []
    held = await node.list_folders("host")
    assert not held.more
    by_name = {(item.name, item.backups): item for item in held.folders}
    assert set(by_name) == {("Docs", False), ("Photos", False), (".ha-backups", True)}
    photos = by_name["Photos", False]
    assert photos.encrypted
    assert photos.files == 2
    assert photos.stored_bytes == stored_size(3000) + stored_size(10)  # as stored
    docs = by_name["Docs", False]
    assert (docs.encrypted, docs.files, docs.stored_bytes) == (False, 1, 500)
    for item in held.folders:
        assert item.last_update is not None
        assert before - 2 <= item.last_update <= time.time() + 2
    assert [item.backups for item in held.folders] == [False, False, True]  # backups last
    assert held.as_dict()["folders"][0] == {
        "name": "Docs",
        "encrypted": False,
        "files": 1,
        "stored_bytes": 500,
        "last_update": docs.last_update,
        "backups": False,
    }
    # What the host stores says nothing of the names: none of them is in its jail.
    stored = {path.name for path in (tmp_path / "storage" / "alice").iterdir()}
    assert "Photos" not in stored
    assert ".ha-backups" not in stored
    # Another key reads no sealed name: to it they all look like plain folders' names.
    for item in holdings.read_names(
        load_identity(key_file("bob")),
        [{"name": n.encode(), "files": 0, "bytes": 0} for n in stored],
    ):
        assert not item.encrypted
        assert not item.backups


async def test_an_older_host_s_listing_is_summed_up(
    tmp_path: Path, alice_id: Identity, server: NodeServer, nodes: list[ThreadedNode]
) -> None:
    await _burnt_house(tmp_path, alice_id, server, nodes)
    link = await client.connect(alice_id, address(server), server.identity.public_line)
    async with link:
        new, _ = await link.folders()
        link.welcome["features"].remove("folders")
        old, more = await link.folders()
    assert not more
    assert {item["name"]: (item["files"], item["bytes"]) for item in old} == {
        item["name"]: (item["files"], item["bytes"]) for item in new
    }
    listed = {item.name: item for item in holdings.read_names(alice_id, old)}
    assert listed["Docs"].last_update is not None  # a plain mirror's mtimes
    assert listed["Photos"].last_update is None  # an encrypted one's are all 0


async def test_the_answer_covers_the_asker_s_own_jail_only(
    server: NodeServer, alice_id: Identity, bob_id: Identity, storage_dir: Path
) -> None:
    jails = storage_dir
    (jails / "bob" / "BobsSecret").mkdir(parents=True)
    (jails / "bob" / "BobsSecret" / "a").write_bytes(b"bob's")
    (jails / "alice" / "Mine").mkdir(parents=True)
    (jails / "alice" / "Mine" / "x").write_bytes(b"12345")
    # Links already in the jail (put there behind the host's back) are neither followed
    # nor counted, and a file at the top level is no folder.
    (jails / "alice" / "Mine" / "to-bob").symlink_to(jails / "bob" / "BobsSecret")
    (jails / "alice" / "bob-link").symlink_to(jails / "bob")
    (jails / "alice" / "loose").write_bytes(b"...")
    link = await client.connect(alice_id, address(server), server.identity.public_line)
    async with link:
        for request in (
            {"op": "folders"},
            {"op": "folders", "path": b"../bob".hex()},
            {"op": "folders", "path": "/", "peer": "bob", "jail": "bob"},
            {"op": "folders", "name": "..", "root": str(jails / "bob")},
        ):
            answer = await link._request(functools.partial(_query, request=request))
            assert answer == {
                "folders": [
                    {
                        "name": b"Mine".hex(),
                        "files": 1,
                        "bytes": 5,
                        "changed": pytest.approx(answer["folders"][0]["changed"]),
                    }
                ],
                "more": False,
            }
    link = await client.connect(bob_id, address(server), server.identity.public_line)
    async with link:
        items, _ = await link.folders()
    assert [item["name"] for item in items] == [b"BobsSecret"]


async def test_a_long_list_says_there_is_more(
    server: NodeServer, alice_id: Identity, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(5):
        (storage_dir / "alice" / f"F{n}").mkdir(parents=True)
    jail = server.jail("alice")
    monkeypatch.setattr(jail, "folders", functools.partial(Jail.folders, jail, limit=3))
    link = await client.connect(alice_id, address(server), server.identity.public_line)
    async with link:
        items, more = await link.folders()
    assert more
    assert [item["name"] for item in items] == [b"F0", b"F1", b"F2"]


@pytest.mark.parametrize(
    "bad",
    [
        {"folders": "nope"},
        {"folders": [{"name": "zz", "files": 1, "bytes": 1, "changed": 0}]},
        {"folders": [{"name": b"a/b".hex(), "files": 1, "bytes": 1, "changed": 0}]},
        {"folders": [{"name": b"a".hex(), "files": "x", "bytes": 1, "changed": 0}]},
    ],
)
async def test_a_host_s_bad_answer_is_a_protocol_error(
    server: NodeServer, alice_id: Identity, bad: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    link = await client.connect(alice_id, address(server), server.identity.public_line)

    async def answer(_build: object) -> dict[str, object]:
        return bad

    async with link:
        monkeypatch.setattr(link, "_request", answer)
        with pytest.raises(ProtocolError):
            await link.folders()


def test_a_held_folder_is_plain_data() -> None:
    item = HeldFolder("Docs", False, 1, 2, None)
    assert item.as_dict()["backups"] is False
