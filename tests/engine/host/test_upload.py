"""Large files received into resumable partials (upload.py): checkpoints, resume, quota."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.errors import (
    PathRefused,
    PeerDiskFull,
    ProtocolError,
    QuotaExceeded,
)
from custom_components.mynas.engine.host import disk
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import BLOCK, charge
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import DAY, MIB, MTIME, assert_consistent, files_under, jail_charge, put


def test_upload_writes_many_chunks_through_short_writes(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More chunks than one pwritev takes, and writes that stop halfway through a chunk."""

    def short(fd: int, buffers: Any, offset: int) -> int:
        # What a real short write does: the first buffer, then part of the second.
        return os.pwrite(fd, b"".join(bytes(b) for b in buffers[:2])[:7], offset)

    chunks = [bytes([n % 256]) * 5 for n in range(disk._IOV_MAX + 10)]
    content = b"".join(chunks)
    upload = jail.begin_upload(b"f", len(content), MTIME, 0o644)
    upload.write_many(chunks[:-20])
    monkeypatch.setattr(os, "pwritev", short)
    upload.write_many(chunks[-20:])
    monkeypatch.undo()
    upload.finish()
    assert (jail.root / "f").read_bytes() == content
    assert_consistent(jail)


def partials(jail: Jail) -> list[str]:
    return sorted(os.listdir(jail.partial_dir))


def test_upload_interrupted_then_resumed(jail: Jail) -> None:
    content = os.urandom(3 * MIB + 123)
    put(jail, b"big/file", b"old version")
    upload = jail.begin_upload(b"big/file", len(content), MTIME, 0o755)
    assert upload.offset == 0
    upload.write(content[:MIB])
    upload.write(memoryview(content)[MIB : 2 * MIB])
    upload.abandon()  # the connection is lost
    (name,) = partials(jail)
    assert name.endswith(f".{2 * MIB}.part")  # the durable length is in the name
    assert_consistent(jail)
    upload = jail.begin_upload(b"big/file", len(content), MTIME, 0o755)
    assert upload.offset == 2 * MIB
    upload.write(content[upload.offset :])
    upload.finish()
    target = jail.root / "big" / "file"
    assert target.read_bytes() == content
    assert target.lstat().st_mtime_ns == MTIME
    assert stat.S_IMODE(target.lstat().st_mode) == 0o755
    assert partials(jail) == []
    assert list(files_under(jail.trash_dir).values()) == [b"old version"]
    assert jail.hash_file(b"big/file") == tree.hash_file(os.fsencode(target))
    assert_consistent(jail)
    upload.abandon()  # no-ops once finished
    upload.discard()
    with pytest.raises(ProtocolError, match="already over"):
        upload.write(b"x")


def test_resume_never_trusts_bytes_past_the_checkpoint(jail: Jail) -> None:
    upload = jail.begin_upload(b"f", 4 * BLOCK, MTIME, 0o644)
    upload.write(b"a" * BLOCK)
    upload.abandon()
    (name,) = partials(jail)
    with (jail.partial_dir / name).open("ab") as handle:
        handle.write(b"?" * BLOCK)  # appended but never fsynced: a power cut could garble it
    jail.rescan()  # as at the start after that power cut
    upload = jail.begin_upload(b"f", 4 * BLOCK, MTIME, 0o644)
    assert upload.offset == BLOCK
    assert jail.quota.used == jail_charge(jail)
    upload.write(b"b" * 3 * BLOCK)
    upload.finish()
    assert (jail.root / "f").read_bytes() == b"a" * BLOCK + b"b" * 3 * BLOCK
    assert_consistent(jail)


