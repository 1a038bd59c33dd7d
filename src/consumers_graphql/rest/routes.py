"""The Consumers REST API of the reference, under /api/v1/consumers: a thin face over the
same repository and services as GraphQL.

Order of answers: no usable key (401), key without the scope (403: `read` for GET, `write`
otherwise), both before a byte of the body is read (rest.body); then a body over its limit
(413), a malformed request (400), and the use-case's own refusals (400/404)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from sqlalchemy.engine import Row
from starlette.convertors import StringConvertor, register_url_convertor

from consumers_graphql.domain.common import BatchResult
from consumers_graphql.domain.consumers import (
    ConsumerChange,
    ConsumerFields,
    ConsumerService,
    ConsumerUpsert,
)
from consumers_graphql.domain.shapes import audience_json, consumer_json, order_json
from consumers_graphql.errors import BadUserInput, DomainError, DomainErrors, ErrorCode
from consumers_graphql.ids import IdKind, kind_of
from consumers_graphql.rest.body import RestRoute, restore_refused_metadata
from consumers_graphql.rest.models import (
    UNTRIMMED,
    BatchCreateConsumersRequest,
    BatchUpdateConsumersRequest,
    BatchUpsertConsumersRequest,
    ConsumerOut,
    ConsumersListOut,
    ConsumerWithRelationsOut,
    CreateConsumerRequest,
    ErrorOut,
    UpdateConsumerRequest,
    UpsertConsumerRequest,
)
from consumers_graphql.store.db import Reader
from consumers_graphql.store.models import EXTERNAL_ID_MAX
from consumers_graphql.store.pagination import MAX_PAGE_SIZE, Page, page_request
from consumers_graphql.store.queries.audiences import AUDIENCE_SORT
from consumers_graphql.store.queries.consumers import (
    SEARCH_MAX,
    SEARCH_MIN,
    ConsumerFilter,
    ConsumerSortField,
    consumer_sort,
    search_term,
)
from consumers_graphql.store.queries.orders import ORDER_SORT
from consumers_graphql.store.repository import Repository
from consumers_graphql.timestamps import parse_datetime
from consumers_graphql.web.dependencies import request_reader
from consumers_graphql.web.http_auth import require_api_key

RELATIONS = ("audiences", "orders")
SortBy = Literal["createdAt", "email", "fullName", "lastOrderAt", "totalOrderValue", "totalOrders"]


class ConsumerIdConvertor(StringConvertor):
    """A path segment other than the collection's own paths: GET /batch is then 405 (Allow:
    POST, PUT), not a look-up of a consumer called "batch"."""

    regex = "(?!(?:batch|search)$)[^/]+"


register_url_convertor("consumer_id", ConsumerIdConvertor())

PREFIX = "/api/v1/consumers"
# Request fields as the reference spells them -> the services' names.
_FIELDS = {"email": "email", "phone": "phone", "fullName": "full_name", "metadata": "metadata",
           "externalId": "external_id"}


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError:
            # Metadata orjson refuses but the standard library stores: an integer past 64
            # bits, nesting deeper than 255.
            return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Validation failed: `details` lists every problem, with its field."),
    401: _error("Authentication required: no `Authorization: Bearer <secret key>`, or an "
                "unknown or revoked key."),
    403: _error("Forbidden: the key lacks the scope (`read` for GET, `write` otherwise)."),
    429: {**_error("Rate limit exceeded: this call's cost (its page size, or its batch's "
                   "items) is more than the API key's bucket holds now; retry after "
                   "`Retry-After` seconds (`details` is empty)."),
          "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                      "description": "Seconds until the bucket holds the "
                                      "call's cost."}}},
    "4XX": _error("Any other client error, in the same shape."),
    503: {**_error("Service unavailable: the database is out of reach (or the rate limit's "
                   "Redis, with CONSUMERS_RATE_LIMIT_FAIL_CLOSED); nothing was done, retry "
                   "after `Retry-After` seconds."),
          "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                      "description": "Seconds to wait before a retry."}}},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _error("Consumer not found")}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: _error("Request body too large: over 1 MiB, or 32 MiB on the batch endpoints "
                "(both in settings)."),
}
CONFLICTS: dict[int | str, dict[str, Any]] = {
    400: _error("Validation failed (`details` lists every problem, with its field: `3.email` "
                "for item 3 of a batch), or Email already exists, or External ID already "
                "exists, or Max batch size is 500."),
}


def api_router(prefix: str, tag: str) -> APIRouter:
    """A router of the REST API: every route behind the key, with the reference's errors."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        responses=ERRORS,
        dependencies=[
            # Documents the scheme in OpenAPI; `require_api_key` does the checking.
            Depends(HTTPBearer(auto_error=False,
                               description="A secret key: sk_live_… / sk_test_…")),
            Depends(require_api_key),
        ],
        route_class=RestRoute,
    )


router = api_router(PREFIX, "consumers")


