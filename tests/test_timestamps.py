"""Timestamps on the wire: RFC 3339 in UTC with `Z`, microseconds only when present, and
read back to the same instant (what a client passes as `createdAfter`)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from consumers_graphql.timestamps import format_datetime, parse_datetime


@pytest.mark.parametrize(("value", "text"), [
    (datetime(2024, 11, 1, 10, 0, tzinfo=UTC), "2024-11-01T10:00:00Z"),
    (datetime(2024, 11, 1, 10, 0, 0, 120, tzinfo=UTC), "2024-11-01T10:00:00.000120Z"),
    (datetime(2024, 11, 1, 12, 30, tzinfo=timezone(timedelta(hours=2, minutes=30))),
     "2024-11-01T10:00:00Z"),
    (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
    (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.999999Z"),
])
def test_format(value: datetime, text: str) -> None:
    assert format_datetime(value) == text


def test_format_is_isoformat_in_utc_with_z_and_reads_back() -> None:
    rng = random.Random(7)
    start = datetime(1, 1, 2, tzinfo=UTC)
    span = (datetime(9999, 12, 30, tzinfo=UTC) - start) // timedelta(microseconds=1)
    for n in range(20_000):
        value = start + timedelta(microseconds=rng.randrange(span))
        if n % 3 == 0:
            value = value.replace(microsecond=0)
        if n % 5 == 0:
            value = value.astimezone(timezone(timedelta(minutes=rng.randrange(-720, 840))))
        text = format_datetime(value)
        assert text == value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        assert parse_datetime(text) == value


@pytest.mark.parametrize("text", ["0001-01-01T00:01:00+01:00", "9999-12-31T23:00:00-02:00"])
def test_an_instant_outside_the_years_1_to_9999_in_utc_is_refused_as_a_bad_value(
    text: str,
) -> None:
    # schemathesis found the first as a REST `createdBefore`: a 500, not a 400
    with pytest.raises(ValueError, match="out of range once in UTC"):
        parse_datetime(text)