def test_checkpoints_while_writing(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("custom_components.mynas.engine.host.upload.CHECKPOINT", 2 * BLOCK)
    with jail.begin_upload(b"f", 10 * BLOCK, MTIME, 0o644) as upload:
        upload.write(b"x" * BLOCK)
        assert partials(jail)[0].endswith(".0.part")
        upload.write(b"x" * BLOCK)
        assert partials(jail)[0].endswith(f".{2 * BLOCK}.part")
    resumed = jail.begin_upload(b"f", 10 * BLOCK, MTIME, 0o644)
    assert resumed.offset == 2 * BLOCK
    resumed.discard()


def test_context_manager_abandons_on_error(jail: Jail) -> None:
    def transfer() -> None:
        with jail.begin_upload(b"f", MIB, MTIME, 0o644) as upload:
            upload.write(b"x" * 1000)
            raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        transfer()
    assert partials(jail)[0].endswith(".1000.part")
    resumed = jail.begin_upload(b"f", MIB, MTIME, 0o644)
    assert resumed.offset == 1000
    resumed.discard()


def test_discard_leaves_nothing(jail: Jail) -> None:
    used = jail.quota.used
    upload = jail.begin_upload(b"f", MIB, MTIME, 0o644)
    upload.write(b"x" * 10000)
    assert jail.quota.used == used + charge(10000)
    upload.discard()
    assert partials(jail) == []
    assert jail.quota.used == used
    assert_consistent(jail)


def test_upload_refuses_too_much_or_too_little(jail: Jail) -> None:
    upload = jail.begin_upload(b"f", 10, MTIME, 0o644)
    upload.write(b"12345")
    with pytest.raises(ProtocolError, match="announced as 10"):
        upload.write(b"123456")
    with pytest.raises(ProtocolError, match="only 5 of 10"):
        upload.finish()
    assert not (jail.root / "f").exists()
    upload.discard()
    with pytest.raises(ProtocolError, match="negative size"):
        jail.begin_upload(b"f", -1, MTIME, 0o644)
    assert_consistent(jail)


def test_changed_file_does_not_resume_from_the_old_partial(jail: Jail) -> None:
    with jail.begin_upload(b"f", 100, MTIME, 0o644) as upload:
        upload.write(b"o" * 50)
    (old,) = partials(jail)
    with jail.begin_upload(b"f", 100, MTIME + 1, 0o644) as upload:
        assert upload.offset == 0
    assert partials(jail) != [old]
    assert len(partials(jail)) == 1
    assert_consistent(jail)


def test_one_upload_per_path_at_a_time(jail: Jail) -> None:
    first = jail.begin_upload(b"f", 100, MTIME, 0o644)
    with pytest.raises(PathRefused, match="already being uploaded"):
        jail.begin_upload(b"f", 200, MTIME, 0o644)
    first.abandon()
    jail.begin_upload(b"f", 200, MTIME, 0o644).discard()
    assert_consistent(jail)


def test_upload_over_the_quota_creates_nothing(space: HostedSpace) -> None:
    small = space.jail("small", 10 * BLOCK)
    with small.begin_upload(b"f", 6 * BLOCK, MTIME, 0o644) as upload:
        upload.write(b"x" * BLOCK)
    put(small, b"g", b"x" * 3 * BLOCK)  # used: 1 block of partial + 3 blocks
    with pytest.raises(QuotaExceeded):
        small.begin_upload(b"h", 7 * BLOCK, MTIME, 0o644)
    assert len(partials(small)) == 1
    with pytest.raises(QuotaExceeded):  # 8 blocks do not fit even without the old partial
        small.begin_upload(b"f", 8 * BLOCK, MTIME, 0o644)
    assert partials(small) == []
    assert_consistent(small)


def test_upload_disk_full_keeps_what_was_counted(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = jail.begin_upload(b"f", 10 * BLOCK, MTIME, 0o644)
    upload.write(b"a" * 100)
    real = os.pwrite

    def full(fd: int, buffers: Any, offset: int) -> int:
        real(fd, bytes(buffers[0])[:10], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(PeerDiskFull):
        upload.write(b"b" * 100)
    monkeypatch.undo()
    assert upload.offset == 100
    upload.abandon()
    (name,) = partials(jail)
    assert (jail.partial_dir / name).read_bytes() == b"a" * 100
    assert_consistent(jail)


def test_abandon_survives_a_failing_checkpoint(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = jail.begin_upload(b"f", 100, MTIME, 0o644)
    upload.write(b"a" * 50)

    def broken(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    upload.abandon()  # logged, not raised: the partial resumes from its last checkpoint
    monkeypatch.undo()
    resumed = jail.begin_upload(b"f", 100, MTIME, 0o644)
    assert resumed.offset == 0
    resumed.discard()
    assert_consistent(jail)


def test_finish_refused_keeps_the_upload_open(jail: Jail) -> None:
    upload = jail.begin_upload(b"d", 3, MTIME, 0o644)
    upload.write(b"abc")
    jail.make_dir(b"d")  # a directory took the name meanwhile
    with pytest.raises(PathRefused, match="directory is in the way"):
        upload.finish()
    upload.abandon()
    with pytest.raises(PathRefused, match="directory is in the way"):
        jail.begin_upload(b"d", 3, MTIME, 0o644)
    assert_consistent(jail)


def test_empty_upload(jail: Jail) -> None:
    with jail.begin_upload(b"empty", 0, MTIME, 0o644) as upload:
        upload.finish()
    assert (jail.root / "empty").read_bytes() == b""
    assert_consistent(jail)


def test_discard_of_a_vanished_partial(jail: Jail) -> None:
    upload = jail.begin_upload(b"f", 100, MTIME, 0o644)
    for name in partials(jail):
        (jail.partial_dir / name).unlink()  # e.g. the host removed it by hand
    upload.discard()
    assert jail.quota.reserved == 0


def test_stale_partials_expire(space: HostedSpace, jail: Jail) -> None:
    with jail.begin_upload(b"stale", MIB, MTIME, 0o644) as upload:
        upload.write(b"x" * 1000)
    active = jail.begin_upload(b"active", MIB, MTIME, 0o644)
    active.write(b"y" * 1000)
    now = time.time()
    assert space.purge(now + DAY) == 0
    assert len(partials(jail)) == 2
    assert space.purge(now + 8 * DAY) == charge(1000)
    assert len(partials(jail)) == 1  # the active one is never purged
    active.abandon()
    assert space.purge(now + 8 * DAY) == charge(1000)
    assert partials(jail) == []
    assert_consistent(jail)


# --- a partial against the quota and a full disk --------------------------------------------


def test_resume_over_the_quota_keeps_the_partial(space: HostedSpace) -> None:
    small = space.jail("small", 10 * BLOCK)
    with small.begin_upload(b"f", 6 * BLOCK, MTIME, 0o644) as upload:
        upload.write(b"x" * BLOCK)
    put(small, b"g", b"x" * 8 * BLOCK)
    with pytest.raises(QuotaExceeded):
        small.begin_upload(b"f", 6 * BLOCK, MTIME, 0o644)  # 5 more blocks do not fit
    assert len(partials(small)) == 1
    small.delete(b"g")  # does not help: the trash counts
    with pytest.raises(QuotaExceeded):
        small.begin_upload(b"f", 6 * BLOCK, MTIME, 0o644)
    space.jail("small", 20 * BLOCK)  # the host grants more
    with small.begin_upload(b"f", 6 * BLOCK, MTIME, 0o644) as upload:
        assert upload.offset == BLOCK
    assert_consistent(small)


def test_partial_that_cannot_be_created(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open
    partial = os.fsencode(jail.partial_dir)

    def full(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.fsencode(path).startswith(partial):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(PeerDiskFull):
        jail.begin_upload(b"f", MIB, MTIME, 0o644)
    monkeypatch.undo()
    assert_consistent(jail)
    jail.begin_upload(b"f", MIB, MTIME, 0o644).discard()  # the path is free again
