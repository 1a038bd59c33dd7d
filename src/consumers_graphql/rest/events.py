"""GET /api/v1/events: the change events, polled with `after` (a BFF's feed), in the style of
the reference's lists: the same `first`, cursors, page shape and error texts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from pydantic import BaseModel, Field

from consumers_graphql.errors import BadUserInput
from consumers_graphql.rest.models import PageInfoOut
from consumers_graphql.rest.routes import First, JSONBody, api_router
from consumers_graphql.store.db import Reader
from consumers_graphql.store.events import EVENT_TYPES, EventPage, EventType, page_of_events
from consumers_graphql.timestamps import format_datetime
from consumers_graphql.web.dependencies import request_reader

PREFIX = "/api/v1/events"

router = api_router(PREFIX, "events")


class EventOut(BaseModel):
    id: str = Field(description="`evt_…`", examples=["evt_01JD8X6Q1R4B3N2M5K7P9S0T1V"])
    type: EventType
    occurredAt: datetime
    subjectId: str = Field(description="The consumer, order or audience that changed.")
    data: dict[str, Any] = Field(description=(
        "The subject as this API returns it after the change (before it, for `*_DELETED`); "
        "member events add `consumerIds`."))


class EventsListOut(BaseModel):
    data: list[EventOut]
    pageInfo: PageInfoOut


def _types(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    wanted = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = sorted(set(wanted) - set(EVENT_TYPES))
    if unknown or not wanted:
        raise BadUserInput(
            f"`types` takes a comma-separated list of {', '.join(EVENT_TYPES)}; "
            f"unknown: {', '.join(unknown) or '(none given)'}.", field=["types"])
    return wanted


def _event_json(page: EventPage) -> list[dict[str, Any]]:
    return [{"id": record.id, "type": record.type, "occurredAt": format_datetime(
        record.occurred_at), "subjectId": record.subject_id, "data": record.data}
        for record in page.items]


@router.get("", response_model=EventsListOut, summary="List change events")
async def list_events(
    request: Request,
    reader: Annotated[Reader, Depends(request_reader)],
    first: First = None,
    after: Annotated[str | None, Query(
        description="A cursor (`pageInfo.endCursor`) or an event id (`evt_…`): the events "
        "committed after it. Refused (400) once older than the event retention.")] = None,
    types: Annotated[str | None, Query(
        description=f"Only these types, comma-separated: {', '.join(EVENT_TYPES)}",
        json_schema_extra={"pattern": f"^({'|'.join(EVENT_TYPES)})(,({'|'.join(EVENT_TYPES)}))*$"},
    )] = None,
    subjectId: Annotated[str | None, Query(
        description="Only the events of this consumer, order or audience")] = None,
) -> Response:
    """Change events in commit order, oldest first. Poll with `after` set to the last
    `pageInfo.endCursor` (kept when a page is empty): nothing is missed or repeated."""
    if len(request.query_params.getlist("types")) > 1:
        # (`types=A&types=B`, as some clients send a list, would otherwise keep B alone.)
        raise BadUserInput("`types` was given more than once: send one comma-separated list.",
                           field=["types"])
    page = await page_of_events(request.app.state.database, reader, first=first, after=after,
                                types=_types(types), subject_id=subjectId)
    return JSONBody({"data": _event_json(page),
                     "pageInfo": {"startCursor": page.start_cursor,
                                  "endCursor": page.end_cursor}})
