"""Fixtures of the owner's tests: a host, alice's index and her source folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from custom_components.mynas.engine.identity import Identity

from ..conftest import ServerFactory
from ..replica_support import Env, close_env, make_env


@pytest.fixture
async def env(fast_dir: Path, make_server: ServerFactory, alice_id: Identity) -> AsyncIterator[Env]:
    """A host granting alice 1 GiB, alice's index and an empty source folder."""
    setup = await make_env(make_server, fast_dir, alice_id)
    yield setup
    close_env(setup)
