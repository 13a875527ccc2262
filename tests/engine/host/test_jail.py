"""Attack suite for the hosted-space policy: each invariant of DESIGN.md (2 to 5) is a target.

Real files in tmp_path; the "server" here is the test itself, which reserves each file's
charge before ``write_batch`` as the real server does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import ctypes
import errno
import json
import os
from pathlib import Path
import random
import stat
import threading
import time
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from custom_components.mynas.engine import tree
from custom_components.mynas.engine.errors import (
    MyNasError,
    PathRefused,
    PeerDiskFull,
    ProtocolError,
    QuotaExceeded,
)
from custom_components.mynas.engine.host import disk, paths, quota, trash, writes
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.paths import check_path, validate_peer_name
from custom_components.mynas.engine.host.quota import BLOCK, DIR_CHARGE, Quota, charge
from custom_components.mynas.engine.host.space import HostedSpace
from custom_components.mynas.engine.host.writes import IncomingFile

MTIME = 1_700_000_000_123_456_789
DAY = 86400
MIB = 1 << 20


# --- helpers --------------------------------------------------------------------------------


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


# --- names and charges ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "Bob's Pi 2", "é" * 64, "a" * 64, "日本"])
def test_peer_name_accepted(name: str) -> None:
    assert validate_peer_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, ".", "..", ".mynas", ".hidden", "a/b", "a\x00b", "a\nb", "a\u202eb", "😀" * 64],
)
def test_peer_name_refused(name: str) -> None:
    with pytest.raises(ValueError, match="peer name"):
        validate_peer_name(name)


def test_charge_counts_whole_blocks() -> None:
    assert [charge(n) for n in (0, 1, 4095, 4096, 4097)] == [4096, 4096, 4096, 4096, 8192]
    assert DIR_CHARGE == BLOCK == 4096
    with pytest.raises(ValueError, match="negative"):
        charge(-1)


# --- paths: syntax ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        (b"", "empty"),
        (b"/etc/passwd", "absolute"),
        (b"..", "'..'"),
        (b"a/../../b", "'..'"),
        (b".", "'.'"),
        (b"a/./b", "'.'"),
        (b"a//b", "empty component"),
        (b"a/", "ends with"),
        (b"a\x00b", "NUL"),
        (b"x" * 256, "longer than 255"),
        (b"a/" * 2048 + b"b", "longer than 4096"),
        (b"a/" * 256 + b"b", "levels deep"),
        (b".mynas", "reserved"),
        (b"a/.mynas/trash", "reserved"),
        (b".mynas-other", "reserved"),
    ],
)
def test_check_path_refuses(jail: Jail, rel: bytes, why: str) -> None:
    with pytest.raises(PathRefused, match=why):
        jail.check_path(rel)
    with pytest.raises(PathRefused, match=why):
        jail.resolve(rel)


@pytest.mark.parametrize(
    "rel",
    [b"a", b"a/b/c", b"x" * 255, b"...", b"..a", b"a..", b".hidden", b"a.mynas", b"mynas",
     "é/日本".encode(), b"new\nline", b"\xff\xfe", b"back\\slash", b"a/" * 255 + b"b"],
)  # fmt: skip
def test_check_path_accepts(jail: Jail, rel: bytes) -> None:
    assert jail.check_path(rel) == rel
    assert jail.resolve(rel) == os.fsencode(jail.root) + b"/" + rel


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_check_path_property(rel: bytes) -> None:
    try:
        check_path(rel)
    except PathRefused:
        return
    names = rel.split(b"/")
    assert b"\0" not in rel
    assert 0 < len(rel) <= paths.MAX_PATH
    assert len(names) <= paths.MAX_DEPTH
    for name in names:
        assert name not in (b"", b".", b"..")
        assert len(name) <= paths.MAX_NAME
        assert not name.startswith(b".mynas")


# --- paths: what is on disk -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Jail, Path]:
    """A jail full of host-made traps: links pointing out, a dangling link, a loop, a FIFO."""
    base = tmp_path_factory.mktemp("trap")
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_bytes(b"secret")
    root = base / "storage"
    root.mkdir()
    jail = HostedSpace(root).jail("alice", 64 * MIB)
    (jail.root / "d" / "e").mkdir(parents=True)
    (jail.root / "d" / "g").write_bytes(b"g")
    (jail.root / "f").write_bytes(b"f")
    os.symlink(base / "outside", jail.root / "abs")
    os.symlink("../../outside", jail.root / "rel")
    os.symlink("../../../outside", jail.root / "d" / "up")
    os.symlink(base / "nowhere", jail.root / "dangling")
    os.symlink("loop", jail.root / "loop")
    os.mkfifo(jail.root / "fifo")
    return jail, base


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


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rel=adversarial_paths)
def test_resolve_property(trap: tuple[Jail, Path], rel: bytes) -> None:
    jail, _ = trap
    try:
        resolved = jail.resolve(rel)
    except PathRefused:
        return
    root = os.fsencode(jail.root)
    assert resolved == root + b"/" + rel
    # Strictly inside: no link on the way (realpath changes nothing) and no '..'.
    assert os.path.realpath(resolved) == os.path.realpath(root) + b"/" + rel
    path = root
    for name in rel.split(b"/"):
        path += b"/" + name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            break
        assert not stat.S_ISLNK(info.st_mode)


def acceptable(rel: bytes) -> bool:
    """The rules of ``check_path``, spelt out the slow way."""
    names = rel.split(b"/")
    return (
        0 < len(rel) <= paths.MAX_PATH
        and b"\0" not in rel
        and len(names) <= paths.MAX_DEPTH
        and all(
            name not in (b"", b".", b"..")
            and len(name) <= paths.MAX_NAME
            and not name.startswith(b".mynas")
            for name in names
        )
    )


@settings(max_examples=1000, deadline=None)
@given(rel=st.one_of(adversarial_paths, st.binary(max_size=300)))
def test_check_path_accepts_exactly_what_the_rules_allow(rel: bytes) -> None:
    """Its one-pass shortcut for common paths decides like the full check."""
    try:
        check_path(rel)
    except PathRefused:
        assert not acceptable(rel)
    else:
        assert acceptable(rel)


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        (b"abs", "symbolic link"),
        (b"abs/secret", "symbolic link"),
        (b"rel/secret", "symbolic link"),
        (b"d/up/secret", "symbolic link"),
        (b"dangling/x", "symbolic link"),
        (b"loop/x", "symbolic link"),
        (b"f/x", "not a directory"),
        (b"fifo", "neither a regular file nor a directory"),
    ],
)
def test_resolve_refuses_what_is_on_disk(trap: tuple[Jail, Path], rel: bytes, why: str) -> None:
    with pytest.raises(PathRefused, match=why):
        trap[0].resolve(rel)


@pytest.fixture
def links(jail: Jail, outside: Path, tmp_path: Path) -> list[bytes]:
    """Links the host made inside the jail, pointing out of it (or nowhere)."""
    os.symlink(outside, jail.root / "abs")
    os.symlink("../../outside", jail.root / "rel")
    os.symlink(outside / "secret.txt", jail.root / "file_link")
    os.symlink(tmp_path / "nowhere", jail.root / "dangling")
    (jail.root / "sub").mkdir()
    os.symlink("../../../outside", jail.root / "sub" / "up")
    return [b"abs", b"rel", b"file_link", b"dangling", b"sub/up"]


def every_operation(jail: Jail, rel: bytes) -> Iterator[Callable[[], object]]:
    """Each path-taking operation of a jail, applied to ``rel``."""
    yield lambda: jail.resolve(rel)
    yield lambda: jail.begin_upload(rel, 10, MTIME, 0o644)
    yield lambda: jail.delete(rel)
    yield lambda: jail.make_dir(rel, MTIME)
    yield lambda: jail.set_mtime(rel, MTIME)
    yield lambda: list(jail.list(rel))
    yield lambda: jail.open_read(rel)
    yield lambda: jail.hash_file(rel)
    yield lambda: jail.stat(rel)


def test_links_in_the_jail_lead_nowhere(
    jail: Jail, links: list[bytes], outside: Path, tmp_path: Path
) -> None:
    before = snapshot(outside)
    in_jail = snapshot(jail.root)
    used = jail.quota.used
    for link in links:
        for rel in (link, link + b"/secret.txt", link + b"/new/x", link + b"/dir/y"):
            assert isinstance(push(jail, {rel: b"evil"})[0], PathRefused)
            for operation in every_operation(jail, rel):
                with pytest.raises(PathRefused, match="symbolic link"):
                    operation()
    assert snapshot(outside) == before
    assert snapshot(jail.root) == in_jail
    assert not (tmp_path / "nowhere").exists()  # the dangling link made nothing appear
    assert jail.quota.used == used
    assert jail.quota.reserved == 0
    assert os.listdir(jail.tmp_dir) == []
    assert {e.path for e in jail.list()} == {b"sub"}  # links are never listed


def test_link_swapped_in_after_the_check_is_not_followed(
    jail: Jail, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: even if the lstat check were fooled, O_NOFOLLOW refuses the link."""
    link = os.fsencode(jail.root / "late")
    os.symlink(outside / "secret.txt", link)
    real_lstat = os.lstat

    def fooled(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return real_lstat(outside / "secret.txt" if path == link else path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", fooled)
    with pytest.raises(PathRefused, match="late"):
        jail.open_read(b"late")


def test_special_file_is_never_opened(jail: Jail) -> None:
    os.mkfifo(jail.root / "fifo")  # opening a FIFO would block the thread
    for operation in every_operation(jail, b"fifo"):
        with pytest.raises(PathRefused, match="neither"):
            operation()
    assert list(jail.list()) == []


def test_directory_opened_for_reading_is_refused(jail: Jail) -> None:
    jail.make_dir(b"d")
    with pytest.raises(PathRefused, match="not a regular file"):
        jail.open_read(b"d")


def test_jail_root_that_is_a_link_is_refused(
    space: HostedSpace, outside: Path, tmp_path: Path
) -> None:
    os.symlink(outside, space.root / "bob")
    bob = space.jail("bob", 64 * MIB)
    before = snapshot(outside)
    for rel in (b"secret.txt", b"dir", b"new"):
        assert isinstance(push(bob, {rel: b"evil"})[0], PathRefused)
        for operation in every_operation(bob, rel):
            with pytest.raises(PathRefused, match="not a plain directory"):
                operation()
    for operation in (lambda: list(bob.list()), lambda: space.rescan("bob")):
        with pytest.raises(PathRefused, match="not a plain directory"):
            operation()
    assert snapshot(outside) == before
    space.remove_peer_data("bob")  # removes the link, not what it points to
    assert not os.path.lexists(space.root / "bob")
    assert snapshot(outside) == before


def test_missing_jail_root_is_refused(space: HostedSpace) -> None:
    bob = space.jail("bob", MIB)
    bob.root.rmdir()
    with pytest.raises(PathRefused, match="missing"):
        bob.resolve(b"x")


def test_paths_too_long_for_this_host_are_refused(jail: Jail) -> None:
    # Each accepted path must also fit as a trash path under PATH_MAX.
    rel = b"/".join([b"n" * 200] * 20)
    assert check_path(rel) == rel
    with pytest.raises(PathRefused, match="longer than this host can store"):
        jail.resolve(rel)


def test_peer_cannot_reach_trash_or_other_jails(space: HostedSpace, jail: Jail) -> None:
    bob = space.jail("bob", MIB)
    put(bob, b"private", b"bob's")
    put(jail, b"x", b"1")
    jail.delete(b"x")
    for rel in (b".mynas/trash/alice", b"../bob/private", b"../.mynas/trash/alice/x",
                b".mynas", b"/" + os.fsencode(bob.root / "private")):  # fmt: skip
        assert isinstance(push(jail, {rel: b"evil"})[0], PathRefused)
        for operation in every_operation(jail, rel):
            with pytest.raises(PathRefused):
                operation()
    assert (bob.root / "private").read_bytes() == b"bob's"


# --- quota ----------------------------------------------------------------------------------


def test_quota_arithmetic() -> None:
    quota = Quota(10 * BLOCK)
    quota.reserve(4 * BLOCK)
    assert (quota.used, quota.reserved, quota.available) == (0, 4 * BLOCK, 6 * BLOCK)
    with pytest.raises(QuotaExceeded) as caught:
        quota.reserve(7 * BLOCK)
    assert (caught.value.needed, caught.value.available) == (7 * BLOCK, 6 * BLOCK)
    quota.commit(3 * BLOCK)
    quota.release(BLOCK)
    assert (quota.used, quota.reserved) == (3 * BLOCK, 0)
    quota.credit(10 * BLOCK)  # more than used (a stale figure): clamped
    assert quota.used == 0
    quota.set_used(12 * BLOCK)
    quota.limit = 11 * BLOCK
    assert quota.available == 0  # never negative
    quota.reserve(0)
    with pytest.raises(ValueError, match="not reserved"):
        quota.commit(1)
    for bad in (lambda: quota.reserve(-1), lambda: Quota(-1), lambda: setattr(quota, "limit", -1)):
        with pytest.raises(ValueError, match="negative"):
            bad()


def test_concurrent_reservations_never_pass_the_limit() -> None:
    quota = Quota(50 * BLOCK)
    committed = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = 0
        for _ in range(2000):
            try:
                quota.reserve(BLOCK)
            except QuotaExceeded:
                continue
            assert quota.used + quota.reserved <= quota.limit
            if rng.random() < 0.05:
                quota.commit(BLOCK)
                mine += 1
            else:
                quota.release(BLOCK)
        committed.append(mine)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert quota.reserved == 0
    assert quota.used == sum(committed) * BLOCK == 50 * BLOCK


def test_one_file_bigger_than_the_quota_never_touches_the_disk(space: HostedSpace) -> None:
    small = space.jail("small", 4 * BLOCK)
    before = snapshot(space.root)
    assert isinstance(push(small, {b"big": b"x" * (5 * BLOCK)})[0], QuotaExceeded)
    with pytest.raises(QuotaExceeded):
        small.begin_upload(b"big", 5 * BLOCK, MTIME, 0o644)
    assert snapshot(space.root) == before
    assert_consistent(small)


def test_directories_cost_quota_before_they_are_made(space: HostedSpace) -> None:
    small = space.jail("small", 2 * BLOCK)
    # Room for the file and one new directory, not two.
    result = push(small, {b"a/b/f": b"x"})[0]
    assert isinstance(result, QuotaExceeded)
    assert [e.path for e in small.list()] == [b"a"]  # "a" fitted; "b" did not: no file
    assert small.quota.used == DIR_CHARGE
    with pytest.raises(QuotaExceeded):
        small.make_dir(b"p/q/r")
    assert_consistent(small)


def test_many_small_files_fill_the_quota_then_fail(space: HostedSpace) -> None:
    small = space.jail("small", 10 * BLOCK)
    files = {b"f%02d" % n: b"%d" % n for n in range(15)}
    results = push(small, files)
    assert results[:10] == [None] * 10
    assert all(isinstance(r, QuotaExceeded) for r in results[10:])
    assert sorted(os.listdir(small.root)) == [f"f{n:02d}" for n in range(10)]
    assert small.quota.used == small.quota.limit
    assert_consistent(small)


def test_concurrent_batches_stay_within_the_quota(space: HostedSpace) -> None:
    small = space.jail("small", 70 * BLOCK)
    outcomes: list[MyNasError | None] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        results = push(small, {b"t%d/f%02d" % (n, i): b"x" * i for i in range(20)})
        with lock:
            outcomes.extend(results)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = sum(1 for r in outcomes if r is None)
    assert all(r is None or isinstance(r, QuotaExceeded) for r in outcomes)
    assert small.quota.used <= small.quota.limit
    assert sum(len(files) for _, _, files in os.walk(small.root)) == stored
    assert_consistent(small)


def test_overwrite_keeps_the_old_version_and_both_count(jail: Jail) -> None:
    put(jail, b"docs/a.txt", b"version 1")
    put(jail, b"docs/a.txt", b"version 2" * 1000)
    assert (jail.root / "docs" / "a.txt").read_bytes() == b"version 2" * 1000
    trashed = files_under(jail.trash_dir)
    assert list(trashed.values()) == [b"version 1"]
    (name,) = trashed
    assert name.endswith("/docs/a.txt")
    # docs/ + both versions + the trash's stamp and docs/ directories
    assert jail.quota.used == DIR_CHARGE + charge(9) + charge(9000) + 2 * DIR_CHARGE
    assert_consistent(jail)


def test_delete_does_not_free_quota(jail: Jail) -> None:
    put(jail, b"a", b"x" * 10000)
    used = jail.quota.used
    jail.delete(b"a")
    assert jail.quota.used == used + DIR_CHARGE  # the file still counts, plus its stamp dir
    assert_consistent(jail)


def test_purge_after_the_retention_frees_the_quota(space: HostedSpace, jail: Jail) -> None:
    put(jail, b"keep", b"k")
    put(jail, b"docs/a", b"x" * 10000)
    jail.delete(b"docs")
    now = time.time()
    assert space.purge(now + 29 * DAY) == 0
    assert files_under(jail.trash_dir) != {}
    freed = space.purge(now + 31 * DAY)
    assert freed == charge(10000) + 2 * DIR_CHARGE  # a, docs/ and the stamp dir
    assert os.listdir(jail.trash_dir) == []
    assert jail.quota.used == charge(1)
    assert json.loads(jail.state_path.read_text())["used"] == charge(1)
    assert_consistent(jail)


def test_peer_can_lengthen_but_never_shorten_retention(space: HostedSpace, jail: Jail) -> None:
    for folder in (b"docs", b"pics"):
        put(jail, folder + b"/a", b"v1")
        put(jail, folder + b"/a", b"v2")
    jail.set_retention("docs", 90)
    jail.set_retention("docs", 5)  # ignored: requests only grow
    jail.set_retention("pics", 5)  # shorter than the host's 30 days: no effect
    assert jail.retention_days(b"docs") == 90
    assert jail.retention_days(b"pics") == 30
    now = time.time()
    space.purge(now + 31 * DAY)
    assert [name.split("/", 1)[1] for name in files_under(jail.trash_dir)] == ["docs/a"]
    space.purge(now + 91 * DAY)
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)
    jail.set_retention("long", 10**9)
    assert jail.retention_days(b"long") == trash.MAX_RETENTION_DAYS
    # Persisted: a restart keeps the requests.
    again = HostedSpace(space.root).jail("alice", MIB)
    assert again.retention_days(b"docs") == 90


def test_retention_requests_are_checked(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("a/b", ".mynas", "..", ""):
        with pytest.raises(PathRefused):
            jail.set_retention(folder, 40)
    with pytest.raises(ProtocolError, match="negative"):
        jail.set_retention("a", -1)
    monkeypatch.setattr(trash, "MAX_RETENTION_FOLDERS", 2)
    jail.set_retention("a", 40)
    jail.set_retention("b", 40)
    jail.set_retention("a", 50)  # an existing folder may still grow
    with pytest.raises(ProtocolError, match="too many"):
        jail.set_retention("c", 40)


def test_rescan_equals_the_sum_of_charges(space: HostedSpace, jail: Jail) -> None:
    push(jail, {b"a/b/c": b"x" * 5000, b"a/d": b"", b"e": b"y" * 4096, b"f": b"z" * 4097})
    jail.make_dir(b"empty/dirs")
    put(jail, b"e", b"new")
    jail.delete(b"a/b")
    with jail.begin_upload(b"big", 3 * BLOCK, MTIME, 0o644) as upload:
        upload.write(b"p" * 5000)
    expected = jail_charge(jail)
    assert jail.quota.used == expected
    jail.quota.set_used(0)
    assert space.rescan("alice") == expected == jail.quota.used
    assert jail.usage() == quota.JailUsage(used=expected, reserved=0, quota=64 * MIB)


def test_restart_starts_from_the_persisted_usage(space: HostedSpace, jail: Jail) -> None:
    put(jail, b"a", b"x" * 10000)
    space.persist()
    used = jail.quota.used
    assert HostedSpace(space.root).jail("alice", MIB).quota.used == used
    # A wrong persisted value (a crash between a write and a persist) is fixed by rescan.
    state = json.loads(jail.state_path.read_text())
    jail.state_path.write_text(json.dumps({**state, "used": 1}))
    restarted = HostedSpace(space.root)
    assert restarted.jail("alice", MIB).quota.used == 1
    assert restarted.rescan("alice") == used
    assert json.loads(jail.state_path.read_text())["used"] == used


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"used": -5, "retention": 3}'])
def test_damaged_state_starts_from_zero(space: HostedSpace, content: bytes) -> None:
    space.jail("bob", MIB)
    (space.root / ".mynas" / "peers" / "bob" / "state.json").write_bytes(content)
    bob = HostedSpace(space.root).jail("bob", MIB)
    assert bob.quota.used == 0
    assert bob.retention_days(b"x") == 30


# --- atomic, durable writes -----------------------------------------------------------------


def test_batch_writes_content_mode_and_mtime(jail: Jail) -> None:
    files = {b"plain": b"p", b"exec": b"e", b"setuid": b"s", b"private": b""}
    modes = {b"plain": 0o644, b"exec": 0o755, b"setuid": 0o4755, b"private": 0o600}
    items = [
        IncomingFile(path, memoryview(data), MTIME, modes[path]) for path, data in files.items()
    ]
    for item in items:
        jail.quota.reserve(charge(len(item.data)))
    assert jail.write_batch(items) == [None] * 4
    for path, data in files.items():
        info = os.lstat(jail.root / os.fsdecode(path))
        assert (jail.root / os.fsdecode(path)).read_bytes() == data
        assert info.st_mtime_ns == MTIME
    got = {p: stat.S_IMODE(os.lstat(jail.root / os.fsdecode(p)).st_mode) for p in files}
    assert got == {b"plain": 0o644, b"exec": 0o755, b"setuid": 0o755, b"private": 0o644}
    assert_consistent(jail)


def test_failing_write_leaves_no_temp_and_the_old_version(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(jail, b"b", b"old b")
    real = disk.write_all

    def disk_full_on_b(fd: int, data: bytes | memoryview) -> None:
        if bytes(data).startswith(b"new b"):
            os.write(fd, b"new")  # some bytes reach the temp file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", disk_full_on_b)
    results = push(jail, {b"a": b"new a", b"b": b"new b" * 100, b"c": b"new c"})
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], PeerDiskFull)
    assert "No space left" in str(results[1])
    assert (jail.root / "b").read_bytes() == b"old b"
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)


