"""Order reads: look-ups and a consumer's orders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.engine import Row

from consumers_graphql.store.pagination import Page, PageRequest, SortKey, ValueKind
from consumers_graphql.store.queries.common import (
    ORDER_COLUMNS,
    Reads,
    one_of,
    orders,
    projected,
)

ORDER_SORT = SortKey(
    "orders", "placedAt", orders.c.placed_at, orders.c.id, ValueKind.DATETIME, True, False
)


def _consumer_orders_base(dialect: str, kept: frozenset[str] | None) -> Select[Any]:
    parent = orders.c.consumer_id
    return select(*projected(ORDER_COLUMNS, kept), parent.label("_parent")).where(
        one_of(parent, "parent_ids", dialect))


class OrderReads(Reads):
    """Reads of orders."""

    async def orders_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids("orders", ids)

    async def order_pages_by_consumer_ids(
        self, consumer_ids: Sequence[str], request: PageRequest,
        columns: frozenset[str] | None = None,
    ) -> list[Page[Row[Any]]]:
        """`columns`: the orders' columns read (None: all; see Reads._pages)."""
        return await self._pages("Consumer.orders", _consumer_orders_base, ORDER_SORT,
                                 orders.c.consumer_id, consumer_ids, request, columns)

    async def order_counts_by_consumer_ids(self, consumer_ids: Sequence[str]) -> list[int]:
        return await self._counts(orders.c.consumer_id, consumer_ids)
