"""Replication when things go wrong: cuts, files changing under the reader, a full quota,
a wrong host key, cancellation, a bandwidth limit, and a host that lies on restore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import copy
import itertools
import os
from pathlib import Path
import socket
import threading
import time
from typing import Any

import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.errors import (
    AuthRefused,
    HostKeyMismatch,
    HostRefused,
    PathRefused,
    PeerDiskFull,
    PeerUnreachable,
    QuotaExceeded,
    RestoreConflict,
)
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.upload import Upload
from custom_components.mynas.engine.identity import Identity
from custom_components.mynas.engine.owner import (
    restore as restorer,
    scanner,
    sender,
    verify as verifier,
)
from custom_components.mynas.engine.owner.run import (
    PROGRESS_INTERVAL,
    SMALL_FILE,
    PeerTarget,
    Phase,
    Progress,
)

from ..conftest import ServerFactory, wait_until
from ..replica_support import (
    FOLDER,
    MIB,
    MTIME,
    Env,
    change_under_reader,
    check_index_matches_host,
    close_env,
    drop_connections,
    index_view,
    make_env,
    partials,
    plain_push,
    snapshot,
    write,
)


def _files(view: dict[bytes, tuple[Any, ...]]) -> set[bytes]:
    return {path for path, value in view.items() if value[0] == "f"}


def _cut_after(
    env: Env, monkeypatch: pytest.MonkeyPatch, cls: type, name: str, when: Any
) -> dict[str, int]:
    """Wrap ``cls.name`` (run in a host worker thread) to cut every connection once
    ``when(self, result)`` is true."""
    loop = asyncio.get_running_loop()
    real = getattr(cls, name)
    state = {"cuts": 0}

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real(self, *args, **kwargs)
        if not state["cuts"] and when(self, result):
            state["cuts"] += 1
            loop.call_soon_threadsafe(drop_connections, env.server)
        return result

    monkeypatch.setattr(cls, name, wrapper)
    return state


# --- a connection cut mid-push ---------------------------------------------------------------


async def test_cut_mid_large_file_then_resume(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large file cut off mid-stream resumes from the host's partial on the next run."""
    size = 24 * MIB
    write(env.src / "big.bin", os.urandom(size))
    write(env.src / "small", b"small")
    state = _cut_after(
        env, monkeypatch, Upload, "write_many", lambda upload, _: upload.offset >= 6 * MIB
    )
    with pytest.raises(PeerUnreachable, match="connection lost"):
        await env.push()
    assert state["cuts"] == 1
    assert b"big.bin" not in index_view(env.index)
    check_index_matches_host(env.index, env.replica, exact=False)
    assert not (env.replica / "big.bin").exists()
    await wait_until(env.upload_idle)
    assert len(partials(env.storage)) == 1

    result = await env.push()
    assert result.files_sent >= 1
    assert result.bytes_sent < size - 5 * MIB  # resumed: at least 6 MiB were kept
    env.check_replica()
    check_index_matches_host(env.index, env.replica)
    assert partials(env.storage) == []
    assert (await env.verify()).clean


