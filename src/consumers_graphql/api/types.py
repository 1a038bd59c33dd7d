"""GraphQL object types: a thin face over the repository's rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from enum import Enum
from operator import itemgetter
from typing import Annotated, Any, ClassVar, Generic, TypeVar, cast

import strawberry
from sqlalchemy.engine import Row
from strawberry.scalars import JSON

from consumers_graphql.api import decorators
from consumers_graphql.api.context import Info
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.api.prefetch import Prefetched, Relation, prefetch
from consumers_graphql.store.events import EventRecord
from consumers_graphql.store.events import EventType as EventKind
from consumers_graphql.store.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Page,
    page_request,
)
from consumers_graphql.store.queries.audiences import AUDIENCE_SORT
from consumers_graphql.store.queries.consumers import AUDIENCE_CONSUMER_SORT
from consumers_graphql.store.queries.orders import ORDER_SORT

NodeT = TypeVar("NodeT")

_CONSUMER_FIELDS = ("id", "email", "phone", "full_name", "metadata", "external_id",
                    "total_orders", "total_order_value", "last_order_at", "created_at",
                    "updated_at")
_AUDIENCE_FIELDS = ("id", "name", "description", "created_at", "updated_at")
_ORDER_FIELDS = ("id", "consumer_id", "amount", "currency", "placed_at", "external_id",
                 "created_at")
# what a node field may read alone (api/prefetch.py: Relation)
_AUDIENCE_COLUMNS, _ORDER_COLUMNS = frozenset(_AUDIENCE_FIELDS), frozenset(_ORDER_FIELDS)


_readers: dict[tuple[tuple[str, ...], tuple[str, ...]], Callable[[Row[Any]], Any]] = {}


def _columns(
    rows: Sequence[Row[Any]], names: tuple[str, ...], fields: tuple[str, ...] = ()
) -> Callable[[Row[Any]], Any]:
    """Reads `names` from each of these rows by position: rows of one statement share their
    columns (`fields`, the page knows them), so the positions are looked up once per
    statement shape (a read by name costs more than the rest of building a node)."""
    fields = fields or rows[0]._fields
    reader = _readers.get((fields, names))
    if reader is None:
        reader = itemgetter(*(fields.index(name) for name in names))
        if len(_readers) < 256:  # one per statement shape: a handful
            _readers[fields, names] = reader
    return reader

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
                      "`ord_…`, `evt_…`): the same id as in the REST API.")
class Node:
    id: strawberry.ID


@strawberry.type(description="Where a page sits in its connection.")
class PageInfo:
    page: strawberry.Private[Page[Any]]

    @decorators.field(description="Whether rows follow the last edge (exact, in both "
                      "directions).")
    def has_next_page(self) -> bool:
        return self.page.has_next_page

    @decorators.field(description="Whether rows precede the first edge (exact, in both "
                      "directions).")
    def has_previous_page(self) -> bool:
        return self.page.has_previous_page

    @decorators.field(description="Cursor of the first edge.")
    def start_cursor(self) -> str | None:
        return self.page.start_cursor

    @decorators.field(description="Cursor of the last edge.")
    def end_cursor(self) -> str | None:
        return self.page.end_cursor


@strawberry.type(description="A node with the cursor of its position.")
class Edge(Generic[NodeT]):
    cursor: str = strawberry.field(description="Opaque; valid only for the same connection "
                                   "and order.")
    node: NodeT


@strawberry.type(description="A page of a keyset-paginated list.")
class Connection(Generic[NodeT]):
    nodes: list[NodeT] = strawberry.field(description="The edges' nodes, for brevity.")

    @strawberry.field
    def page_info(self) -> PageInfo:
        # Made when asked for: most clients read only `nodes` of a nested connection.
        return PageInfo(page=self.page)

    count: strawberry.Private[Callable[[], Awaitable[int]]]
    page: strawberry.Private[Page[Any]]
    # what makes `nodes` from the page's items, on first read (see `connection`)
    convert: strawberry.Private[Callable[[Sequence[Any], tuple[str, ...]], list[NodeT]]]

    def __getattr__(self, name: str) -> Any:
        if name != "nodes":
            raise AttributeError(name)
        nodes = self.nodes = self.convert(self.page.items, self.page.fields)
        return nodes

    def unmade_nodes(self) -> tuple[Sequence[Any], tuple[str, ...]] | None:
        """The rows `nodes` are made from, while not made yet: the compiled executor reads
        a selection of leaf fields straight from them, where the node type says how
        (`row_columns`), without an object per node (api/executor.py: _row_records)."""
        if "nodes" in self.__dict__:
            return None
        return self.page.items, self.page.fields

    @strawberry.field
    def edges(self) -> list[Edge[NodeT]]:
        # Cursors are made only when asked for: most clients read `nodes`.
        page = self.page
        return [Edge(cursor=page.cursor(i), node=node) for i, node in enumerate(self.nodes)]

    @decorators.field(description="Number of rows matching the filters, whatever the page. "
                      "Computed only when selected (it costs a COUNT).")
    async def total_count(self) -> int:
        return await self.count()


def connection(
    page: Page[Any],
    convert: Callable[[Sequence[Any], tuple[str, ...]], list[NodeT]],
    count: Callable[[], Awaitable[int]],
) -> Connection[NodeT]:
    """A connection over `page`, its nodes made by `convert` when first read."""
    made: Connection[NodeT] = object.__new__(Connection)
    made.__dict__.update(page=page, count=count, convert=convert)
    return made


@strawberry.federation.type(keys=["id"], description="An end user of the platform.")
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
    prefetched: strawberry.Private[Prefetched]
    # What from_rows does to each column, for the compiled executor's nodes read from rows
    # (Connection.unmade_nodes); tests/test_executor.py holds the two to the same answers.
    row_columns: ClassVar[dict[str, Callable[[Any], Any] | None]] = dict.fromkeys(
        _CONSUMER_FIELDS) | {"total_order_value": float}

    @classmethod
    def from_row(cls, row: Row[Any]) -> Consumer:
        return cls.from_rows([row])[0]

    @classmethod
    def from_rows(
        cls, rows: Sequence[Row[Any]], fields: tuple[str, ...] = (),
        prefetched: dict[str, Prefetched] | None = None,
    ) -> list[Consumer]:
        """Rows of one statement (their column names in `fields` when known), with what the
        look-ahead loaded for each."""
        if not rows:
            return []
        columns = _columns(rows, _CONSUMER_FIELDS, fields)
        nodes = []
        for row in rows:
            (id, email, phone, full_name, metadata, external_id, total_orders,
             total_order_value, last_order_at, created_at, updated_at) = columns(row)
            nodes.append(cls(
                id=id, email=email, phone=phone, full_name=full_name, metadata=metadata,
                external_id=external_id, total_orders=total_orders,
                total_order_value=float(total_order_value), last_order_at=last_order_at,
                created_at=created_at, updated_at=updated_at,
                prefetched=(prefetched.get(id) if prefetched else None) or {},
            ))
        return nodes

    @decorators.field(description="The audiences this consumer belongs to, by name.")
    def audiences(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Audience]:
        loaders = info.context.loaders
        count = lambda: loaders.audience_count_by_consumer_id.load(self.id)  # noqa: E731
        page = self.prefetched.get(("audiences", first, after, last, before))
        if page is not None:  # loaded ahead (its arguments are valid)
            return connection(page, Audience.from_rows, count)
        request = page_request(AUDIENCE_SORT, first=first, after=after, last=last, before=before)
        return _loaded(lambda: loaders.audiences_by_consumer_id(request).load(self.id),
                       Audience.from_rows, count)

    @decorators.field(description="This consumer's orders, most recently placed first.")
    def orders(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Order]:
        loaders = info.context.loaders
        count = lambda: loaders.order_count_by_consumer_id.load(self.id)  # noqa: E731
        page = self.prefetched.get(("orders", first, after, last, before))
        if page is not None:  # loaded ahead (its arguments are valid)
            return connection(page, Order.from_rows, count)
        request = page_request(ORDER_SORT, first=first, after=after, last=last, before=before)
        return _loaded(lambda: loaders.orders_by_consumer_id(request).load(self.id),
                       Order.from_rows, count)


def _loaded(
    load: Callable[[], Awaitable[Page[Row[Any]]]],
    convert: Callable[[Sequence[Row[Any]], tuple[str, ...]], list[NodeT]],
    count: Callable[[], Awaitable[int]],
) -> Connection[NodeT]:
    """A relation connection the page's look-ahead did not load: an awaitable, through the
    DataLoader."""

    async def loaded() -> Connection[NodeT]:
        return connection(await load(), convert, count)

    return loaded()  # type: ignore[return-value]  # graphql-core awaits it; schema wants Connection


def consumer_relations(loaders: Loaders) -> dict[str, Relation]:
    return {
        "audiences": Relation(AUDIENCE_SORT, loaders.audiences_by_consumer_id,
                              _AUDIENCE_COLUMNS),
        "orders": Relation(ORDER_SORT, loaders.orders_by_consumer_id, _ORDER_COLUMNS),
    }


async def consumer_connection(
    info: Info, page: Page[Row[Any]], count: Callable[[], Awaitable[int]]
) -> Connection[Consumer]:
    """A page of consumers, with their selected relations loaded for the whole page."""
    loaders = info.context.loaders
    loaders.prime_consumers(page.items)
    prefetched = await prefetch(
        info, "Consumer", [row.id for row in page.items], consumer_relations(loaders)
    )
    return connection(
        page, lambda rows, fields: Consumer.from_rows(rows, fields, prefetched), count
    )


@strawberry.federation.type(keys=["id"], description="A named group of consumers.")
class Audience(Node):
    id: strawberry.ID
    name: str = strawberry.field(description="Unique.")
    description: str | None
    created_at: datetime
    updated_at: datetime
    row_columns: ClassVar[dict[str, Callable[[Any], Any] | None]] = dict.fromkeys(
        _AUDIENCE_FIELDS)

    @classmethod
    def from_row(cls, row: Row[Any]) -> Audience:
        return cls.from_rows([row])[0]

    @classmethod
    def from_rows(cls, rows: Sequence[Row[Any]], fields: tuple[str, ...] = ()
                  ) -> list[Audience]:
        if not rows:
            return []
        columns = _columns(rows, _AUDIENCE_FIELDS, fields)
        nodes = []
        for row in rows:
            id, name, description, created_at, updated_at = columns(row)
            nodes.append(cls(id=id, name=name, description=description,
                             created_at=created_at, updated_at=updated_at))
        return nodes

    @decorators.field(description="The members, newest first (createdAt descending).")
    async def consumers(
        self, info: Info, first: FirstArg = None, after: AfterArg = None,
        last: LastArg = None, before: BeforeArg = None,
    ) -> Connection[Consumer]:
        loaders = info.context.loaders
        request = page_request(
            AUDIENCE_CONSUMER_SORT, first=first, after=after, last=last, before=before
        )
        page = await loaders.consumers_by_audience_id(request).load(self.id)
        return await consumer_connection(
            info, page, lambda: loaders.consumer_count_by_audience_id.load(self.id)
        )


@strawberry.federation.type(keys=["id"], description="An order a consumer placed.")
class Order(Node):
    id: strawberry.ID
    consumer_id: strawberry.Private[str]
    amount: float = strawberry.field(description="Stored as an exact decimal.")
    currency: str = strawberry.field(description="ISO 4217 code, e.g. `EUR`.")
    placed_at: datetime
    external_id: str | None = strawberry.field(description="Your own id; unique when set.")
    created_at: datetime
    row_columns: ClassVar[dict[str, Callable[[Any], Any] | None]] = dict.fromkeys(
        _ORDER_FIELDS) | {"amount": float}

    @classmethod
    def from_row(cls, row: Row[Any]) -> Order:
        return cls.from_rows([row])[0]

    @classmethod
    def from_rows(cls, rows: Sequence[Row[Any]], fields: tuple[str, ...] = ()) -> list[Order]:
        if not rows:
            return []
        columns = _columns(rows, _ORDER_FIELDS, fields)
        nodes = []
        for row in rows:
            id, consumer_id, amount, currency, placed_at, external_id, created_at = columns(row)
            nodes.append(cls(id=id, consumer_id=consumer_id,
                             # None: not read (api/prefetch.py), nor selected
                             amount=cast(float, amount) if amount is None else float(amount),
                             currency=currency, placed_at=placed_at, external_id=external_id,
                             created_at=created_at))
        return nodes

    @strawberry.field
    async def consumer(self, info: Info) -> Consumer:
        row = await info.context.loaders.consumer_by_id.load(self.consumer_id)
        assert row is not None, "orders reference consumers by foreign key"
        return Consumer.from_row(row)


EventType = strawberry.enum(
    EventKind, name="EventType",
    description="What changed: a consumer, an order or an audience created, updated, "
    "deleted (an order: recorded, deleted), or an audience's members added or removed.")


@strawberry.type(description="A change, recorded with the write that made it (an outbox), "
                 "kept for the event retention (30 days by default). Events are in commit "
                 "order: Query.events and REST's /api/v1/events resume from any cursor or "
                 "event id.")
class Event(Node):
    id: strawberry.ID = strawberry.field(description="`evt_…`.")
    type: EventKind = strawberry.field(description="What changed.")
    occurred_at: datetime = strawberry.field(description="When the write ran.")
    subject_id: strawberry.ID = strawberry.field(description="The consumer, order or audience "
                                                 "that changed.")
    data: JSON = strawberry.field(description=(
        "The subject as the REST API returns it after the change (before it, for "
        "`*_DELETED`). Member events add `consumerIds`: the consumers that joined or left. "
        "An order's events come with its consumer's CONSUMER_UPDATED (its totals)."))

    @classmethod
    def from_record(cls, record: EventRecord) -> Event:
        return cls(id=strawberry.ID(record.id), type=EventKind(record.type),
                   occurred_at=record.occurred_at, subject_id=strawberry.ID(record.subject_id),
                   data=cast(JSON, record.data))

    @classmethod
    def from_records(cls, records: Sequence[EventRecord], _fields: tuple[str, ...] = ()
                     ) -> list[Event]:
        return [cls.from_record(record) for record in records]
