"""Audience reads: pages, counts, look-ups, a consumer's audiences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.engine import Row

from consumers_graphql.store.pagination import (
    Page,
    PageRequest,
    SortKey,
    ValueKind,
    assemble_page,
    page_statement,
)
from consumers_graphql.store.queries.common import (
    AUDIENCE_COLUMNS,
    Reads,
    audiences,
    memberships,
    one_of,
    projected,
)

AUDIENCE_SORT = SortKey(
    "audiences", "name", audiences.c.name, audiences.c.id, ValueKind.TEXT, False, False
)
_AUDIENCE_COUNT = select(func.count()).select_from(audiences)


def _consumer_audiences_base(dialect: str, kept: frozenset[str] | None) -> Select[Any]:
    parent = memberships.c.consumer_id
    return (
        select(*projected(AUDIENCE_COLUMNS, kept), parent.label("_parent"))
        .join(memberships, memberships.c.audience_id == audiences.c.id)
        .where(one_of(parent, "parent_ids", dialect))
    )


class AudienceReads(Reads):
    """Reads of audiences."""

    async def audience_page(self, request: PageRequest) -> Page[Row[Any]]:
        statement, params = page_statement(
            "audiences", lambda: select(*AUDIENCE_COLUMNS), AUDIENCE_SORT, request
        )
        rows = await self._rows(statement, params)
        return assemble_page(rows, AUDIENCE_SORT, request)

    async def audience_count(self) -> int:
        return await self._count(_AUDIENCE_COUNT)

    async def audiences_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids("audiences", ids)

    async def audience_pages_by_consumer_ids(
        self, consumer_ids: Sequence[str], request: PageRequest,
        columns: frozenset[str] | None = None,
    ) -> list[Page[Row[Any]]]:
        """`columns`: the audiences' columns read (None: all; see Reads._pages)."""
        return await self._pages("Consumer.audiences", _consumer_audiences_base, AUDIENCE_SORT,
                                 memberships.c.consumer_id, consumer_ids, request, columns)

    async def audience_counts_by_consumer_ids(self, consumer_ids: Sequence[str]) -> list[int]:
        return await self._counts(memberships.c.consumer_id, consumer_ids)
