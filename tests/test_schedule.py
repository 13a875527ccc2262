"""The schedule's pure rules: daily times, intervals, retries with backoff."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
import random
from zoneinfo import ZoneInfo

import pytest

from custom_components.mynas.const import RETRY_FIRST, RETRY_MAX
from custom_components.mynas.schedule import (
    Schedule,
    next_daily,
    next_run,
    night_time,
    parse_time,
    retry_delay,
)

PARIS = ZoneInfo("Europe/Paris")
DAILY_3AM = Schedule("daily", at=time(3, 0))
EVERY_6H = Schedule("interval", every=timedelta(hours=6))


def test_parse_time() -> None:
    assert parse_time("03:15") == time(3, 15)
    assert parse_time("23:59:30") == time(23, 59, 30)
    with pytest.raises(ValueError):
        parse_time("25:00")
    with pytest.raises(ValueError):
        parse_time("soon")


def test_night_time_is_at_night_and_spread() -> None:
    rng = random.Random(7)
    times = {night_time(rng) for _ in range(200)}
    assert len(times) > 50  # friends' nodes don't all start at the same minute
    for text in times:
        at = parse_time(text)
        assert time(2, 0) <= at < time(5, 0)
    assert parse_time(night_time())  # the default generator works too


def utc(year: int, month: int, day: int, hour: int, minute: int, *rest: int) -> datetime:
    """A UTC instant from its calendar fields (seconds and microseconds optional)."""
    second, micro = (*rest, 0, 0)[:2]
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("after", "at", "expected"),
    [
        # Later the same day.
        (utc(2026, 5, 4, 1, 0), time(3, 0), utc(2026, 5, 4, 3, 0)),
        # Already past today: tomorrow.
        (utc(2026, 5, 4, 4, 0), time(3, 0), utc(2026, 5, 5, 3, 0)),
        # Strictly after: exactly at the time means tomorrow.
        (utc(2026, 5, 4, 3, 0), time(3, 0), utc(2026, 5, 5, 3, 0)),
        # Across midnight, and across the end of a month and of a year.
        (utc(2026, 5, 31, 23, 59), time(0, 30), utc(2026, 6, 1, 0, 30)),
        (utc(2026, 12, 31, 23, 30), time(0, 0), utc(2027, 1, 1, 0, 0)),
        # Seconds and microseconds of "after" don't leak into the result.
        (utc(2026, 5, 4, 2, 59, 59, 999_999), time(3, 0), utc(2026, 5, 4, 3, 0)),
    ],
)
def test_next_daily(after: datetime, at: time, expected: datetime) -> None:
    assert next_daily(after, at) == expected


def test_next_daily_keeps_the_wall_clock_across_dst() -> None:
    # Spring forward in Paris (29 March 2026, 02:00 -> 03:00): 03:00 stays 03:00 local,
    # the day is 23 hours long.
    after = datetime(2026, 3, 28, 3, 30, tzinfo=PARIS)
    due = next_daily(after, time(3, 0))
    assert (due.hour, due.minute, due.day) == (3, 0, 29)
    assert due.utcoffset() == timedelta(hours=2)
    assert due.astimezone(UTC) - after.astimezone(UTC) == timedelta(hours=22, minutes=30)
    # Fall back (25 October 2026): the day is 25 hours long, 03:00 is still 03:00.
    after = datetime(2026, 10, 24, 3, 30, tzinfo=PARIS)
    due = next_daily(after, time(3, 0))
    assert (due.hour, due.day) == (3, 25)
    assert due.utcoffset() == timedelta(hours=1)
    assert due.astimezone(UTC) - after.astimezone(UTC) == timedelta(hours=24, minutes=30)


def test_next_daily_in_the_dst_gap_still_runs_that_night() -> None:
    # 02:30 does not exist on 29 March in Paris: the run comes at the first instant after
    # the gap's start (an hour later in wall-clock terms), not a day late.
    after = datetime(2026, 3, 28, 12, 0, tzinfo=PARIS)
    due = next_daily(after, time(2, 30))
    assert due.astimezone(UTC) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    # And the following day is back to 02:30 local.
    nxt = next_daily(due.astimezone(PARIS), time(2, 30))
    assert nxt.astimezone(UTC) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)


def test_retry_delay_grows_and_is_capped() -> None:
    assert retry_delay(0) == timedelta(0)
    assert retry_delay(-3) == timedelta(0)
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [
        RETRY_FIRST,
        2 * RETRY_FIRST,
        4 * RETRY_FIRST,
        8 * RETRY_FIRST,
    ]
    assert timedelta(minutes=5) == RETRY_FIRST
    growing = [retry_delay(n) for n in range(1, 30)]
    assert growing == sorted(growing)
    assert max(growing) == RETRY_MAX == timedelta(hours=6)
    assert retry_delay(10_000) == RETRY_MAX  # no overflow after months of failures


def test_next_run_never_ran_means_now() -> None:
    assert next_run(DAILY_3AM, last_attempt=None, failures=0) is None
    assert next_run(EVERY_6H, last_attempt=None, failures=3) is None


def test_next_run_regular() -> None:
    last = datetime(2026, 5, 4, 3, 0, 12, tzinfo=UTC)
    assert next_run(DAILY_3AM, last_attempt=last, failures=0) == datetime(
        2026, 5, 5, 3, 0, tzinfo=UTC
    )
    assert next_run(EVERY_6H, last_attempt=last, failures=0) == last + timedelta(hours=6)


def test_next_run_retries_sooner_after_failures() -> None:
    last = datetime(2026, 5, 4, 3, 0, tzinfo=UTC)
    assert next_run(DAILY_3AM, last_attempt=last, failures=1) == last + timedelta(minutes=5)
    assert next_run(DAILY_3AM, last_attempt=last, failures=2) == last + timedelta(minutes=10)
    # Backoff never pushes a retry past the regular time.
    assert next_run(EVERY_6H, last_attempt=last, failures=20) == last + timedelta(hours=6)
    late = datetime(2026, 5, 4, 23, 0, tzinfo=UTC)
    assert next_run(DAILY_3AM, last_attempt=late, failures=20) == datetime(
        2026, 5, 5, 3, 0, tzinfo=UTC
    )