async def test_cut_while_many_small_files_are_in_flight(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches in flight when the line drops: the index keeps only what the host holds."""
    for i in range(2000):
        write(env.src / f"d{i % 7}" / f"f{i:04}", os.urandom(600 + i % 900), mtime_ns=MTIME + i)
    state = _cut_after(env, monkeypatch, Jail, "write_batch", lambda *_: True)
    with pytest.raises(PeerUnreachable):
        await env.push()
    assert state["cuts"] == 1
    check_index_matches_host(env.index, env.replica, exact=False)
    recorded = _files(index_view(env.index))
    assert len(recorded) < 2000

    result = await env.push()
    assert result.files_sent == 2000 - len(recorded)  # nothing recorded is sent again
    env.check_replica()
    check_index_matches_host(env.index, env.replica)
    found = await env.verify()
    assert found.clean
    assert found.checked == 2000
    await env.restore(env.work / "restored")
    assert snapshot(env.work / "restored") == snapshot(env.src, portable=True)


# --- files that change while they are read ---------------------------------------------------


async def test_small_file_modified_during_the_push(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file changing under the reader is not recorded; the next run sends it."""
    write(env.src / "victim", b"version 1")
    write(env.src / "other", b"other")
    await env.push()
    write(env.src / "victim", b"version 2", mtime_ns=MTIME + 1)
    write(env.src / "new", b"new file")
    real = scanner.read_file_checked

    def meddle(path: bytes, expected: tree.Entry) -> bytes | None:
        if path.endswith((b"/victim", b"/new")):
            write(path, b"changed again!", mtime_ns=MTIME + 2)
        return real(path, expected)

    monkeypatch.setattr(scanner, "read_file_checked", meddle)
    result = await env.push()
    assert result.files_changed_during_read == 2
    assert result.files_sent == 0
    view = index_view(env.index)
    assert view[b"victim"][2] == MTIME  # still what the host holds: version 1
    assert b"new" not in view
    assert (env.replica / "victim").read_bytes() == b"version 1"
    check_index_matches_host(env.index, env.replica)

    monkeypatch.setattr(scanner, "read_file_checked", real)
    result = await env.push()
    assert result.files_sent == 2
    env.check_replica()


@pytest.mark.parametrize("how", ["grows", "shrinks", "touched"])
async def test_large_file_modified_during_the_push(
    env: Env, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A streamed file changing under the reader is discarded on the host, not recorded."""
    size = 3 * MIB
    write(env.src / "big", os.urandom(size))
    real = sender._read_block
    calls = {"n": 0}

    def meddle(fd: int, position: int, count: int, digest: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            change_under_reader(env.src / "big", how, size)
        return real(fd, position, count, digest)

    monkeypatch.setattr(sender, "_read_block", meddle)
    result = await env.push()
    assert result.files_changed_during_read == 1
    assert result.files_sent == 0
    assert index_view(env.index) == {}
    assert not (env.replica / "big").exists()
    await wait_until(env.upload_idle)
    assert partials(env.storage) == []

    monkeypatch.setattr(sender, "_read_block", real)
    result = await env.push()
    assert result.files_sent == 1
    env.check_replica()
    check_index_matches_host(env.index, env.replica)


async def test_resume_of_a_file_that_shrank_since_the_scan(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial whose local bytes are gone is not trusted: the file counts as changed."""
    size = 12 * MIB
    write(env.src / "big", os.urandom(size))
    _cut_after(env, monkeypatch, Upload, "write_many", lambda up, _: up.offset >= 4 * MIB)
    with pytest.raises(PeerUnreachable):
        await env.push()
    await wait_until(env.upload_idle)
    real_open = sender._open_local

    def open_shrunk(path: bytes) -> int:
        os.truncate(path, 1000)  # after the scan saw the full size
        return real_open(path)

    monkeypatch.setattr(sender, "_open_local", open_shrunk)
    result = await env.push()
    assert result.files_changed_during_read == 1
    assert index_view(env.index) == {}


@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_file_that_vanishes_or_cannot_be_read(
    env: Env, monkeypatch: pytest.MonkeyPatch, encrypted: bool
) -> None:
    """Gone since the scan: skipped quietly; unreadable: reported, the run goes on."""
    write(env.src / "big-gone", b"g" * (SMALL_FILE + 1))
    write(env.src / "big-locked", b"l" * (SMALL_FILE + 1))
    write(env.src / "big-touched", b"t" * (SMALL_FILE + 1))
    write(env.src / "fine", b"fine")
    real_open = sender._open_local

    def failing_open(path: bytes) -> int:
        if path.endswith(b"big-gone"):
            os.unlink(path)
        if path.endswith(b"big-locked"):
            raise PermissionError(13, "Permission denied")
        if path.endswith(b"big-touched"):  # changed between the scan and the read
            os.utime(path, ns=(MTIME + 3, MTIME + 3))
        return real_open(path)

    monkeypatch.setattr(sender, "_open_local", failing_open)
    result = await env.push(encrypted=encrypted)
    assert result.files_sent == 1
    assert result.files_changed_during_read == 2
    assert result.errors == ["big-locked: Permission denied"]
    assert _files(index_view(env.index)) == {b"fine"}


@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_read_error_mid_stream_keeps_the_partial(
    env: Env, monkeypatch: pytest.MonkeyPatch, encrypted: bool
) -> None:
    """A local disk error mid-file: reported, the host keeps the partial for a resume."""
    write(env.src / "big", os.urandom(6 * MIB))
    real = os.pread
    calls = {"n": 0}

    def failing(fd: int, count: int, position: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:  # after the first block: 1 MiB plain, 4 MiB sealed
            raise OSError(5, "Input/output error")
        return real(fd, count, position)

    monkeypatch.setattr(sender.os, "pread", failing)
    result = await env.push(encrypted=encrypted)
    monkeypatch.setattr(sender.os, "pread", real)
    assert result.errors == ["big: Input/output error"]
    await wait_until(env.upload_idle)
    assert len(partials(env.storage)) == 1
    result = await env.push(encrypted=encrypted)
    assert 0 < result.bytes_sent < 6 * MIB
    assert partials(env.storage) == []
    dest = env.work / "restored"
    await env.restore(dest, encrypted=encrypted)
    assert (dest / "big").read_bytes() == (env.src / "big").read_bytes()
    if not encrypted:
        env.check_replica()


# --- quota -----------------------------------------------------------------------------------


async def test_quota_exceeded_mid_run_then_raised(
    fast_dir: Path, make_server: ServerFactory, alice_id: Identity
) -> None:
    """A clean QuotaExceeded; the index holds exactly what the host acknowledged."""
    env = await make_env(make_server, fast_dir, alice_id, quota=600_000)
    try:
        sizes = {f"f{i:02}": 50_000 + i for i in range(20)}
        for name, size in sizes.items():
            write(env.src / name, os.urandom(size))
        write(env.src / "zz-big", os.urandom(SMALL_FILE + 5000))
        sizes["zz-big"] = SMALL_FILE + 5000
        for name in ("zz-z1", "zz-z2"):  # never even tried once the host is full
            write(env.src / name, os.urandom(1000))
            sizes[name] = 1000
        with pytest.raises(QuotaExceeded, match=r"needed, .* left") as caught:
            await env.push()
        held = _files(index_view(env.index))
        assert held == {os.fsencode(p.name) for p in env.replica.iterdir()}
        assert 0 < len(held) < 20
        check_index_matches_host(env.index, env.replica)
        missing = sum(size for name, size in sizes.items() if name.encode() not in held)
        assert caught.value.needed >= missing
        assert 0 <= caught.value.available < 50_000
        assert env.server.jail("alice").quota.reserved == 0

        await env.set_quota(1 << 30)
        result = await env.push()
        assert result.files_sent == 23 - len(held)
        env.check_replica()
        check_index_matches_host(env.index, env.replica)
    finally:
        close_env(env)


@pytest.mark.parametrize("encrypted", [False, True])
async def test_one_large_file_over_quota(
    fast_dir: Path, make_server: ServerFactory, alice_id: Identity, encrypted: bool
) -> None:
    """A large file the quota cannot take is refused before any byte of it is sent."""
    env = await make_env(make_server, fast_dir, alice_id, quota=MIB)
    try:
        write(env.src / "big", os.urandom(2 * MIB))
        with pytest.raises(QuotaExceeded) as caught:
            await env.push(encrypted=encrypted)
        assert caught.value.needed >= 2 * MIB
        assert caught.value.available <= MIB
        assert partials(env.storage) == []
        assert index_view(env.index) == {}
    finally:
        close_env(env)


# --- who is on the other end -----------------------------------------------------------------


async def test_host_key_mismatch_sends_nothing(
    fast_dir: Path, make_server: ServerFactory, alice_id: Identity, bob_id: Identity
) -> None:
    """A host with another key than the pinned one: refused before any byte of data."""
    events: list[tuple[str, dict[str, Any]]] = []
    env = await make_env(
        make_server, fast_dir, alice_id, on_event=lambda kind, data: events.append((kind, data))
    )
    try:
        write(env.src / "secret", b"do not send")
        wrong = PeerTarget("host", env.target.addresses, bob_id.public_line)
        for call in (
            plain_push(env.alice, wrong, FOLDER, env.src, env.index),
            verifier.verify(env.alice, wrong, FOLDER, env.src, env.index),
            restorer.restore(env.alice, wrong, FOLDER, env.work / "r"),
        ):
            with pytest.raises(HostKeyMismatch) as caught:
                await call
            err = caught.value
            assert err.expected == bob_id.fingerprint
            assert err.presented == env.server.identity.fingerprint
            assert err.presented_key == env.server.identity.public_line
            assert bob_id.fingerprint in str(err)
            assert env.server.identity.fingerprint in str(err)
        assert os.listdir(env.jail) == []
        assert env.server.peer_state == {}
        assert env.server.unknown_keys == {}  # our key was never even offered
        assert [kind for kind, _ in events] == []
        assert env.index.folders() == []
    finally:
        close_env(env)


async def test_a_host_that_has_not_added_us(env: Env, mallory_id: Identity) -> None:
    """AuthRefused says the other side has not added this node."""
    write(env.src / "a", b"a")
    with pytest.raises(AuthRefused, match="has not added this node"):
        await plain_push(mallory_id, env.target, FOLDER, env.src, env.index)
    assert mallory_id.fingerprint in env.server.unknown_keys


async def test_unreachable_addresses(env: Env) -> None:
    """A closed port, several dead addresses, or none at all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    key = env.server.identity.public_line
    with pytest.raises(PeerUnreachable, match="connection refused"):
        await plain_push(env.alice, PeerTarget("x", (dead,), key), FOLDER, env.src, env.index)
    with pytest.raises(PeerUnreachable) as caught:
        await plain_push(env.alice, PeerTarget("x", (dead, dead), key), FOLDER, env.src, env.index)
    assert str(caught.value).count("connection refused") == 2
    with pytest.raises(PeerUnreachable, match="no address"):
        await plain_push(env.alice, PeerTarget("x", (), key), FOLDER, env.src, env.index)
    # The second address answers: the first one's failure does not matter.
    write(env.src / "a", b"a")
    good = PeerTarget("host", (dead, *env.target.addresses), key)
    assert (await plain_push(env.alice, good, FOLDER, env.src, env.index)).files_sent == 1


# --- bandwidth, progress, cancellation -------------------------------------------------------


async def test_the_push_lets_other_tasks_run(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending small files never has to wait on loopback; other tasks still get turns."""
    for i in range(200):
        write(env.src / f"f{i:03d}", b"x")
    monkeypatch.setattr(sender, "_TURN", 0.0)  # a turn after every file
    handled = 0
    real = sender.Sender.handle

    async def counting(self: sender.Sender, work: Any) -> None:
        nonlocal handled
        handled += 1
        await real(self, work)

    monkeypatch.setattr(sender.Sender, "handle", counting)
    longest = 0  # files handled while the other task waited for its turn
    running = True

    async def other_task() -> None:
        nonlocal longest
        seen = handled
        while running:
            await asyncio.sleep(0)
            longest = max(longest, handled - seen)
            seen = handled

    task = asyncio.create_task(other_task())
    try:
        result = await env.push()
    finally:
        running = False
        await task
    assert result.files_sent == 200
    assert longest <= 2  # not the whole batch of 200 in one go
    env.check_replica()


async def test_bandwidth_limit_and_progress(env: Env) -> None:
    """About 2.5 MiB at 1 MiB/s (one second of burst) takes 1.5 s; progress is throttled."""
    write(env.src / "big", os.urandom(SMALL_FILE + MIB // 2))
    for i in range(10):
        write(env.src / "small" / f"s{i}", os.urandom(100 * 1024))
    total = SMALL_FILE + MIB // 2 + 10 * 100 * 1024
    seen: list[tuple[float, Progress]] = []
    started = time.monotonic()
    result = await env.push(
        bwlimit=MIB, progress=lambda p: seen.append((time.monotonic(), copy.copy(p)))
    )
    elapsed = time.monotonic() - started
    assert 1.3 <= elapsed < 10
    assert result.bytes_sent == total
    env.check_replica()

    last = seen[-1][1]
    assert last.phase is Phase.DONE
    assert (last.files_done, last.files_total) == (11, 11)
    assert last.bytes_done == last.bytes_total == total
    assert last.percent == 100.0
    assert len(seen) >= 3
    assert len(seen) <= elapsed / PROGRESS_INTERVAL + 2  # throttled
    # Throttled: a few per second; only the final DONE comes whenever the run ends.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen[:-1])]
    assert all(gap >= PROGRESS_INTERVAL * 0.9 for gap in gaps), gaps
    done = [p.bytes_done for _, p in seen]
    assert done == sorted(done)
    assert all(p.bytes_done <= total for _, p in seen)
    assert Phase.TRANSFERRING in {p.phase for _, p in seen}


# The modules of the replicator (push and its halves) and of the client.
_CLIENT_SIDE = (
    "push.py",
    "feed.py",
    "sender.py",
    "handoff.py",
    "index_writer.py",
    "client.py",
    "outbox.py",
    "answers.py",
)


def _client_side_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running code of the replicator or the client (the host's are fine)."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        name = code.co_filename if code is not None else ""
        if task is not asyncio.current_task() and name.endswith(_CLIENT_SIDE):
            found.append(task)
    return found


def _loop_workers() -> list[threading.Thread]:
    """The event loop's default executor threads (they outlive any one call)."""
    return [t for t in threading.enumerate() if t.name.startswith(("SyncWorker", "asyncio"))]


@pytest.mark.parametrize("kind", ["large", "small"])
async def test_cancellation_mid_transfer(env: Env, kind: str) -> None:
    """A cancelled push stops at once, leaves nothing running, and the next run completes."""
    if kind == "large":
        write(env.src / "big", os.urandom(12 * MIB))
    else:  # more batches than the hand-over queue holds: the scan thread waits
        for i in range(1600):
            write(env.src / f"f{i:04}", os.urandom(2048), mtime_ns=MTIME + i)
    moving = asyncio.Event()

    def watch(progress: Progress) -> None:
        if progress.bytes_done:
            moving.set()

    before = set(threading.enumerate())
    task = asyncio.create_task(env.push(bwlimit=MIB, progress=watch))
    await asyncio.wait_for(moving.wait(), 10)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _client_side_tasks() == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("mynas")] == []
    assert {t for t in threading.enumerate() if t not in before} <= set(_loop_workers())
    check_index_matches_host(env.index, env.replica, exact=False)
    await wait_until(env.upload_idle)

    result = await env.push()
    env.check_replica()
    check_index_matches_host(env.index, env.replica)
    if kind == "large":
        assert result.bytes_sent < 12 * MIB  # resumed
    else:
        assert result.files_sent < 1600


async def test_verify_progress_ends_with_done(env: Env) -> None:
    """Verify reports its progress and a final DONE."""
    for i in range(5):
        write(env.src / f"f{i}", b"x" * i)
    await env.push()
    seen: list[Progress] = []
    found = await env.verify(progress=lambda p: seen.append(copy.copy(p)))
    assert found.clean
    assert seen[-1].phase is Phase.DONE
    assert seen[-1].files_done == 5


# --- a host that lies on restore -------------------------------------------------------------


type _Item = tree.Entry | memoryview


class _LyingLink:
    """Stands in for a PeerLink to a hostile host: answers LIST and READ as scripted."""

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.closed = False

    async def list(self, path: bytes = b"", **_kw: Any) -> AsyncIterator[tuple[tree.Entry, None]]:
        for item in self.items:
            if isinstance(item, tree.Entry):
                yield item, None

    async def download(self, path: bytes) -> AsyncIterator[_Item]:
        for item in self.items:
            yield item

    async def close(self) -> None:
        self.closed = True


def _file(path: bytes, size: int) -> _Item:
    return tree.Entry(path, tree.Kind.FILE, size, MTIME, 0o644)


def _dir(path: bytes) -> _Item:
    return tree.Entry(path, tree.Kind.DIR, 0, MTIME, 0o755)


def _data(data: bytes) -> _Item:
    return memoryview(data)


LIES = {
    "dot-dot": ("", [_dir(b"Docs"), _file(b"Docs/../../evil", 4), _data(b"evil")]),
    "dot-dot-large": (
        "",
        [_dir(b"Docs"), _file(b"Docs/a/../../../evil", SMALL_FILE + 1), _data(b"e")],
    ),
    "other folder": ("", [_file(b"Other/evil", 4), _data(b"evil")]),
    "sibling of the sub-path": ("a", [_dir(b"Docs/a"), _file(b"Docs/ab/evil", 1), _data(b"e")]),
    "empty component": ("", [_file(b"Docs//evil", 1), _data(b"e")]),
    "too much data": ("", [_file(b"Docs/f", 2), _data(b"abc")]),
    "data without entry": ("", [_data(b"abc")]),
    "short then next": ("", [_file(b"Docs/f", 5), _data(b"ab"), _file(b"Docs/g", 0)]),
    "short at the end": ("", [_file(b"Docs/f", SMALL_FILE + 10), _data(b"ab")]),
    "a file for the folder": ("", [_file(b"Docs", 3), _data(b"abc")]),
    "through a symlink": ("", [_dir(b"Docs"), _file(b"Docs/link/evil", 4), _data(b"evil")]),
}


@pytest.mark.parametrize("lie", list(LIES))
@pytest.mark.parametrize("overwrite", [False, True])
async def test_restore_refuses_a_lying_host(
    env: Env, monkeypatch: pytest.MonkeyPatch, lie: str, overwrite: bool
) -> None:
    """Whatever a hostile host sends, nothing lands outside what was asked."""
    sub, items = LIES[lie]
    link = _LyingLink(items)

    async def fake_connect(*_args: Any) -> _LyingLink:
        return link

    monkeypatch.setattr(restorer, "open_link", fake_connect)
    outside = env.work / "outside"
    outside.mkdir()
    dest = env.work / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "link")
    with pytest.raises(PathRefused):
        await env.restore(dest, path=sub, overwrite=overwrite)
    assert link.closed
    assert os.listdir(outside) == []
    assert sorted(os.listdir(env.work)) == ["dest", "outside"]
    assert not (env.work.parent / "evil").exists()
    leftovers = [p for p in dest.rglob("*") if p.name.startswith(".mynas-restore-")]
    assert leftovers == []


def test_local_writer_checks_every_path(tmp_path: Path) -> None:
    """The restore writer refuses anything but plain paths below its target."""
    (tmp_path / "real").mkdir()
    (tmp_path / "file").write_bytes(b"")
    os.symlink(tmp_path / "real", tmp_path / "link")
    writer = restorer._LocalWriter(os.fsencode(tmp_path), overwrite=False)
    assert writer.local(b"a/b") == os.fsencode(tmp_path) + b"/a/b"
    assert writer.local(b"") == os.fsencode(tmp_path)
    for bad in (b"../x", b"/etc/passwd", b"a//b", b"a/./b", b"x/", b"a\0b", b"link/x", b"file/x"):
        with pytest.raises(PathRefused):
            writer.local(bad)
    with pytest.raises(PathRefused):
        writer.make_dir(b"link")
    with pytest.raises(PathRefused):
        writer.open_temp(b"")
    assert snapshot(tmp_path / "real") == {b"": ("d", os.lstat(tmp_path / "real").st_mtime_ns)}


# --- errors the run reports and goes on with, and those that stop it -------------------------


async def test_host_side_obstacles_are_reported_and_the_run_goes_on(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory in a file's way, a file in a directory's way, a failed delete."""
    write(env.src / "d" / "f", b"f")
    write(env.src / "old", b"old")
    write(env.src / "fine", b"fine")
    await env.push()
    (env.replica / "blocked").mkdir()  # made on the host behind our back
    write(env.src / "blocked", b"mine")
    os.utime(env.src / "d", ns=(MTIME + 3, MTIME + 3))
    (env.replica / "d" / "f").unlink()
    (env.replica / "d").rmdir()
    write(env.replica / "d", b"a file now")
    os.unlink(env.src / "old")
    write(env.src / "fine", b"fine too", mtime_ns=MTIME + 4)
    real = Jail.delete

    def failing_delete(self: Jail, rel: bytes) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Jail, "delete", failing_delete)
    result = await env.push()
    monkeypatch.setattr(Jail, "delete", real)
    assert result.files_sent == 1  # "fine"
    assert len(result.errors) == 3, result.errors
    assert any(e.startswith("blocked: ") and "directory is in the way" in e for e in result.errors)
    assert any(e.startswith("d: ") and "in the way" in e for e in result.errors)
    assert "old: Input/output error" in result.errors
    view = index_view(env.index)
    assert b"blocked" not in view
    assert b"old" in view  # not deleted, so still claimed
    assert view[b"d"][1] != MTIME + 3


async def test_peer_disk_full_stops_the_run(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's disk itself is full: PeerDiskFull, and nothing unconfirmed is recorded."""
    write(env.src / "big", os.urandom(SMALL_FILE + 1))

    def full(self: Upload) -> None:
        raise PeerDiskFull("No space left on device")

    monkeypatch.setattr(Upload, "finish", full)
    with pytest.raises(PeerDiskFull, match="disk is full"):
        await env.push()
    assert index_view(env.index) == {}

    write(env.src / "small", b"s")
    monkeypatch.setattr(
        Jail, "write_batch", lambda self, files: [PeerDiskFull("ENOSPC")] * len(files)
    )
    with pytest.raises(PeerDiskFull):
        await env.push()
    assert index_view(env.index) == {}


async def test_local_read_problems_are_reported(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable small file and an unlistable directory: reported, the rest is sent."""
    write(env.src / "locked", b"secret")
    write(env.src / "ok", b"ok")
    real_read = scanner.read_file_checked
    real_scan = scanner.scan_rows

    def read(path: bytes, expected: tree.Entry) -> bytes | None:
        if path.endswith(b"/locked"):
            raise PermissionError(13, "Permission denied")
        return real_read(path, expected)

    def scan(*args: Any, **kwargs: Any) -> Any:
        kwargs["report"].add_error(b"hidden", "cannot list this directory: Permission denied")
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(scanner, "read_file_checked", read)
    monkeypatch.setattr(scanner, "scan_rows", scan)
    result = await env.push()
    assert result.files_sent == 1
    assert result.errors == [
        "locked: Permission denied",
        "hidden: cannot list this directory: Permission denied",
    ]
    assert _files(index_view(env.index)) == {b"ok"}


async def test_a_failing_scan_ends_the_run_cleanly(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in the scan thread reaches the caller; nothing is left running."""
    write(env.src / "a", b"a")

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("index is corrupt")

    monkeypatch.setattr(scanner, "scan_rows", broken)
    with pytest.raises(RuntimeError, match="corrupt"):
        await env.push()
    assert _client_side_tasks() == []


async def test_retention_is_asked_of_the_host(env: Env) -> None:
    """A folder's trash retention travels with the push."""
    write(env.src / "a", b"a")
    await env.push(retention_days=90)
    assert env.server.jail("alice").retention_days(FOLDER.encode()) == 90


async def test_verify_problems(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file that cannot be read is reported (never sent); a broken replica errs."""
    write(env.src / "a", b"a")
    write(env.src / "b", b"b")
    await env.push()
    real = tree.hash_file

    def failing(path: bytes | str, **kw: Any) -> bytes:
        if os.fsencode(path).endswith(b"/a"):
            raise OSError(5, "Input/output error")
        return real(path, **kw)

    monkeypatch.setattr(tree, "hash_file", failing)
    found = await env.verify()
    assert (found.checked, found.local_rot, found.host_damaged) == (2, 1, 0)
    assert "local rot: a (cannot be read)" in found.examples
    repaired = await env.verify(repair=True)
    assert (repaired.repaired, repaired.repair_complete) == (0, True)  # nothing to re-send
    monkeypatch.setattr(tree, "hash_file", real)

    real_walk = tree.walk_rows

    def broken_walk(root: Any, **kwargs: Any) -> Any:
        if os.fsencode(root) == os.fsencode(env.src):  # the host's walks go on
            raise RuntimeError("walk failed")
        return real_walk(root, **kwargs)

    monkeypatch.setattr(tree, "walk_rows", broken_walk)
    with pytest.raises(RuntimeError, match="walk failed"):
        await env.verify()
    monkeypatch.undo()

    for child in env.replica.iterdir():
        child.unlink()
    env.replica.rmdir()
    write(env.replica, b"not a folder")
    with pytest.raises(HostRefused):
        await env.verify()


async def test_restore_problems(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host sending one file twice, a local disk that fills: errors, no temp files left."""
    write(env.src / "a", b"a")
    write(env.src / "big", os.urandom(SMALL_FILE + 1))
    await env.push()
    dest = env.work / "dest"

    def full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(restorer, "_write_all", full)
    with pytest.raises(OSError, match="No space left"):
        await env.restore(dest)
    monkeypatch.undo()
    assert [p.name for p in dest.rglob(".mynas-restore-*")] == []

    link = _LyingLink([_file(b"Docs/x", 1), _data(b"1"), _file(b"Docs/x", 1), _data(b"2")])

    async def fake_connect(*_args: Any) -> _LyingLink:
        return link

    monkeypatch.setattr(restorer, "open_link", fake_connect)
    twice = env.work / "twice"
    with pytest.raises(RestoreConflict):
        await restorer.restore(env.alice, env.target, FOLDER, twice, encrypted=False)
    assert [p.name for p in twice.rglob(".mynas-restore-*")] == []


def test_dir_mtimes_skip_what_is_gone(tmp_path: Path) -> None:
    """Directories gone (or no longer directories) since the scan are left out."""
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    found = sender._dir_mtimes(os.fsencode(tmp_path), [b"", b"d", b"f", b"gone"])
    assert set(found) == {b"", b"d"}
