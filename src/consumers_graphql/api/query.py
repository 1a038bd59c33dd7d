"""The Query root."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

import strawberry

from consumers_graphql.api import decorators
from consumers_graphql.api.context import Info
from consumers_graphql.api.types import (
    AfterArg,
    Audience,
    BeforeArg,
    Connection,
    Consumer,
    Event,
    FirstArg,
    LastArg,
    Node,
    Order,
    SortDirection,
    connection,
    consumer_connection,
)
from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import IdKind, kind_of
from consumers_graphql.store.events import EventType as EventKind
from consumers_graphql.store.events import count_events, page_of_events
from consumers_graphql.store.pagination import MAX_PAGE_SIZE, PageRequest, SortKey, page_request
from consumers_graphql.store.queries.audiences import AUDIENCE_SORT
from consumers_graphql.store.queries.consumers import (
    SEARCH_MIN,
    ConsumerFilter,
    consumer_sort,
    search_term,
)
from consumers_graphql.store.queries.consumers import ConsumerSortField as SortField

MAX_NODES = 100

ConsumerSortField = strawberry.enum(
    SortField,
    name="ConsumerSortField",
    description="What a consumers connection is ordered by; the id breaks ties.",
)


async def load_node(info: Info, id: str) -> Node | None:
    """The object an id names, through the request's loaders (`node`, `nodes`, and
    federation's `_entities`); None for an id that names nothing."""
    loaders = info.context.loaders
    kind = kind_of(id)
    if kind is IdKind.CONSUMER:
        row = await loaders.consumer_by_id.load(id)
        return Consumer.from_row(row) if row is not None else None
    if kind is IdKind.AUDIENCE:
        row = await loaders.audience_by_id.load(id)
        return Audience.from_row(row) if row is not None else None
    if kind is IdKind.ORDER:
        row = await loaders.order_by_id.load(id)
        return Order.from_row(row) if row is not None else None
    if kind is IdKind.EVENT:
        record = await loaders.event_by_id(
            info.context.database, info.context.repository.reader).load(id)
        return Event.from_record(record) if record is not None else None
    return None


async def _consumers(
    info: Info, filters: ConsumerFilter, sort: SortKey, request: PageRequest
) -> Connection[Consumer]:
    repository = info.context.repository
    once = info.context.loaders.once
    page = await once(("consumer_page", filters, sort.scope, request),
                      lambda: repository.consumer_page(filters, sort, request))
    return await consumer_connection(
        info, page,
        lambda: once(("consumer_count", filters), lambda: repository.consumer_count(filters)))


