"""Byte budgets: nested ceilings with waiting instead of failing."""

from __future__ import annotations

import asyncio

import pytest

from custom_components.mynas.engine.host.budget import ByteBudget


async def test_take_and_give_within_the_limit() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(60)
    assert budget.try_take(40)
    assert not budget.try_take(1)
    assert budget.used == 100
    budget.give(100)
    assert budget.used == 0


async def test_one_item_larger_than_the_limit_fits_when_nothing_is_held() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(500)  # must not wait forever
    assert not budget.try_take(1)
    budget.give(500)
    await asyncio.wait_for(budget.take(1), 1)


async def test_take_waits_until_bytes_are_given_back() -> None:
    budget = ByteBudget(100)
    await budget.take(80)
    waiter = asyncio.create_task(budget.take(50))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    budget.give(20)  # 60 + 50 > 100: still waiting
    await asyncio.sleep(0.01)
    assert not waiter.done()
    budget.give(20)
    await asyncio.wait_for(waiter, 1)
    assert budget.used == 90


async def test_levels_are_taken_together_or_not_at_all() -> None:
    peer = ByteBudget(100)
    one, two = ByteBudget(80, peer), ByteBudget(80, peer)
    assert one.try_take(70)
    assert not two.try_take(40)  # fits its own level, not the peer's
    assert two.used == 0  # nothing kept while refused
    assert peer.used == 70
    waiter = asyncio.create_task(two.take(40))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    one.give(30)  # the peer's level has room again
    await asyncio.wait_for(waiter, 1)
    assert (one.used, two.used, peer.used) == (40, 40, 80)
    # A session's own ceiling holds even when the peer has room.
    blocked = asyncio.create_task(two.take(50))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    two.give(40)
    await asyncio.wait_for(blocked, 1)
    assert (one.used, two.used, peer.used) == (40, 50, 90)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    budget = ByteBudget(10)
    await budget.take(10)
    waiter = asyncio.create_task(budget.take(5))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget._waiters == []
    budget.give(10)
    assert budget.used == 0


async def test_close_gives_everything_back_to_the_parent() -> None:
    peer = ByteBudget(100)
    session = ByteBudget(50, peer)
    await session.take(30)
    session.close()
    assert (session.used, peer.used) == (0, 0)
    session.close()  # nothing left: a no-op


def test_bad_amounts_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)
    budget = ByteBudget(10)
    with pytest.raises(ValueError, match="negative"):
        budget.try_take(-1)
    with pytest.raises(ValueError, match="negative"):
        budget.give(-1)
    with pytest.raises(ValueError, match="not taken"):
        budget.give(1)
