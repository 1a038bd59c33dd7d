"""GraphQL object types: a thin face over the repository's rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Generic, TypeVar

import strawberry
from sqlalchemy.engine import Row
from strawberry.scalars import JSON

from consumers_graphql.api.context import Info
from consumers_graphql.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page, page_request
from consumers_graphql.repository import AUDIENCE_CONSUMER_SORT, AUDIENCE_SORT, ORDER_SORT

NodeT = TypeVar("NodeT")

PAGE_ARGS_DOC = (
    f"Keyset-paginated (Relay cursor connection): `first` (default {DEFAULT_PAGE_SIZE}) or "
    f"`last`, each 0..{MAX_PAGE_SIZE}, never both; `after`/`before` take cursors from this "
    "same connection and order."
)

FirstArg = Annotated[
    int | None,
    strawberry.argument(description=f"Page size from the start, 0..{MAX_PAGE_SIZE} "
                        f"(default {DEFAULT_PAGE_SIZE} when `last` is not given)."),
]
AfterArg = Annotated[
    str | None, strawberry.argument(description="Return the rows after this cursor.")
]
LastArg = Annotated[
    int | None, strawberry.argument(description=f"Page size from the end, 0..{MAX_PAGE_SIZE}.")
]
BeforeArg = Annotated[
    str | None, strawberry.argument(description="Return the rows before this cursor.")
]


@strawberry.enum(description="Direction of an ordering. NULLs sort last in both.")
class SortDirection(Enum):
    ASC = "asc"
    DESC = "desc"


@strawberry.interface(description="An object with a globally unique id (`cons_…`, `aud_…`, "
                      "`ord_…`): the same id as in the REST API.")
class Node:
    id: strawberry.ID


@strawberry.type(description="Where a page sits in its connection.")
class PageInfo:
    has_next_page: bool = strawberry.field(
        description="Whether rows follow the last edge (exact, in both directions)."
    )
    has_previous_page: bool = strawberry.field(
        description="Whether rows precede the first edge (exact, in both directions)."
    )
    start_cursor: str | None = strawberry.field(description="Cursor of the first edge.")
    end_cursor: str | None = strawberry.field(description="Cursor of the last edge.")


@strawberry.type(description="A node with the cursor of its position.")
class Edge(Generic[NodeT]):
    cursor: str = strawberry.field(description="Opaque; valid only for the same connection "
                                   "and order.")
    node: NodeT


@strawberry.type(description="A page of a keyset-paginated list.")
class Connection(Generic[NodeT]):
    edges: list[Edge[NodeT]]
    nodes: list[NodeT] = strawberry.field(description="The edges' nodes, for brevity.")
    page_info: PageInfo
    count: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field(description="Number of rows matching the filters, whatever the page. "
                      "Computed only when selected (it costs a COUNT).")
    async def total_count(self) -> int:
        return await self.count()


def connection(
    page: Page[Row[Any]],
    convert: Callable[[Row[Any]], NodeT],
    count: Callable[[], Awaitable[int]],
) -> Connection[NodeT]:
    nodes = [convert(row) for row in page.items]
    return Connection(
        edges=[Edge(cursor=c, node=n) for c, n in zip(page.cursors, nodes, strict=True)],
        nodes=nodes,
        page_info=PageInfo(
            has_next_page=page.has_next_page,
            has_previous_page=page.has_previous_page,
            start_cursor=page.start_cursor,
            end_cursor=page.end_cursor,
        ),
        count=count,
    )


@strawberry.type(description="An end user of the platform.")
class Consumer(Node):
    id: strawberry.ID
    email: str | None = strawberry.field(description="Unique case-insensitively.")
    phone: str | None = strawberry.field(description="E.164, e.g. `+14155550100`.")
    full_name: str | None
    metadata: JSON | None = strawberry.field(description="A JSON object of at most 16 KiB.")
    external_id: str | None = strawberry.field(description="Your own id; unique when set.")
    total_orders: int = strawberry.field(description="Number of orders recorded.")
    total_order_value: float = strawberry.field(description="Sum of the orders' amounts.")
    last_order_at: datetime | None = strawberry.field(description="When the latest order "
                                                      "was placed.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> Consumer:
        return cls(
            id=strawberry.ID(row.id),
            email=row.email,
            phone=row.phone,
            full_name=row.full_name,
            metadata=row.metadata,
            external_id=row.external_id,
            total_orders=row.total_orders,
            total_order_value=float(row.total_order_value),
            last_order_at=row.last_order_at,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field(description="The audiences this consumer belongs to, by name. "
                      + PAGE_ARGS_DOC)
    async def audiences(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Audience]:
        loaders = info.context.loaders
        request = page_request(AUDIENCE_SORT, first=first, after=after, last=last, before=before)
        page = await loaders.audiences_by_consumer_id(request).load(self.id)
        return connection(
            page, Audience.from_row, lambda: loaders.audience_count_by_consumer_id.load(self.id)
        )

    @strawberry.field(description="This consumer's orders, most recently placed first. "
                      + PAGE_ARGS_DOC)
    async def orders(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Order]:
        loaders = info.context.loaders
        request = page_request(ORDER_SORT, first=first, after=after, last=last, before=before)
        page = await loaders.orders_by_consumer_id(request).load(self.id)
        return connection(
            page, Order.from_row, lambda: loaders.order_count_by_consumer_id.load(self.id)
        )


@strawberry.type(description="A named group of consumers.")
class Audience(Node):
    id: strawberry.ID
    name: str = strawberry.field(description="Unique.")
    description: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> Audience:
        return cls(
            id=strawberry.ID(row.id),
            name=row.name,
            description=row.description,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @strawberry.field(description="The members, newest first (createdAt descending). "
                      + PAGE_ARGS_DOC)
    async def consumers(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Consumer]:
        loaders = info.context.loaders
        request = page_request(
            AUDIENCE_CONSUMER_SORT, first=first, after=after, last=last, before=before
        )
        page = await loaders.consumers_by_audience_id(request).load(self.id)
        loaders.prime_consumers(page.items)
        return connection(
            page, Consumer.from_row, lambda: loaders.consumer_count_by_audience_id.load(self.id)
        )


@strawberry.type(description="An order a consumer placed.")
class Order(Node):
    id: strawberry.ID
    consumer_id: strawberry.Private[str]
    amount: float = strawberry.field(description="Stored as an exact decimal.")
    currency: str = strawberry.field(description="ISO 4217 code, e.g. `EUR`.")
    placed_at: datetime
    external_id: str | None = strawberry.field(description="Your own id; unique when set.")
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> Order:
        return cls(
            id=strawberry.ID(row.id),
            consumer_id=row.consumer_id,
            amount=float(row.amount),
            currency=row.currency,
            placed_at=row.placed_at,
            external_id=row.external_id,
            created_at=row.created_at,
        )

    @strawberry.field
    async def consumer(self, info: Info) -> Consumer:
        row = await info.context.loaders.consumer_by_id.load(self.consumer_id)
        assert row is not None, "orders reference consumers by foreign key"
        return Consumer.from_row(row)