@strawberry.type
class Query:
    @decorators.field(description="Any object by its id; null when no object has this id.")
    async def node(self, info: Info, id: strawberry.ID) -> Node | None:
        return await load_node(info, id)

    @decorators.field(description=f"Objects by id, in the order given, null for each id that "
                      f"matches no object; at most {MAX_NODES} ids.")
    async def nodes(self, info: Info, ids: list[strawberry.ID]) -> list[Node | None]:
        if len(ids) > MAX_NODES:
            raise BadUserInput(
                f"`ids` takes at most {MAX_NODES} ids; {len(ids)} were given.", field=["ids"]
            )
        return list(await asyncio.gather(*(load_node(info, id) for id in ids)))

    @decorators.field(description="A consumer by id; null when there is none.")
    async def consumer(self, info: Info, id: strawberry.ID) -> Consumer | None:
        if kind_of(id) is not IdKind.CONSUMER:
            return None
        row = await info.context.loaders.consumer_by_id.load(id)
        return Consumer.from_row(row) if row is not None else None

    @decorators.field(description=(
        "Consumers, filtered and ordered, keyset-paginated: `first` (default 20) or `last`, "
        f"0..{MAX_PAGE_SIZE}, never both. `search` (at least {SEARCH_MIN} characters) matches "
        "part of the email, phone or full name, case-insensitively. `createdAfter` and "
        "`createdBefore` are strict bounds; `audienceId` keeps the audience's members. "
        "NULLs sort last in both directions."
    ))
    async def consumers(
        self,
        info: Info,
        first: FirstArg = None,
        after: AfterArg = None,
        last: LastArg = None,
        before: BeforeArg = None,
        search: str | None = None,
        sort_by: ConsumerSortField = SortField.CREATED_AT,  # type: ignore[valid-type]  # an enum class made by a call
        sort_dir: SortDirection = SortDirection.DESC,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        audience_id: strawberry.ID | None = None,
    ) -> Connection[Consumer]:
        sort = consumer_sort(sort_by, descending=sort_dir is SortDirection.DESC)
        request = page_request(sort, first=first, after=after, last=last, before=before)
        filters = ConsumerFilter(
            search=search,
            created_after=created_after,
            created_before=created_before,
            audience_id=audience_id,
        )
        return await _consumers(info, filters, sort, request)

    @decorators.field(description=(
        f"Consumers matching every criterion given: `q` (at least {SEARCH_MIN} characters) as "
        "part of the email, phone or full name, case-insensitively; `email` exactly "
        "(case-insensitively); `phone` exactly (normalised to E.164 first); `externalId` "
        "exactly. At least one criterion is required. Newest first; `first` 0..100 "
        "(default 20)."
    ))
    async def search_consumers(
        self,
        info: Info,
        q: str | None = None,
        email: str | None = None,
        phone: str | None = None,
        external_id: str | None = None,
        first: FirstArg = None,
        after: AfterArg = None,
    ) -> Connection[Consumer]:
        if q is None and email is None and phone is None and external_id is None:
            raise BadUserInput(
                "Give at least one of `q`, `email`, `phone` or `externalId`.", field=["q"]
            )
        if q is not None:
            search_term(q, "q")  # checked here so that the error names `q`
        sort = consumer_sort()
        request = page_request(sort, first=first, after=after)
        filters = ConsumerFilter(search=q, email=email, phone=phone, external_id=external_id)
        return await _consumers(info, filters, sort, request)

    @decorators.field(description="An audience by id; null when there is none.")
    async def audience(self, info: Info, id: strawberry.ID) -> Audience | None:
        if kind_of(id) is not IdKind.AUDIENCE:
            return None
        row = await info.context.loaders.audience_by_id.load(id)
        return Audience.from_row(row) if row is not None else None

    @decorators.field(description="Audiences by name. `first` (default 20) or `last`, "
                      f"0..{MAX_PAGE_SIZE}, never both.")
    async def audiences(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Audience]:
        request = page_request(AUDIENCE_SORT, first=first, after=after, last=last, before=before)
        repository = info.context.repository
        once = info.context.loaders.once
        page = await once(("audience_page", request), lambda: repository.audience_page(request))
        return connection(page, Audience.from_rows,
                          lambda: once("audience_count", repository.audience_count))

    @decorators.field(description=(
        "Change events in commit order, oldest first: resumable from any cursor, or from an "
        f"event id (`evt_…`) as `after`. `first` 0..{MAX_PAGE_SIZE} (default 20). `types` "
        "keeps these kinds, `subjectId` the events of one consumer, order or audience. A "
        "cursor older than the event retention is refused (BAD_USER_INPUT), never answered "
        "with a gap."
    ))
    async def events(
        self,
        info: Info,
        first: Annotated[int | None, strawberry.argument(
            description=f"Page size, 0..{MAX_PAGE_SIZE} (default 20).")] = None,
        after: Annotated[str | None, strawberry.argument(
            description="Return the events after this cursor or event id.")] = None,
        types: Annotated[list[EventKind] | None, strawberry.argument(
            description="Only events of these types.")] = None,
        subject_id: Annotated[strawberry.ID | None, strawberry.argument(
            description="Only events of this consumer, order or audience.")] = None,
    ) -> Connection[Event]:
        database, reader = info.context.database, info.context.repository.reader
        kinds = None if types is None else tuple(kind.value for kind in types)
        subject = None if subject_id is None else str(subject_id)
        once = info.context.loaders.once
        page = await once(("event_page", first, after, kinds, subject), lambda: page_of_events(
            database, reader, first=first, after=after, types=kinds, subject_id=subject))
        return connection(page, Event.from_records, lambda: once(
            ("event_count", kinds, subject),
            lambda: count_events(database, reader, types=kinds, subject_id=subject)))
