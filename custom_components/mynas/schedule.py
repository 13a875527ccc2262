"""When a folder's next sync to a peer is due: daily at a time, or every N hours.

Pure functions of the folder's schedule and the pair's history, so the rules are tested
without a clock. Times are aware datetimes; daily times are in Home Assistant's time zone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
import random

from .const import RETRY_FIRST, RETRY_MAX, SCHEDULE_DAILY


@dataclass(frozen=True, slots=True)
class Schedule:
    """A folder's schedule."""

    mode: str
    at: time | None = None
    every: timedelta | None = None


def parse_time(text: str) -> time:
    """Parse ``HH:MM`` or ``HH:MM:SS`` (ValueError otherwise)."""
    return time.fromisoformat(text)


def night_time(rng: random.Random | None = None) -> str:
    """A default daily time during the night, spread so friends' nodes don't all sync at once."""
    minute = (rng or random.Random()).randrange(2 * 60, 5 * 60)  # noqa: S311 - not a secret
    return f"{minute // 60:02d}:{minute % 60:02d}:00"


def retry_delay(failures: int) -> timedelta:
    """Back off after consecutive failures: 5 min, 10, 20, ... at most RETRY_MAX."""
    if failures <= 0:
        return timedelta(0)
    # Cap the exponent: past a few doublings RETRY_MAX wins anyway.
    return min(RETRY_FIRST * (1 << min(failures - 1, 16)), RETRY_MAX)


def next_daily(after: datetime, at: time) -> datetime:
    """The first moment at ``at`` (in ``after``'s time zone) strictly after ``after``."""
    candidate = after.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=0)
    if candidate <= after:
        candidate = (candidate + timedelta(days=1)).replace(
            hour=at.hour, minute=at.minute, second=at.second
        )
    return candidate


def next_run(
    schedule: Schedule,
    *,
    last_attempt: datetime | None,
    failures: int,
) -> datetime | None:
    """When the pair should run next; None means "as soon as possible" (never ran yet).

    After a failure the retry comes sooner than the regular time, with backoff; once it
    succeeds, the schedule resumes.
    """
    if last_attempt is None:
        return None
    if schedule.mode == SCHEDULE_DAILY:
        assert schedule.at is not None
        regular = next_daily(last_attempt, schedule.at)
    else:
        assert schedule.every is not None
        regular = last_attempt + schedule.every
    if failures:
        return min(regular, last_attempt + retry_delay(failures))
    return regular
