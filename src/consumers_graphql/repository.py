"""The read side: Core queries for pages, look-ups by id and batched relation loads.

Everything here is one statement per call, whatever the number of keys, so that the
DataLoaders above it keep a page of any size at a constant number of statements.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import phonenumbers
from sqlalchemy import Select, column, func, literal_column, select, table
from sqlalchemy.engine import Row

from consumers_graphql import models
from consumers_graphql.db import Reader
from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import IdKind, is_id_of
from consumers_graphql.normalize import fold
from consumers_graphql.pagination import (
    Page,
    PageRequest,
    SortKey,
    ValueKind,
    assemble_page,
    assemble_pages,
    page_statement,
)

consumers = models.Consumer.__table__
audiences = models.Audience.__table__
memberships = models.ConsumerAudience.__table__
orders = models.Order.__table__

CONSUMER_COLUMNS = [c for c in consumers.c if c.name != "search_text"]
AUDIENCE_COLUMNS = list(audiences.c)
ORDER_COLUMNS = list(orders.c)

SEARCH_MIN = 2
SEARCH_MAX = 200
# The SQLite FTS5 table over consumers.search_text (trigram tokenizer; see the migrations).
_consumers_fts = table("consumers_fts", column("rowid"))


class ConsumerSortField(Enum):
    """The orders a consumers connection can take; values are the public (REST) names."""

    CREATED_AT = "createdAt"
    EMAIL = "email"
    FULL_NAME = "fullName"
    LAST_ORDER_AT = "lastOrderAt"
    TOTAL_ORDER_VALUE = "totalOrderValue"
    TOTAL_ORDERS = "totalOrders"


_CONSUMER_SORT_COLUMNS: dict[ConsumerSortField, tuple[Any, ValueKind, bool]] = {
    ConsumerSortField.CREATED_AT: (consumers.c.created_at, ValueKind.DATETIME, False),
    ConsumerSortField.EMAIL: (consumers.c.email_key, ValueKind.TEXT, True),
    ConsumerSortField.FULL_NAME: (consumers.c.full_name_key, ValueKind.TEXT, True),
    ConsumerSortField.LAST_ORDER_AT: (consumers.c.last_order_at, ValueKind.DATETIME, True),
    ConsumerSortField.TOTAL_ORDER_VALUE: (consumers.c.total_order_value, ValueKind.DECIMAL, False),
    ConsumerSortField.TOTAL_ORDERS: (consumers.c.total_orders, ValueKind.INT, False),
}


def consumer_sort(
    field: ConsumerSortField = ConsumerSortField.CREATED_AT,
    descending: bool = True,
) -> SortKey:
    col, kind, nullable = _CONSUMER_SORT_COLUMNS[field]
    return SortKey("consumers", field.value, col, consumers.c.id, kind, descending, nullable)


AUDIENCE_SORT = SortKey(
    "audiences", "name", audiences.c.name, audiences.c.id, ValueKind.TEXT, False, False
)
ORDER_SORT = SortKey(
    "orders", "placedAt", orders.c.placed_at, orders.c.id, ValueKind.DATETIME, True, False
)
AUDIENCE_CONSUMER_SORT = consumer_sort()


@dataclass(frozen=True)
class ConsumerFilter:
    """Filters of a consumers connection; all given ones must hold."""

    search: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    audience_id: str | None = None
    email: str | None = None
    phone: str | None = None
    external_id: str | None = None


_PHONE_LIKE = re.compile(r"^\+?[\d\s().\-]+$")


def search_term(raw: str, argument: str = "search") -> str:
    """The folded substring a search looks for; phone-like input loses its formatting so
    ``(415) 555`` finds ``+14155550100``."""
    term = raw.strip()
    if len(term) < SEARCH_MIN:
        raise BadUserInput(f"`{argument}` must be at least {SEARCH_MIN} characters long.")
    if len(term) > SEARCH_MAX:
        raise BadUserInput(f"`{argument}` must be at most {SEARCH_MAX} characters long.")
    if _PHONE_LIKE.match(term) and sum(ch.isdigit() for ch in term) >= SEARCH_MIN:
        term = ("+" if term.startswith("+") else "") + "".join(ch for ch in term if ch.isdigit())
    return fold(term) or ""


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _normalized_phone(raw: str) -> str:
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return raw.strip()
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class Repository:
    """Read queries over one request's connection."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    async def _rows(self, statement: Select[Any]) -> Sequence[Row[Any]]:
        return (await self._reader.execute(statement)).all()

    # -- consumers ------------------------------------------------------------------------

    def _consumer_filter(self, base: Select[Any], f: ConsumerFilter) -> Select[Any]:
        if f.search is not None:
            base = base.where(*self._search_predicates(search_term(f.search)))
        if f.created_after is not None:
            base = base.where(consumers.c.created_at > f.created_after)
        if f.created_before is not None:
            base = base.where(consumers.c.created_at < f.created_before)
        if f.audience_id is not None:
            if not is_id_of(f.audience_id, IdKind.AUDIENCE):
                raise BadUserInput("`audienceId` is not an audience id.")
            base = base.where(
                consumers.c.id.in_(
                    select(memberships.c.consumer_id).where(
                        memberships.c.audience_id == f.audience_id
                    )
                )
            )
        if f.email is not None:
            base = base.where(consumers.c.email_key == fold(f.email.strip()))
        if f.phone is not None:
            base = base.where(consumers.c.phone == _normalized_phone(f.phone))
        if f.external_id is not None:
            base = base.where(consumers.c.external_id == f.external_id)
        return base

    def _search_predicates(self, term: str) -> list[Any]:
        # The LIKE is the definition of a match; the FTS5 MATCH only narrows it down through
        # the trigram index (which needs 3 characters). PostgreSQL's pg_trgm GIN index
        # serves the LIKE itself.
        like = consumers.c.search_text.like(_like_pattern(term), escape="\\")
        if self._reader.dialect != "sqlite" or len(term) < 3:
            return [like]
        phrase = '"' + term.replace('"', '""') + '"'
        matching = (
            select(_consumers_fts.c.rowid)
            .where(literal_column("consumers_fts").op("MATCH")(phrase))
        )
        return [literal_column("consumers.rowid").in_(matching), like]

    async def consumer_page(
        self, f: ConsumerFilter, sort: SortKey, request: PageRequest
    ) -> Page[Row[Any]]:
        base = self._consumer_filter(select(*CONSUMER_COLUMNS), f)
        rows = await self._rows(page_statement(base, sort, request))
        return assemble_page(rows, sort, request, _identity)

    async def consumer_count(self, f: ConsumerFilter) -> int:
        statement = self._consumer_filter(select(func.count()).select_from(consumers), f)
        return int((await self._reader.execute(statement)).scalar_one())

    async def consumers_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids(CONSUMER_COLUMNS, consumers.c.id, ids)

    async def consumer_pages_by_audience_ids(
        self, audience_ids: Sequence[str], request: PageRequest
    ) -> list[Page[Row[Any]]]:
        parent = memberships.c.audience_id
        base = (
            select(*CONSUMER_COLUMNS, parent.label("_parent"))
            .join(memberships, memberships.c.consumer_id == consumers.c.id)
            .where(parent.in_(audience_ids))
        )
        statement = page_statement(base, AUDIENCE_CONSUMER_SORT, request, partition_by=parent)
        rows = await self._rows(statement)
        return assemble_pages(rows, audience_ids, "_parent", AUDIENCE_CONSUMER_SORT, request,
                              _identity)

    async def consumer_counts_by_audience_ids(self, audience_ids: Sequence[str]) -> list[int]:
        return await self._counts(memberships.c.audience_id, audience_ids)

    # -- audiences ------------------------------------------------------------------------

    async def audience_page(self, request: PageRequest) -> Page[Row[Any]]:
        rows = await self._rows(page_statement(select(*AUDIENCE_COLUMNS), AUDIENCE_SORT, request))
        return assemble_page(rows, AUDIENCE_SORT, request, _identity)

    async def audience_count(self) -> int:
        statement = select(func.count()).select_from(audiences)
        return int((await self._reader.execute(statement)).scalar_one())

    async def audiences_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids(AUDIENCE_COLUMNS, audiences.c.id, ids)

    async def audience_pages_by_consumer_ids(
        self, consumer_ids: Sequence[str], request: PageRequest
    ) -> list[Page[Row[Any]]]:
        parent = memberships.c.consumer_id
        base = (
            select(*AUDIENCE_COLUMNS, parent.label("_parent"))
            .join(memberships, memberships.c.audience_id == audiences.c.id)
            .where(parent.in_(consumer_ids))
        )
        rows = await self._rows(page_statement(base, AUDIENCE_SORT, request, partition_by=parent))
        return assemble_pages(rows, consumer_ids, "_parent", AUDIENCE_SORT, request, _identity)

    async def audience_counts_by_consumer_ids(self, consumer_ids: Sequence[str]) -> list[int]:
        return await self._counts(memberships.c.consumer_id, consumer_ids)

    # -- orders ---------------------------------------------------------------------------

    async def orders_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids(ORDER_COLUMNS, orders.c.id, ids)

    async def order_pages_by_consumer_ids(
        self, consumer_ids: Sequence[str], request: PageRequest
    ) -> list[Page[Row[Any]]]:
        parent = orders.c.consumer_id
        base = select(*ORDER_COLUMNS, parent.label("_parent")).where(parent.in_(consumer_ids))
        rows = await self._rows(page_statement(base, ORDER_SORT, request, partition_by=parent))
        return assemble_pages(rows, consumer_ids, "_parent", ORDER_SORT, request, _identity)

    async def order_counts_by_consumer_ids(self, consumer_ids: Sequence[str]) -> list[int]:
        return await self._counts(orders.c.consumer_id, consumer_ids)

    # -- shared ---------------------------------------------------------------------------

    async def _by_ids(
        self, columns: Sequence[Any], id_column: Any, ids: Sequence[str]
    ) -> list[Row[Any] | None]:
        rows = await self._rows(select(*columns).where(id_column.in_(set(ids))))
        by_id = {row.id: row for row in rows}
        return [by_id.get(key) for key in ids]

    async def _counts(self, parent: Any, keys: Sequence[str]) -> list[int]:
        statement = (
            select(parent, func.count()).where(parent.in_(set(keys))).group_by(parent)
        )
        counts = {key: count for key, count in await self._rows(statement)}
        return [counts.get(key, 0) for key in keys]


def _identity(row: Row[Any]) -> Row[Any]:
    return row
