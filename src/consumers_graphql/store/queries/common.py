"""What the reads of every aggregate share: the tables and columns read, look-ups by id,
counts and pages per parent, each one statement whatever the number of keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, String, any_, bindparam, func, null, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Row

from consumers_graphql.store import models
from consumers_graphql.store.db import Reader
from consumers_graphql.store.pagination import (
    Page,
    PageRequest,
    SortKey,
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


def projected(columns: Sequence[ColumnElement[Any]], kept: frozenset[str] | None
              ) -> list[ColumnElement[Any]]:
    """`columns`, those not `kept` read as NULL under their own names (all of them when
    `kept` is None): a row keeps its shape, and a NULL is neither sent, decoded nor
    converted. A nested page reads only what its query selects (api/prefetch.py)."""
    if kept is None:
        return list(columns)
    return [c if c.key in kept else null().label(c.key) for c in columns]


# A `dialect` for one_of, either database's: the list is one key, bound alone. Most look-ups
# are of one key (`node(id:)`, `consumer(id:) { orders }`), and on PostgreSQL the array
# form's generic plan (a prepared statement's, from its sixth execution) is a bitmap scan
# sized for ten keys: twice the database's CPU of an index scan for one (a look-up by id:
# 167-257 against 83-103 µs an execution; bench/README.md, tenth round of issue 14).
ONE_KEY = "one key"


def keys_bound(ids: Sequence[str], dialect: str) -> tuple[str, Any]:
    """The one_of `dialect` for these ids, and what to bind for them (each id once)."""
    keys = list(set(ids))
    return (ONE_KEY, keys[0]) if len(keys) == 1 else (dialect, keys)


def one_of(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """`column` is one of the list bound as `name`. On PostgreSQL `= ANY(:name)`, one array
    parameter: the SQL is the same for any number of keys, so it is neither rendered again
    per call (an expanding IN is, id by id) nor prepared again per count by asyncpg. With
    ONE_KEY, `= :name`, a single key."""
    if dialect == ONE_KEY:
        # unbounded text, as the array's below: a longer key misses rather than matching
        # once cut to fit
        return column == bindparam(name, type_=String())
    if dialect == "postgresql":
        # An array of unbounded text, not of the column's VARCHAR(32): a cast to the
        # column's length would cut a longer key down (and then match) instead of missing.
        return column == any_(bindparam(name, type_=ARRAY(String())))
    return column.in_(bindparam(name, expanding=True))


@lru_cache(maxsize=16)
def by_ids_statement(table_name: str, dialect: str) -> Select[Any]:
    columns = _COLUMNS[table_name]
    return select(*columns).where(one_of(columns[0].table.c.id, "ids", dialect))


_PARENTS = {
    "consumer_audiences.audience_id": memberships.c.audience_id,
    "consumer_audiences.consumer_id": memberships.c.consumer_id,
    "orders.consumer_id": orders.c.consumer_id,
}


@lru_cache(maxsize=16)
def counts_statement(parent_name: str, dialect: str) -> Select[Any]:
    parent = _PARENTS[parent_name]
    return (
        select(parent, func.count())
        .where(one_of(parent, "parent_ids", dialect))
        .group_by(parent)
    )


_COLUMNS = {"consumers": CONSUMER_COLUMNS, "audiences": AUDIENCE_COLUMNS,
            "orders": ORDER_COLUMNS}


class Reads:
    """One request's connection, and the shapes every aggregate's reads share."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    @property
    def dialect(self) -> str:
        return self._reader.dialect

    @property
    def reader(self) -> Reader:
        """The request's connection (a keyed write joins it to its transaction)."""
        return self._reader

    def use_primary(self) -> None:
        """The request writes: read what it wrote from the primary (see Reader.use_primary)."""
        self._reader.use_primary()

    async def _rows(
        self, statement: Select[Any], params: dict[str, Any] | None = None, *,
        inline: bool = True,
    ) -> Sequence[Row[Any]]:
        """The rows of a statement built once and reused (cached): on PostgreSQL it is
        compiled once for the driver (store/driver_reads.py), per statement object."""
        return await self._reader.rows(statement, params, inline=inline)

    async def _count(self, statement: Select[Any], params: dict[str, Any] | None = None
                     ) -> int:
        """A count: one row of one value, which may take long (not on the loop)."""
        ((count,),) = await self._rows(statement, params, inline=False)
        return int(count)

    async def _pages(
        self,
        relation: str,
        base: Callable[[str, frozenset[str] | None], Select[Any]],
        sort: SortKey,
        parent: Any,
        parent_ids: Sequence[str],
        request: PageRequest,
        columns: frozenset[str] | None = None,
    ) -> list[Page[Row[Any]]]:
        """Pages of a relation for every parent at once; `base(dialect, kept)` selects the
        children of the parents bound as `parent_ids` (see one_of), with the parent as
        `_parent`, and of their columns only those `kept` (see projected). `columns`: those
        the caller reads (None: all); the id and the sort's are read in any case."""
        dialect, bound = keys_bound(parent_ids, self.dialect)
        kept = None if columns is None else columns | {
            "id", sort.column.name, sort.id_column.name}
        statement, params = page_statement((relation, dialect, kept),
                                           lambda: base(dialect, kept), sort,
                                           request, partition_by=parent)
        rows = await self._rows(statement, {**params, "parent_ids": bound})
        return assemble_pages(rows, parent_ids, "_parent", sort, request)

    async def _by_ids(self, table_name: str, ids: Sequence[str]) -> list[Row[Any] | None]:
        dialect, bound = keys_bound(ids, self.dialect)
        rows = await self._rows(by_ids_statement(table_name, dialect), {"ids": bound})
        by_id = {row.id: row for row in rows}
        return [by_id.get(key) for key in ids]

    async def _counts(self, parent: Any, keys: Sequence[str]) -> list[int]:
        dialect, bound = keys_bound(keys, self.dialect)
        statement = counts_statement(f"{parent.table.name}.{parent.name}", dialect)
        rows = await self._rows(statement, {"parent_ids": bound})
        counts = {key: count for key, count in cast("Sequence[Row[str, int]]", rows)}
        return [counts.get(key, 0) for key in keys]
