"""The Consumers REST API of the reference, under /api/v1/consumers: a thin face over the
same repository and services as GraphQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.engine import Row

from consumers_graphql.errors import BadUserInput, DomainError, ErrorCode
from consumers_graphql.http_auth import require_api_key
from consumers_graphql.ids import IdKind, kind_of
from consumers_graphql.pagination import MAX_PAGE_SIZE, Page, page_request
from consumers_graphql.repository import (
    AUDIENCE_SORT,
    ORDER_SORT,
    ConsumerFilter,
    ConsumerSortField,
    Repository,
    consumer_sort,
    search_term,
)
from consumers_graphql.rest.models import ConsumersListOut, ConsumerWithRelationsOut, ErrorOut
from consumers_graphql.rest.shapes import audience_json, consumer_json, order_json
from consumers_graphql.timestamps import parse_datetime

RELATIONS = ("audiences", "orders")
SortBy = Literal["createdAt", "email", "fullName", "lastOrderAt", "totalOrderValue", "totalOrders"]


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Validation failed"},
    401: {"model": ErrorOut, "description": "Authentication required"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "Consumer not found"},
}

router = APIRouter(
    prefix="/api/v1/consumers",
    tags=["consumers"],
    responses=ERRORS,
    dependencies=[Depends(require_api_key)],
)


async def _repository(request: Request) -> AsyncIterator[Repository]:
    reader = request.app.state.database.reader()
    try:
        yield Repository(reader)
    finally:
        await reader.close()


Repo = Annotated[Repository, Depends(_repository)]
First = Annotated[
    int | None, Query(description=f"Number of items per page (default 20, max {MAX_PAGE_SIZE})")
]
Include = Annotated[
    str | None, Query(description="Relations to include, comma-separated: audiences, orders")
]


def _includes(raw: str | None) -> set[str]:
    if raw is None:
        return set()
    wanted = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = sorted(wanted - set(RELATIONS))
    if unknown:
        raise BadUserInput(
            f"`include` takes a comma-separated list of {', '.join(RELATIONS)}; "
            f"unknown: {', '.join(unknown)}.",
            field=["include"],
        )
    return wanted


def _timestamp(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_datetime(value, assume_utc=True)
    except ValueError as error:
        raise BadUserInput(f"`{name}`: {error}", field=[name]) from None


async def _with_relations(
    repository: Repository, rows: Sequence[Row[Any]], include: set[str]
) -> list[dict[str, Any]]:
    consumers = [consumer_json(row) for row in rows]
    ids = [row.id for row in rows]
    if ids and "audiences" in include:
        pages = await repository.audience_pages_by_consumer_ids(
            ids, page_request(AUDIENCE_SORT, first=MAX_PAGE_SIZE)
        )
        for consumer, page in zip(consumers, pages, strict=True):
            consumer["audiences"] = [audience_json(row) for row in page.items]
    if ids and "orders" in include:
        pages = await repository.order_pages_by_consumer_ids(
            ids, page_request(ORDER_SORT, first=MAX_PAGE_SIZE)
        )
        for consumer, page in zip(consumers, pages, strict=True):
            consumer["orders"] = [order_json(row) for row in page.items]
    return consumers


async def _list_body(
    repository: Repository, page: Page[Row[Any]], include: set[str]
) -> dict[str, Any]:
    return {
        "data": await _with_relations(repository, page.items, include),
        "pageInfo": {"startCursor": page.start_cursor, "endCursor": page.end_cursor},
    }


@router.get("", response_model=ConsumersListOut, summary="List consumers")
async def list_consumers(
    repository: Repo,
    first: First = None,
    after: Annotated[str | None, Query(description="Cursor for forward pagination")] = None,
    before: Annotated[str | None, Query(description="Cursor for backward pagination")] = None,
    last: Annotated[int | None, Query(description="Items for backward pagination")] = None,
    search: Annotated[
        str | None, Query(description="Search by email, phone, or name (min 2 chars)")
    ] = None,
    sortBy: SortBy = "createdAt",
    sortDir: Literal["asc", "desc"] = "desc",
    createdAfter: Annotated[str | None, Query(description="Created strictly after")] = None,
    createdBefore: Annotated[str | None, Query(description="Created strictly before")] = None,
    audienceId: Annotated[str | None, Query(description="Members of this audience only")] = None,
    include: Include = None,
) -> Response:
    sort = consumer_sort(ConsumerSortField(sortBy), descending=sortDir == "desc")
    request = page_request(sort, first=first, after=after, last=last, before=before)
    filters = ConsumerFilter(
        search=search,
        created_after=_timestamp(createdAfter, "createdAfter"),
        created_before=_timestamp(createdBefore, "createdBefore"),
        audience_id=audienceId,
    )
    relations = _includes(include)
    page = await repository.consumer_page(filters, sort, request)
    return JSONBody(await _list_body(repository, page, relations))


@router.get("/search", response_model=ConsumersListOut, summary="Search consumers")
async def search_consumers(
    repository: Repo,
    q: Annotated[str | None, Query(description="Search query (min 2 chars)")] = None,
    email: Annotated[str | None, Query(description="Exact email match (case-insensitive)")] = None,
    phone: Annotated[str | None, Query(description="Exact phone match (as E.164)")] = None,
    externalId: Annotated[str | None, Query(description="Exact external ID match")] = None,
    first: First = None,
    after: Annotated[str | None, Query(description="Cursor for the next page")] = None,
    include: Include = None,
) -> Response:
    if q is None and email is None and phone is None and externalId is None:
        raise BadUserInput("Give at least one of q, email, phone or externalId.", field=["q"])
    if q is not None:
        search_term(q, "q")
    sort = consumer_sort()
    request = page_request(sort, first=first, after=after)
    filters = ConsumerFilter(search=q, email=email, phone=phone, external_id=externalId)
    relations = _includes(include)
    page = await repository.consumer_page(filters, sort, request)
    return JSONBody(await _list_body(repository, page, relations))


@router.get(
    "/{consumer_id}", response_model=ConsumerWithRelationsOut, responses=NOT_FOUND,
    summary="Get a consumer",
)
async def get_consumer(
    repository: Repo,
    consumer_id: str,
    include: Include = None,
) -> Response:
    relations = _includes(include)
    row = None
    if kind_of(consumer_id) is IdKind.CONSUMER:
        (row,) = await repository.consumers_by_ids([consumer_id])
    if row is None:
        raise DomainError("Consumer not found", field=["id"], code=ErrorCode.NOT_FOUND)
    (body,) = await _with_relations(repository, [row], relations)
    return JSONBody(body)
