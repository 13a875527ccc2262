"""The mass-change guard: a push that would replace or delete too much waits, sending nothing.

A real host on 127.0.0.1: the host's files (and its trash) are looked at directly, before
and after a held run, then after the run the user allowed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from custom_components.mynas.engine.errors import MassChangeHeld
from custom_components.mynas.engine.owner import feed

from ..replica_support import (
    FOLDER,
    MTIME,
    Env,
    snapshot,
    trash_files,
    write,
)


def _fill(env: Env, count: int) -> None:
    for n in range(count):
        write(env.src / f"photos/{n:03}.jpg", b"photo %d" % n)


def _rewrite(env: Env, numbers: range, round_: int = 1) -> None:
    """What ransomware does: the same names, other contents."""
    for n in numbers:
        data = b"encrypted by them %d %d" % (round_, n)
        write(env.src / f"photos/{n:03}.jpg", data, mtime_ns=MTIME + round_)


async def test_a_mass_change_waits_until_sent_and_sends_nothing_before(env: Env) -> None:
    _fill(env, 40)
    first = await env.push(hold_over=30)
    assert first.files_sent == 40  # the first run replaces nothing: never held
    before = snapshot(env.replica)

    _rewrite(env, range(12))  # 12 of 40 = 30 %: not more than 30 %
    for n in (38, 39):
        (env.src / f"photos/{n:03}.jpg").unlink()  # 14 of 40 = 35 %
    with pytest.raises(MassChangeHeld) as held:
        await env.push(hold_over=30)
    err = held.value
    assert (err.replaced, err.deleted, err.total, err.percent) == (12, 2, 40, 30)
    assert err.examples == tuple(f"photos/{n:03}.jpg" for n in range(5))
    assert "35 %" in str(err)
    assert "nothing was sent" in str(err)
    # Nothing reached the host: its files and its trash are as they were.
    assert snapshot(env.replica) == before
    assert trash_files(env.storage) == set()
    # And the index still says what the host holds: the next run plans the same.
    with pytest.raises(MassChangeHeld):
        await env.push(hold_over=30)

    sent = await env.push()  # "Send it": the guard lifted for one run
    assert (sent.files_sent, sent.files_deleted) == (12, 2)
    env.check_replica()
    assert len(trash_files(env.storage)) == 14
    again = await env.push(hold_over=30)  # done: nothing more to hold
    assert again.files_sent == again.files_deleted == 0


async def test_below_the_threshold_nothing_is_held(env: Env) -> None:
    _fill(env, 40)
    await env.push(hold_over=30)
    _rewrite(env, range(12))  # exactly 30 %
    for n in range(40, 100):
        write(env.src / f"photos/{n:03}.jpg", b"new %d" % n)  # new files never count
    result = await env.push(hold_over=30)
    assert result.files_sent == 72
    env.check_replica()


async def test_small_folders_and_a_zero_threshold_are_never_held(env: Env) -> None:
    _fill(env, feed.GUARD_MIN_FILES - 1)
    await env.push(hold_over=30)
    _rewrite(env, range(feed.GUARD_MIN_FILES - 1))  # all of them, but a small folder
    assert (await env.push(hold_over=30)).files_sent == feed.GUARD_MIN_FILES - 1
    for n in range(feed.GUARD_MIN_FILES - 1, 40):
        write(env.src / f"photos/{n:03}.jpg", b"photo %d" % n)
    await env.push(hold_over=30)
    _rewrite(env, range(40), 2)
    assert (await env.push(hold_over=0)).files_sent == 40  # 0: never hold
    env.check_replica()


async def test_a_plan_too_long_to_keep_is_scanned_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed, "PLAN_KEPT", 5)
    _fill(env, 40)
    await env.push(hold_over=30)
    _rewrite(env, range(10))
    for n in range(40, 60):
        write(env.src / f"photos/{n:03}.jpg", b"new %d" % n)
    result = await env.push(hold_over=30)
    assert result.files_sent == 30
    assert result.files_total == 60  # the second scan's figures, not both scans'
    env.check_replica()


async def test_an_encrypted_replica_is_guarded_too(env: Env) -> None:
    _fill(env, 30)
    await env.push(hold_over=30, encrypted=True)
    before = snapshot(env.jail)
    _rewrite(env, range(30))
    with pytest.raises(MassChangeHeld) as held:
        await env.push(hold_over=30, encrypted=True)
    assert held.value.replaced == 30
    assert snapshot(env.jail) == before
    assert (await env.push(encrypted=True)).files_sent == 30


async def test_files_adopted_without_their_mtime_are_no_mass_change(env: Env) -> None:
    """An index rebuilt from an older host knows no mtimes: resending those is no sign."""
    _fill(env, 30)
    await env.push(hold_over=30)
    with sqlite3.connect(env.work.parent / "index.sqlite") as conn:
        conn.execute("UPDATE files SET mtime_ns = -1 WHERE substr(key, -1) <> x'2f'")
    result = await env.push(hold_over=30)
    assert result.files_sent == 30
    env.check_replica()


async def test_a_plan_stops_when_the_run_does(env: Env) -> None:
    _fill(env, 30)
    await env.push(hold_over=30)
    _rewrite(env, range(30))
    feeder = feed.Feeder(
        asyncio.get_running_loop(), os.fsencode(env.src), env.index, FOLDER, "host", ()
    )
    feeder.stop()
    planned = await asyncio.get_running_loop().run_in_executor(
        None, feeder._plan, feed.MassChangeGuard(30)
    )
    assert planned == []  # not held (nothing will be sent), and not scanned to the end
