"""Low-level disk helpers (disk.py): syncfs and its fallback, the umask, quiet cleanups."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from custom_components.mynas.engine.host import disk
from custom_components.mynas.engine.host.jail import Jail

from .jail_support import put

# --- syncfs ---------------------------------------------------------------------------------


def test_syncfs_falls_back_to_sync(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    monkeypatch.setattr(disk, "_libc_syncfs", lambda: None)
    monkeypatch.setattr(os, "sync", lambda: synced.append(True))
    put(jail, b"a", b"1")
    assert len(synced) == 2


def test_syncfs_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert disk._libc_syncfs() is not None
    disk.syncfs(os.fsencode(tmp_path))  # the real one works

    def failing(_fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(disk, "_libc_syncfs", lambda: failing)
    with pytest.raises(OSError, match="Input/output error"):
        disk.syncfs(os.fsencode(tmp_path))


# --- the umask ------------------------------------------------------------------------------


def test_umask_is_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    current = os.umask(0o022)
    os.umask(current)
    assert disk.umask.__wrapped__() == current

    def unreadable(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(disk, "open", unreadable, raising=False)
    assert disk.umask.__wrapped__() is None


# --- cleanups on the way out ----------------------------------------------------------------


def test_cleanup_helpers_never_raise_on_the_way_out(tmp_path: Path) -> None:
    disk.unlink_quietly(os.fsencode(tmp_path / "missing"))
    disk.unlink_quietly(os.fsencode(tmp_path))  # a directory: logged, not raised
    assert tmp_path.is_dir()
    disk.ignore_vanished(b"gone", FileNotFoundError())
    with pytest.raises(PermissionError):
        disk.ignore_vanished(b"locked", PermissionError())
