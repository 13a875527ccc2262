"""The quota (quota.py; docs/architecture.md, invariant 3): reserved before bytes reach the disk.

The "server" here is the test itself, which reserves each file's charge before
``write_batch`` as the real server does (``jail_support.push``).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import random
import threading
import time

import pytest

from custom_components.mynas.engine.errors import MyNasError, QuotaExceeded
from custom_components.mynas.engine.host.jail import Jail
from custom_components.mynas.engine.host.quota import BLOCK, DIR_CHARGE, Quota, charge
from custom_components.mynas.engine.host.space import HostedSpace

from .jail_support import DAY, MTIME, assert_consistent, files_under, push, put, snapshot

# --- charges --------------------------------------------------------------------------------


def run_at_once(worker: Callable[[int], None], count: int) -> None:
    """``worker(0)`` to ``worker(count - 1)``, each in its own thread, all joined."""
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_charge_counts_whole_blocks() -> None:
    assert [charge(n) for n in (0, 1, 4095, 4096, 4097)] == [4096, 4096, 4096, 4096, 8192]
    assert DIR_CHARGE == BLOCK == 4096
    with pytest.raises(ValueError, match="negative"):
        charge(-1)


# --- reservations ---------------------------------------------------------------------------


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

    run_at_once(worker, 8)
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

    run_at_once(worker, 4)
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