def _repository(reader: Annotated[Reader, Depends(request_reader)]) -> Repository:
    # The request's one read connection, which authentication has used already.
    return Repository(reader)


def _services(request: Request) -> ConsumerService:
    return ConsumerService(request.app.state.database)


Repo = Annotated[Repository, Depends(_repository)]
Writes = Annotated[ConsumerService, Depends(_services)]
# What the server checks itself (with its own messages), stated in the OpenAPI document.
_PAGE_SIZE = {"minimum": 0, "maximum": MAX_PAGE_SIZE}
_NO_CONTROL = "[^\\u0000-\\u001f\\u007f-\\u009f]"
_TEXT = {"pattern": f"^{_NO_CONTROL}*$"}
# At least SEARCH_MIN characters once trimmed: two that are not spaces.
_SEARCH = {"minLength": SEARCH_MIN, "maxLength": SEARCH_MAX,
           "pattern": f"^{_NO_CONTROL}*[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_NO_CONTROL}*"
                      f"[^\\s\\u0000-\\u001f\\u007f-\\u009f]{_NO_CONTROL}*$"}
_INCLUDE = {"pattern": f"^({'|'.join(RELATIONS)})(,({'|'.join(RELATIONS)}))*$"}

First = Annotated[
    int | None, Query(description=f"Number of items per page (default 20, max {MAX_PAGE_SIZE})",
                      json_schema_extra=_PAGE_SIZE)
]
Include = Annotated[
    str | None, Query(description="Relations to include, comma-separated: audiences, orders",
                      json_schema_extra=_INCLUDE)
]
Text = {"json_schema_extra": _TEXT}
AudienceId = {"json_schema_extra": {"pattern": "^aud_[0-9A-HJKMNP-TV-Z]{26}$"}}
Timestamp = {"json_schema_extra": {"format": "date-time"}}
Search = {"json_schema_extra": _SEARCH}


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


def _fields(body: BaseModel) -> ConsumerFields:
    """The keys the client sent (`model_fields_set`): left out is not the same as null."""
    sent = {_FIELDS[name]: getattr(body, name) for name in body.model_fields_set if name in _FIELDS}
    return ConsumerFields(**sent)


def _written(result: BatchResult, items: Sequence[BaseModel] = ()) -> list[dict[str, Any]]:
    if result.errors:
        metadata = [getattr(item, "metadata", None) for item in items]
        raise DomainErrors(restore_refused_metadata(result.errors, metadata))
    return [consumer_json(item.row) for item in result.results if item.row is not None]


