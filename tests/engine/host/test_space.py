"""The hosted space (space.py): its layout, leftovers of a crash, a peer's data removed."""

from __future__ import annotations

import os
from pathlib import Path
import stat

import pytest

from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import MIB, MTIME, put


def test_hosted_space_layout(space: HostedSpace, jail: Jail) -> None:
    internal = space.root / ".mynas"
    for path in (internal, internal / "trash", jail.root, jail.trash_dir, jail.tmp_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert space.jail("alice", 5 * MIB) is jail
    assert jail.quota.limit == 5 * MIB
    with pytest.raises(ValueError, match="too close"):
        space.jail("Alice", MIB)  # would share a folder on a case-insensitive disk
    with pytest.raises(KeyError):
        space.rescan("Alice")
    with pytest.raises(ValueError, match="at least one day"):
        HostedSpace(space.root, trash_days=0)
    put(jail, b"a", b"1")
    jail.save_state()
    assert stat.S_IMODE(jail.state_path.stat().st_mode) == 0o600


def test_missing_storage_root_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HostedSpace(tmp_path / "unmounted")
    assert not (tmp_path / "unmounted").exists()


def test_clean_tmp_removes_leftovers(space: HostedSpace, jail: Jail) -> None:
    (jail.tmp_dir / "crashed.tmp").write_bytes(b"half")
    (jail.tmp_dir / "odd").mkdir()
    (space.root / ".mynas" / "tmp" / "stray-file").write_bytes(b"")
    space.clean_tmp()
    assert os.listdir(jail.tmp_dir) == []


def test_remove_peer_data(space: HostedSpace, jail: Jail) -> None:
    bob = space.jail("bob", MIB)
    put(bob, b"keep", b"bob's")
    put(jail, b"a/b", b"1")
    jail.delete(b"a")
    with jail.begin_upload(b"big", MIB, MTIME, 0o644) as upload:
        upload.write(b"x")
    space.remove_peer_data("alice")
    for path in (jail.root, jail.trash_dir, jail.partial_dir, jail.tmp_dir, jail.state_path):
        assert not path.exists()
    assert (bob.root / "keep").read_bytes() == b"bob's"
    with pytest.raises(KeyError):
        space.rescan("alice")
    space.remove_peer_data("nobody")  # nothing stored: nothing to do
    fresh = space.jail("alice", MIB)
    assert fresh is not jail
    assert fresh.quota.used == 0
