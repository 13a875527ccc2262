"""How times, sizes and lists read in the texts people see."""

from __future__ import annotations

from datetime import UTC, datetime

from homeassistant.core import HomeAssistant
import pytest

from custom_components.mynas import texts


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (5_200_000, "5.2 MB"),
        (123_456_789, "123 MB"),
        (1_000_000_000, "1.0 GB"),
        (2_500_000_000_000, "2.5 TB"),
        (10**18, "1000 PB"),
    ],
)
def test_size(count: int, text: str) -> None:
    assert texts.size(count) == text


async def test_since_is_local_time(hass: HomeAssistant) -> None:
    await hass.config.async_set_time_zone("Europe/Paris")
    assert texts.since(datetime(2026, 5, 4, 8, 35, tzinfo=UTC)) == "2026-05-04 10:35"


def test_names() -> None:
    assert texts.names(["photos", "Documents", "Music"]) == "Documents, Music, photos"
    assert texts.names([]) == texts.NONE