@router.get("", response_model=ConsumersListOut, summary="List consumers")
async def list_consumers(
    repository: Repo,
    first: First = None,
    after: Annotated[str | None, Query(description="Cursor for forward pagination")] = None,
    before: Annotated[str | None, Query(description="Cursor for backward pagination")] = None,
    last: Annotated[int | None, Query(description="Items for backward pagination (not with "
                                            "`first`)", json_schema_extra=_PAGE_SIZE)] = None,
    search: Annotated[
        str | None, Query(description="Search by email, phone, or name (min 2 chars)", **Search)
    ] = None,
    sortBy: SortBy = "createdAt",
    sortDir: Literal["asc", "desc"] = "desc",
    createdAfter: Annotated[
        str | None, Query(description="Created strictly after", **Timestamp)] = None,
    createdBefore: Annotated[
        str | None, Query(description="Created strictly before", **Timestamp)] = None,
    audienceId: Annotated[
        str | None, Query(description="Members of this audience only", **AudienceId)] = None,
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


@router.post(
    "", status_code=201, response_model=ConsumerOut,
    responses={**CONFLICTS, **TOO_LARGE, 201: {"headers": {"Location": {
        "description": "/api/v1/consumers/{id} of the created consumer",
        "schema": {"type": "string"}}}}},
    summary="Create a consumer",
    response_description="The created consumer (its URL in `Location`).",
)
async def create_consumer(services: Writes, body: CreateConsumerRequest) -> Response:
    row = await services.create_consumer(_fields(body))
    return JSONBody(consumer_json(row), status_code=201,
                    headers={"Location": f"{PREFIX}/{row.id}"})


@router.get("/search", response_model=ConsumersListOut, summary="Search consumers")
async def search_consumers(
    repository: Repo,
    q: Annotated[str | None, Query(description="Search query (min 2 chars)", **Search)] = None,
    email: Annotated[
        str | None, Query(description="Exact email match (case-insensitive)", **Text)] = None,
    phone: Annotated[
        str | None, Query(description="Exact phone match (as E.164)", **Text)] = None,
    externalId: Annotated[
        str | None, Query(description="Exact external ID match", **Text)] = None,
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


@router.post(
    "/batch", status_code=201, response_model=list[ConsumerOut],
    responses={**CONFLICTS, **TOO_LARGE}, summary="Create consumers in a batch",
    description="At most 500 consumers (`Max batch size is 500` otherwise). Atomic: one "
    "refused item and nothing is written; every refused item is reported.",
    response_description="The created consumers, in input order.",
)
async def batch_create_consumers(
    services: Writes, body: BatchCreateConsumersRequest
) -> Response:
    result = await services.create_consumers([_fields(item) for item in body.root])
    return JSONBody(_written(result, body.root), status_code=201)


@router.put(
    "/batch", response_model=list[ConsumerOut],
    responses={**CONFLICTS, **NOT_FOUND, **TOO_LARGE}, summary="Update consumers in a batch",
    description="Each item as `PUT /api/v1/consumers/{id}` does. At most 500 items (`Max "
    "batch size is 500` otherwise). Atomic: one refused item and nothing is written; every "
    "refused item is reported (404 `Consumer not found` when unknown ids are the only "
    "problem).",
    response_description="The consumers as updated, in input order.",
)
async def batch_update_consumers(
    services: Writes, body: BatchUpdateConsumersRequest
) -> Response:
    result = await services.update_consumers(
        [ConsumerChange(item.id, _fields(item)) for item in body.root]
    )
    return JSONBody(_written(result, body.root))


@router.put(
    "/batch/upsert", response_model=list[ConsumerOut],
    responses={**CONFLICTS, **TOO_LARGE}, summary="Create or update consumers by externalId",
    description="Each item as `PUT /api/v1/consumers/external/{externalId}` does, its "
    "`externalId` in the item (each externalId at most once: `Same externalId as item …`). "
    "At most 500 items (`Max batch size is 500` otherwise). Atomic: one refused item and "
    "nothing is written; every refused item is reported. Sent as one statement.",
    response_description="The consumers as written (created or updated), in input order.",
)
async def batch_upsert_consumers(
    services: Writes, body: BatchUpsertConsumersRequest
) -> Response:
    result = await services.upsert_consumers(
        [ConsumerUpsert(item.externalId, _fields(item)) for item in body.root]
    )
    return JSONBody(_written(result, body.root))


@router.put(
    "/external/{external_id:path}", response_model=ConsumerOut,
    responses={**CONFLICTS, **TOO_LARGE, 201: {
        "model": ConsumerOut, "description": "Created: no consumer had this externalId (its "
        "URL in `Location`).",
        "headers": {"Location": {"description": "/api/v1/consumers/{id} of the created "
                                 "consumer", "schema": {"type": "string"}}}}},
    summary="Create or update a consumer by externalId",
    description="The consumer with this externalId is updated as `PUT "
    "/api/v1/consumers/{id}` updates (keys left out stay, null clears, `metadata` merged "
    "shallowly): 200. Without one, a consumer is created with the body's fields and this "
    "externalId: 201. The body may repeat the externalId, not change it. Racing requests "
    "for one externalId create one consumer; the others update it.",
    response_description="Updated (or already as asked): the consumer.",
)
async def upsert_consumer(
    services: Writes,
    external_id: Annotated[str, Path(
        description="Your own id for the consumer, percent-encoded (it may hold `/`).",
        json_schema_extra={"minLength": 1, "maxLength": EXTERNAL_ID_MAX, "pattern": UNTRIMMED},
    )],
    body: UpsertConsumerRequest,
) -> Response:
    if "externalId" in body.model_fields_set and body.externalId != external_id:
        raise DomainError("externalId in the body must be the path's: an upsert does not "
                          "change it.", field=["externalId"], code=ErrorCode.VALIDATION_FAILED)
    row, created = await services.upsert_consumer(external_id, _fields(body))
    if created:
        return JSONBody(consumer_json(row), status_code=201,
                        headers={"Location": f"{PREFIX}/{row.id}"})
    return JSONBody(consumer_json(row))


@router.get(
    "/{consumer_id:consumer_id}", response_model=ConsumerWithRelationsOut, responses=NOT_FOUND,
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


@router.put(
    "/{consumer_id:consumer_id}", response_model=ConsumerOut,
    responses={**CONFLICTS, **NOT_FOUND, **TOO_LARGE}, summary="Update a consumer",
    description="Keys left out stay unchanged, null clears; `metadata` is merged shallowly "
    "(a key set to null is removed, `metadata: null` clears it).",
    response_description="The consumer as updated.",
)
async def update_consumer(
    services: Writes, consumer_id: str, body: UpdateConsumerRequest
) -> Response:
    row = await services.update_consumer(consumer_id, _fields(body))
    return JSONBody(consumer_json(row))


@router.delete(
    "/{consumer_id:consumer_id}", response_model=ConsumerOut, responses=NOT_FOUND,
    summary="Delete a consumer",
    description="Deletes the consumer with its orders and audience memberships.",
    response_description="The deleted consumer, as it was.",
)
async def delete_consumer(services: Writes, consumer_id: str) -> Response:
    row = await services.delete_consumer(consumer_id)
    return JSONBody(consumer_json(row))
