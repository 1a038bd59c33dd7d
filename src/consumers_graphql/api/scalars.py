"""Custom scalars: RFC 3339 timestamps in UTC with a ``Z``."""

from __future__ import annotations

import strawberry
from strawberry.types.scalar import ScalarDefinition

from consumers_graphql.timestamps import format_datetime, parse_datetime

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
