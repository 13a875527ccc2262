"""Helpers for the hosted-space tests: writes as the server does them, what the disk holds.

Real files in tmp_path; the "server" here is the test itself, which reserves each file's
charge before ``write_batch`` as the real server does (``push``).
"""

from __future__ import annotations

import os
from pathlib import Path
import stat
from typing import Any

from hypothesis import strategies as st

from custom_components.mynas.engine.errors import MyNasError, QuotaExceeded
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import DIR_CHARGE, charge
from custom_components.mynas.engine.host.writes import IncomingFile

MTIME = 1_700_000_000_123_456_789
DAY = 86400
MIB = 1 << 20


def push(
    jail: Jail, files: dict[bytes, bytes], *, mode: int = 0o644, mtime_ns: int = MTIME
) -> list[MyNasError | None]:
    """Do what the server does: reserve each file's charge, then write the batch."""
    results: dict[bytes, MyNasError | None] = {}
    items = []
    for path, data in files.items():
        try:
            jail.quota.reserve(charge(len(data)))
        except QuotaExceeded as err:
            results[path] = err
        else:
            items.append(IncomingFile(path, data, mtime_ns, mode))
    for item, result in zip(items, jail.write_batch(items), strict=True):
        results[item.path] = result
    return [results[path] for path in files]


def put(jail: Jail, path: bytes, data: bytes, **kwargs: Any) -> None:
    assert push(jail, {path: data}, **kwargs) == [None]


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Everything under ``root`` (links not followed): mode, mtime and content of each entry."""
    found: dict[str, tuple[int, int, bytes | None]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            found[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, content)
    return found


def files_under(root: Path) -> dict[str, bytes]:
    return {
        name: content for name, (_, _, content) in snapshot(root).items() if content is not None
    }


def disk_charge(*roots: Path) -> int:
    """The quota rule applied to what is really on disk under ``roots``."""
    total = 0
    for root in roots:
        for directory, dirs, files in os.walk(root):
            total += DIR_CHARGE * len(dirs)
            total += sum(charge(Path(directory, name).lstat().st_size) for name in files)
    return total


def jail_charge(jail: Jail) -> int:
    return disk_charge(jail.root, jail.trash_dir, jail.partial_dir)


def assert_consistent(jail: Jail) -> None:
    """In-memory usage matches the disk, nothing is left reserved and no temp file remains."""
    assert jail.quota.reserved == 0
    assert jail.quota.used == jail_charge(jail)
    assert os.listdir(jail.tmp_dir) == []


# --- adversarial paths (the syntax tests and the disk tests share them) ---------------------


PIECES = [b"..", b".", b"", b"/", b"//", b"\x00", b".mynas", b".mynasx", b"d", b"e", b"f",
          b"g", b"abs", b"rel", b"up", b"dangling", b"loop", b"fifo", b"secret", b"x" * 255,
          b"y" * 256, "é".encode(), "日本".encode(), b"\n", b"\xff", b"\\", b" ",
          b"..."]  # fmt: skip

# Walks through the trap's real names, so links and files are met often, not by luck.
trap_walks = st.lists(
    st.sampled_from([b"d", b"e", b"f", b"g", b"abs", b"rel", b"up", b"dangling", b"loop",
                     b"fifo", b"secret", b"new", b".."]),
    min_size=1,
    max_size=5,
).map(b"/".join)  # fmt: skip

adversarial_paths = st.one_of(
    trap_walks,
    st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=6)), min_size=1, max_size=8).map(
        b"/".join
    ),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map(b"".join),
    st.binary(max_size=64),
)
