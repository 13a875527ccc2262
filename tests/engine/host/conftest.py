"""Fixtures for the hosted-space tests: a storage root, alice's jail, a folder outside."""

from __future__ import annotations

from pathlib import Path

import pytest

from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import MIB


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the storage root that no peer may ever touch."""
    path = tmp_path / "outside"
    (path / "dir").mkdir(parents=True)
    (path / "secret.txt").write_bytes(b"top secret")
    return path


@pytest.fixture
def space(tmp_path: Path) -> HostedSpace:
    root = tmp_path / "storage"
    root.mkdir()
    return HostedSpace(root)


@pytest.fixture
def jail(space: HostedSpace) -> Jail:
    return space.jail("alice", 64 * MIB)
