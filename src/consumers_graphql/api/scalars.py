"""Custom scalars: RFC 3339 timestamps in UTC with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime

import strawberry
from strawberry.types.scalar import ScalarDefinition


def format_datetime(value: datetime) -> str:
    """``2024-11-01T10:00:00Z``; microseconds appear when the stored value has them."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def parse_datetime(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("DateTime must be a string in RFC 3339 form, e.g. 2024-11-01T10:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an RFC 3339 timestamp, e.g. 2024-11-01T10:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone; add Z for UTC or an offset such as +02:00")
    return parsed.astimezone(UTC)


DateTime: ScalarDefinition = strawberry.scalar(
    name="DateTime",
    description=(
        "An instant as an RFC 3339 string in UTC, e.g. `2024-11-01T10:00:00Z`, with "
        "microseconds when stored with them. Input accepts any offset."
    ),
    specified_by_url="https://datatracker.ietf.org/doc/html/rfc3339",
    serialize=format_datetime,
    parse_value=parse_datetime,
)