def test_unexpected_os_error_fails_only_that_file(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = disk.write_all

    def broken(fd: int, data: bytes | memoryview) -> None:
        if bytes(data) == b"bad":
            raise OSError(errno.EIO, "Input/output error")
        real(fd, data)

    monkeypatch.setattr(disk, "write_all", broken)
    results = push(jail, {b"a": b"bad", b"b": b"good"})
    assert type(results[0]) is MyNasError
    assert "Input/output error" in str(results[0])
    assert results[1] is None
    assert_consistent(jail)


class Crash(BaseException):
    """Not an OSError nor a MyNasError: the batch itself aborts (e.g. the thread dies)."""


def test_crash_of_the_writing_thread_cleans_up(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    put(jail, b"b", b"old b")
    real = jail._writer._install_at
    calls = []

    def crash_on_second(dirs: Any, source: bytes, rel: bytes) -> None:
        calls.append(rel)
        if len(calls) == 2:
            raise Crash
        real(dirs, source, rel)

    monkeypatch.setattr(jail._writer, "_install_at", crash_on_second)
    with pytest.raises(Crash):
        push(jail, {b"a": b"new a", b"b": b"new b", b"c": b"new c"})
    assert (jail.root / "a").read_bytes() == b"new a"
    assert (jail.root / "b").read_bytes() == b"old b"
    assert not (jail.root / "c").exists()
    assert_consistent(jail)


def test_directory_in_the_way_fails_that_file(jail: Jail) -> None:
    jail.make_dir(b"d/sub")
    results = push(jail, {b"d": b"file", b"e": b"fine"})
    assert isinstance(results[0], PathRefused)
    assert results[1] is None
    assert (jail.root / "d" / "sub").is_dir()
    assert_consistent(jail)


def test_batch_is_made_durable_before_and_after_the_renames(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    real = disk.syncfs

    def spy(path: bytes) -> None:
        seen.append(sorted(os.listdir(jail.root)))
        real(path)

    monkeypatch.setattr(disk, "syncfs", spy)
    push(jail, {b"a": b"1", b"b": b"2"})
    assert seen == [[], ["a", "b"]]  # one syncfs before any final name, one after


def test_failing_syncfs_fails_the_batch(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    put(jail, b"a", b"old")

    def broken(_path: bytes) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk, "syncfs", broken)
    results = push(jail, {b"a": b"new", b"b": b"new"})
    assert all(type(r) is MyNasError for r in results)
    assert (jail.root / "a").read_bytes() == b"old"
    assert not (jail.root / "b").exists()
    assert_consistent(jail)


def test_failing_second_syncfs_is_not_acknowledged(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = disk.syncfs

    def second_fails(path: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(disk, "syncfs", second_fails)
    results = push(jail, {b"a": b"1"})
    assert isinstance(results[0], PeerDiskFull)  # in place, but the caller must not ack
    assert (jail.root / "a").read_bytes() == b"1"
    assert_consistent(jail)


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


def test_parent_deleted_during_the_batch_is_made_again(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = disk.syncfs
    first: list[bool] = []

    def delete_parent(path: bytes) -> None:
        if not first:
            first.append(True)
            jail.delete(b"dir")  # another thread of the same peer, between stage and rename
        real(path)

    jail.make_dir(b"dir/sub")  # there when the batch starts...
    monkeypatch.setattr(disk, "syncfs", delete_parent)
    assert push(jail, {b"dir/sub/f": b"data"}) == [None]
    assert (jail.root / "dir" / "sub" / "f").read_bytes() == b"data"
    assert_consistent(jail)


def test_same_path_twice_in_one_batch(jail: Jail) -> None:
    items = [IncomingFile(b"a", b"first", MTIME, 0o644), IncomingFile(b"a", b"second", MTIME, 0)]
    for item in items:
        jail.quota.reserve(charge(len(item.data)))
    assert jail.write_batch(items) == [None, None]
    assert (jail.root / "a").read_bytes() == b"second"
    assert list(files_under(jail.trash_dir).values()) == [b"first"]
    assert_consistent(jail)


def test_bad_modification_time_fails_that_file(jail: Jail) -> None:
    results = push(jail, {b"a": b"1"}, mtime_ns=1 << 64)
    assert isinstance(results[0], ProtocolError)
    with pytest.raises(ProtocolError, match="out of range"):
        jail.set_mtime(b"a", -(1 << 70))
    with pytest.raises(ProtocolError, match="out of range"):
        jail.make_dir(b"d", 1 << 63)
    assert_consistent(jail)


def test_overwrite_without_hard_links(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    """exFAT and FAT have no hard links: the old version is moved, then the new one renamed."""

    def no_links(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    put(jail, b"a", b"old")
    monkeypatch.setattr(os, "link", no_links)
    put(jail, b"a", b"new")
    assert (jail.root / "a").read_bytes() == b"new"
    assert list(files_under(jail.trash_dir).values()) == [b"old"]
    assert_consistent(jail)


@pytest.mark.parametrize("links", [True, False])
def test_failed_rename_keeps_the_old_version_in_place(
    jail: Jail, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    put(jail, b"a", b"old")
    real_rename = os.rename
    tmp = os.fsencode(jail.tmp_dir)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsencode(src).startswith(tmp):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst, *args, **kwargs)

    def no_links(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "rename", rename)
    if not links:
        monkeypatch.setattr(os, "link", no_links)
    results = push(jail, {b"a": b"new"})
    assert type(results[0]) is MyNasError
    assert (jail.root / "a").read_bytes() == b"old"
    assert files_under(jail.trash_dir) == {}
    assert_consistent(jail)


def test_other_link_errors_fail_the_file(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    put(jail, b"a", b"old")
    monkeypatch.setattr(os, "link", broken)
    assert type(push(jail, {b"a": b"new"})[0]) is MyNasError
    assert (jail.root / "a").read_bytes() == b"old"
    assert_consistent(jail)


# --- batch renames through directory handles -------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_nothing_held(jail: Jail) -> None:
    assert jail.quota.reserved == 0
    assert os.listdir(jail.tmp_dir) == []


def test_directory_replaced_by_a_link_between_batches_is_refused(jail: Jail, outside: Path) -> None:
    """The host's admin swaps a directory for a link: the next batch sees it, nothing leaks."""
    put(jail, b"d/sub/f1", b"one")
    os.rename(jail.root / "d" / "sub", jail.root / "moved")
    os.symlink(outside / "dir", jail.root / "d" / "sub")
    before = snapshot(outside)
    result = push(jail, {b"d/sub/f2": b"evil", b"d/sub/new/f3": b"evil"})
    assert all(isinstance(r, PathRefused) and "symbolic link" in str(r) for r in result)
    assert snapshot(outside) == before
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_link_swapped_in_while_a_batch_is_staged_is_refused(
    jail: Jail, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the temp files and their renames: the renames still refuse the new link."""
    put(jail, b"d/f0", b"zero")
    real = disk.syncfs

    def swap(path: bytes) -> None:
        if not (jail.root / "moved").exists():
            os.rename(jail.root / "d", jail.root / "moved")
            os.symlink(outside, jail.root / "d")
        real(path)

    monkeypatch.setattr(disk, "syncfs", swap)
    before = snapshot(outside)
    result = push(jail, {b"d/f1": b"evil"})
    assert isinstance(result[0], PathRefused)
    assert "symbolic link" in str(result[0])
    assert snapshot(outside) == before
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_batch_refuses_what_is_in_the_way(jail: Jail) -> None:
    put(jail, b"file", b"f")
    os.mkfifo(jail.root / "fifo")
    fds = open_fds()
    result = push(jail, {b"file/x": b"1", b"fifo": b"2", b"fifo/x": b"3", b"ok": b"4"})
    assert "is not a directory" in str(result[0])
    assert "neither a regular file nor a directory" in str(result[1])
    assert "is not a directory" in str(result[2])
    assert result[3] is None
    assert open_fds() == fds
    assert_nothing_held(jail)  # (the host-made link and FIFO are no file of the peer)


def test_batch_into_a_missing_jail_root_is_refused(space: HostedSpace) -> None:
    bob = space.jail("bob", MIB)
    bob.root.rmdir()
    result = push(bob, {b"x": b"1"})
    assert isinstance(result[0], PathRefused)
    assert "missing" in str(result[0])
    assert bob.quota.reserved == 0


def test_deep_trees_in_one_batch(jail: Jail) -> None:
    """Deeper than the handles a batch keeps: switching between deep directories works."""
    deep = b"/".join(b"l%02d" % n for n in range(writes._HELD_LEVELS + 4))
    files = {
        deep + b"/a": b"a",
        deep + b"/b": b"b",  # the same deep directory: its handle is reused
        deep + b"/x/c": b"c",
        deep[:-4] + b"/y/d": b"d",  # a sibling branch, above the deepest level
        b"l00/top": b"e",
        deep + b"/x/e": b"f",
    }
    fds = open_fds()
    assert push(jail, files) == [None] * len(files)
    assert open_fds() == fds
    for path, data in files.items():
        assert (jail.root / os.fsdecode(path)).read_bytes() == data
    # A file in the way deep down fails that file only, and no handle is left open.
    put(jail, deep + b"/x/y", b"file")
    result = push(jail, {deep + b"/x/y/z/w": b"1", deep + b"/x/ok": b"2"})
    assert "is not a directory" in str(result[0])
    assert result[1] is None
    assert open_fds() == fds
    assert_consistent(jail)


def test_batch_directory_race_with_another_thread(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.mkdir

    def someone_else_first(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        real(path, mode, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "mkdir", someone_else_first)
    assert push(jail, {b"d/f": b"1"}) == [None]
    monkeypatch.undo()
    assert jail.quota.used == charge(1)  # the other thread paid for the directory
    assert jail.quota.reserved == 0


def test_batch_directory_error_fails_the_file(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_path: Any, _mode: int = 0o777, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", full)
    result = push(jail, {b"d/f": b"1"})
    monkeypatch.undo()
    assert isinstance(result[0], PeerDiskFull)
    assert_consistent(jail)


@pytest.mark.parametrize("umask", [0o077, None])
def test_modes_hold_whatever_the_umask(
    jail: Jail, monkeypatch: pytest.MonkeyPatch, umask: int | None
) -> None:
    """Temp files are made with their final mode; a umask that takes bits away is undone."""
    monkeypatch.setattr(disk, "umask", lambda: umask)
    old = os.umask(0o077)
    try:
        push(jail, {b"plain": b"p"})
        push(jail, {b"exec": b"e"}, mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE((jail.root / "plain").lstat().st_mode) == 0o644
    assert stat.S_IMODE((jail.root / "exec").lstat().st_mode) == 0o755


def test_umask_is_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    current = os.umask(0o022)
    os.umask(current)
    assert disk.umask.__wrapped__() == current

    def unreadable(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(disk, "open", unreadable, raising=False)
    assert disk.umask.__wrapped__() is None


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


# --- large files ----------------------------------------------------------------------------


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


# --- trash ----------------------------------------------------------------------------------


def test_delete_moves_files_and_trees_to_the_trash(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # one stamp for both deletes
    push(jail, {b"one.txt": b"1", b"tree/a/b.txt": b"b", b"tree/c.txt": b"c"})
    jail.make_dir(b"tree/empty")
    jail.delete(b"one.txt")
    jail.delete(b"tree")
    assert list(jail.list()) == []
    trashed = files_under(jail.trash_dir)
    assert sorted(name.split("/", 1)[1] for name in trashed) == [
        "one.txt",
        "tree/a/b.txt",
        "tree/c.txt",
    ]
    assert sorted(trashed.values()) == [b"1", b"b", b"c"]
    (stamp,) = {name.split("/", 1)[0] for name in trashed}
    assert trash._stamp_time(stamp.encode()) is not None
    assert any(d.endswith("tree/empty") for d in snapshot(jail.trash_dir))
    assert_consistent(jail)


def test_delete_refuses_missing_and_root(jail: Jail) -> None:
    with pytest.raises(FileNotFoundError):
        jail.delete(b"missing")
    with pytest.raises(PathRefused, match="empty"):
        jail.delete(b"")
    assert jail.root.is_dir()


def test_trash_collisions_get_suffixes(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # all in the same second
    for version in (b"1", b"2", b"3"):
        put(jail, b"a", version)
        jail.delete(b"a")
    put(jail, b"a/b", b"4")  # "a" is now a directory; in the trash it is a file
    jail.delete(b"a/b")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", frozen)
    assert files_under(jail.trash_dir) == {
        f"{stamp}/a": b"1",
        f"{stamp}~1/a": b"2",
        f"{stamp}~2/a": b"3",
        f"{stamp}~3/a/b": b"4",
    }
    assert_consistent(jail)
    monkeypatch.setattr(trash, "_MAX_COLLISIONS", 2)
    with pytest.raises(PathRefused, match="too many versions"):
        jail.delete(b"a")


def test_purge_leaves_foreign_things_alone(space: HostedSpace, jail: Jail) -> None:
    (jail.trash_dir / "not-a-stamp").mkdir()
    (jail.trash_dir / "20000101T000000Z").write_bytes(b"a file, not a stamp dir")
    assert space.purge(time.time() + 100 * DAY) == 0
    assert sorted(os.listdir(jail.trash_dir)) == ["20000101T000000Z", "not-a-stamp"]


def test_purge_goes_on_past_what_it_cannot_remove(
    space: HostedSpace, jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *_: frozen)  # one stamp for both deletes
    put(jail, b"a/x", b"1")
    put(jail, b"b/y", b"2")
    jail.delete(b"a")
    jail.delete(b"b")
    real = disk.remove_tree

    def stuck_on_a(path: bytes) -> int:
        if path.endswith(b"/a"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(disk, "remove_tree", stuck_on_a)
    assert space.purge(time.time() + 31 * DAY) == DIR_CHARGE + charge(1)  # b/ and b/y
    assert [name.split("/", 1)[1] for name in files_under(jail.trash_dir)] == ["a/x"]
    assert_consistent(jail)


def test_purge_of_an_unknown_trash(space: HostedSpace, jail: Jail) -> None:
    jail.trash_dir.rmdir()
    assert space.purge() == 0


# --- listing and hashing --------------------------------------------------------------------


def test_list_is_in_canonical_order(jail: Jail) -> None:
    names = [b"a.txt", b"a/b", b"a-b", b"a/c.txt", b"b", b"\xff", b"A", b"a b/x", b"sub/\n"]
    push(jail, {name: name for name in names})
    jail.make_dir(b"a/empty", MTIME)
    os.mkdir(jail.root / ".mynas-host-made")  # never shown
    entries = list(jail.list())
    keys = [entry.key for entry in entries]
    assert keys == sorted(keys)
    assert {e.path for e in entries if e.kind is tree.Kind.FILE} == set(names)
    sub = list(jail.list(b"a"))
    assert [e.path for e in sub] == [b"a/b", b"a/c.txt", b"a/empty"]
    assert (sub[2].kind, sub[2].mtime_ns) == (tree.Kind.DIR, MTIME)
    assert jail.stat(b"a/b") == tree.Entry(b"a/b", tree.Kind.FILE, 3, MTIME, 0o644)
    assert jail.stat(b"a/empty").kind is tree.Kind.DIR
    lazy = jail.list(b"a.txt")  # checked on the first next(), in the caller's worker thread
    with pytest.raises(PathRefused, match="not a directory"):
        next(lazy)
    with pytest.raises(FileNotFoundError):
        list(jail.list(b"missing"))


def test_list_survives_a_directory_vanishing(jail: Jail) -> None:
    push(jail, {b"a/x": b"1", b"b/y": b"2"})
    entries = jail.list()
    first = next(entries)
    assert first.path == b"a"
    jail.delete(b"a")  # deleted by another thread while the listing runs
    assert [e.path for e in entries] == [b"b", b"b/y"]


def test_hash_matches_the_tree_hash(jail: Jail, tmp_path: Path) -> None:
    content = os.urandom(2 * MIB + 7)
    put(jail, b"f", content)
    local = tmp_path / "local"
    local.write_bytes(content)
    assert jail.hash_file(b"f") == tree.hash_file(os.fsencode(local))
    fd = jail.open_read(b"f")
    try:
        assert os.read(fd, 10) == content[:10]
    finally:
        os.close(fd)


def test_set_mtime_and_make_dir(jail: Jail) -> None:
    put(jail, b"f", b"1")
    jail.set_mtime(b"f", 42)
    assert (jail.root / "f").lstat().st_mtime_ns == 42
    jail.make_dir(b"x/y/z", MTIME)
    assert (jail.root / "x" / "y" / "z").lstat().st_mtime_ns == MTIME
    jail.make_dir(b"x/y/z")  # already there: fine
    jail.set_mtime(b"x", 7)
    assert (jail.root / "x").lstat().st_mtime_ns == 7
    with pytest.raises(PathRefused, match="file is in the way"):
        jail.make_dir(b"f")
    with pytest.raises(FileNotFoundError):
        jail.set_mtime(b"missing", 1)
    assert jail.quota.used == charge(1) + 3 * DIR_CHARGE
    assert_consistent(jail)


def test_make_dir_race_with_another_thread(jail: Jail, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def someone_else_first(path: Any, mode: int = 0o777) -> None:
        real(path, mode)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "mkdir", someone_else_first)
    jail.make_dir(b"d")
    monkeypatch.undo()
    assert (jail.root / "d").is_dir()
    assert jail.quota.used == 0  # the other thread paid for it
    assert jail.quota.reserved == 0


def test_make_dir_error_releases_the_reservation(
    jail: Jail, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_path: Any, _mode: int = 0o777) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mkdir", full)
    with pytest.raises(PeerDiskFull):
        jail.make_dir(b"d")
    assert jail.quota.reserved == 0


# --- the hosted space -----------------------------------------------------------------------


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


def test_deepest_accepted_tree_is_walked(space: HostedSpace, jail: Jail) -> None:
    deep = b"/".join([b"d"] * (paths.MAX_DEPTH - 1))
    put(jail, deep + b"/f", b"bottom")
    assert jail.stat(deep + b"/f").size == 6
    assert len(list(jail.list())) == paths.MAX_DEPTH
    jail.delete(b"d")
    assert_consistent(jail)
    assert space.rescan("alice") == jail.quota.used
    space.purge(time.time() + 31 * DAY)
    assert jail.quota.used == 0
    assert_consistent(jail)


def test_cleanup_helpers_never_raise_on_the_way_out(tmp_path: Path) -> None:
    disk.unlink_quietly(os.fsencode(tmp_path / "missing"))
    disk.unlink_quietly(os.fsencode(tmp_path))  # a directory: logged, not raised
    assert tmp_path.is_dir()
    disk.ignore_vanished(b"gone", FileNotFoundError())
    with pytest.raises(PermissionError):
        disk.ignore_vanished(b"locked", PermissionError())


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


def test_extreme_modification_times_are_stored(jail: Jail) -> None:
    for mtime in (0, -(1 << 63), (1 << 63) - 1):
        assert push(jail, {b"t": b"x"}, mtime_ns=mtime) == [None]
    jail.make_dir(b"d", -(1 << 63))
