"""The usage answer tells how much of a nearly full quota is trash, and until when.

A live host on 127.0.0.1; alice's trash is filled the way the host fills it (replaced and
deleted files moved there under a stamp), then the usage is recounted from disk.
"""

from __future__ import annotations

import calendar
import os
from pathlib import Path
import time

from custom_components.mynas.engine.host.jail import TrashUsage
from custom_components.mynas.engine.host.quota import DIR_CHARGE, charge
from custom_components.mynas.engine.host.server import NodeServer
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import client

from ..conftest import DEFAULT_QUOTA, address

MIB = 1 << 20


async def _usage(server: NodeServer, who: Identity) -> dict[str, object]:
    link = await client.connect(who, address(server), server.identity.public_line)
    async with link:
        return await link.usage()


async def test_the_trash_is_told_once_the_quota_is_nearly_full(
    server: NodeServer, alice_id: Identity, storage_dir: Path
) -> None:
    jail = server.jail("alice")
    assert jail.trash_usage() == TrashUsage(0, None, None)
    (storage_dir / "alice" / "Photos").mkdir()
    (storage_dir / "alice" / "Photos" / "kept").write_bytes(b"k" * MIB)
    roomy = await _usage(server, alice_id)
    assert "trash" not in roomy  # far from full: the trash is not walked

    trash = storage_dir / ".mynas" / "trash" / "alice"
    old, new = "20261101T000000Z", "20261130T120000Z"
    for stamp, size in ((old, 6 * MIB), (new, 8 * MIB)):
        (trash / stamp / "Photos").mkdir(parents=True)
        (trash / stamp / "Photos" / "x.jpg").write_bytes(b"t" * size)
    os.symlink("/", trash / "not-ours")  # not a stamp, not a folder: not counted
    jail.set_retention("Photos", 60)
    jail.rescan()
    full = await _usage(server, alice_id)
    expected = 2 * (2 * DIR_CHARGE) + charge(6 * MIB) + charge(8 * MIB)
    assert full["trash"] == expected
    assert full["used"] >= DEFAULT_QUOTA * 0.9
    assert full["trash_oldest"] == calendar.timegm(time.strptime(old, "%Y%m%dT%H%M%SZ"))
    assert full["trash_newest"] == calendar.timegm(time.strptime(new, "%Y%m%dT%H%M%SZ"))
    assert (full["trash_days"], full["trash_days_longest"]) == (30, 60)
