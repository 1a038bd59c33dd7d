"""Reads sent to asyncpg directly (store/driver_reads.py) give what SQLAlchemy's execution
gives: the same answers, rows, statements seen by listeners, errors, and the same fate for a
connection that failed or was cancelled under a statement. PostgreSQL only: SQLite's reads
always go through SQLAlchemy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event, func, literal_column, select, text
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError

from consumers_graphql.settings import Pooler, Settings
from consumers_graphql.store import models
from consumers_graphql.store.db import Database, UTCDateTime
from consumers_graphql.store.keys import AUTH_EXECUTION_OPTION
from consumers_graphql.store.outage import is_unavailable
from consumers_graphql.store.queries.common import ONE_KEY, by_ids_statement
from tests.conftest import GraphQL, StatementCounter
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)


@pytest.fixture(autouse=True)
def _postgresql_only(dialect: str) -> None:
    if dialect != "postgresql":
        pytest.skip("reads go to the driver directly on PostgreSQL only")


@pytest.fixture
def own_backend(settings: Settings) -> None:
    """The test follows the reader's connection to its server process."""
    if settings.database_pooler is Pooler.TRANSACTION:
        pytest.skip("behind a transaction pooler a client connection has no backend of its own")


@pytest.fixture
def database(app: FastAPI) -> Database:
    database: Database = app.state.database
    assert database.driver_reads  # on by default on PostgreSQL, tracing off
    return database


@pytest.fixture
def cursors(database: Database) -> Iterator[list[Any]]:
    """The cursor each statement of the API was sent with (the key's look-up apart): None
    for a read sent to the driver."""
    seen: list[Any] = []

    def record(_conn: Any, cursor: Any, _statement: Any, _params: Any, context: Any,
               _many: Any) -> None:
        if context is None or not context.execution_options.get(AUTH_EXECUTION_OPTION):
            seen.append(cursor)

    for engine in database.engines:
        event.listen(engine, "before_cursor_execute", record)
    yield seen
    for engine in database.engines:
        event.remove(engine, "before_cursor_execute", record)


async def given_data(engine: Any) -> list[dict[str, Any]]:
    consumers = [consumer_row(
        n, metadata={"tier": n % 3, "tags": ["a", n]} if n % 2 else None,
        phone=f"+4477009{n:05d}" if n % 3 else None,
        total_orders=n % 4, total_order_value=Decimal(f"{n}.1250"),
        last_order_at=None if n % 4 == 0 else BASE_TIME + timedelta(hours=n, microseconds=n),
        external_id=f"ext-{n}" if n % 5 else None,
    ) for n in range(30)]
    audiences = [audience_row(name, description="d" if name == "VIP" else None)
                 for name in ("VIP", "Newsletter")]
    await insert_consumers(engine, consumers)
    await insert_rows(engine, models.Audience, audiences)
    await insert_rows(engine, models.ConsumerAudience, [
        {"consumer_id": c["id"], "audience_id": a["id"], "created_at": BASE_TIME}
        for i, c in enumerate(consumers) for j, a in enumerate(audiences) if (i + j) % 2])
    await insert_rows(engine, models.Order, [
        order_row(c["id"], f"{k}.99", BASE_TIME + timedelta(days=k))
        for i, c in enumerate(consumers) for k in range(i % 7)])
    return consumers


FIELDS = """id email phone fullName metadata externalId totalOrders totalOrderValue
            lastOrderAt createdAt updatedAt"""

OPERATIONS: list[tuple[str, dict[str, Any]]] = [
    (f"""{{ consumers(first: 7) {{ totalCount pageInfo {{ hasNextPage endCursor }}
           nodes {{ {FIELDS}
             audiences {{ totalCount nodes {{ id name description createdAt
               consumers(first: 2) {{ nodes {{ id }} }} }} }}
             orders(first: 3) {{ pageInfo {{ hasNextPage hasPreviousPage }}
               nodes {{ id amount currency placedAt createdAt consumer {{ id }} }} }} }} }} }}""",
     {}),
    (f"""{{ consumers(last: 4, sortBy: LAST_ORDER_AT, sortDir: ASC) {{
           edges {{ cursor node {{ {FIELDS} }} }} }} }}""", {}),
    (f"""{{ consumers(first: 5, search: "user1") {{ totalCount nodes {{ {FIELDS} }} }}
           searchConsumers(q: "ser2", phone: "+447700900002") {{ nodes {{ id }} }} }}""", {}),
    ("""{ audiences(first: 5) { nodes { id name consumers(first: 4) { totalCount
           nodes { id totalOrderValue } } } } }""", {}),
]


async def test_answers_are_the_same_through_the_driver_and_sqlalchemy(
    gql: GraphQL, database: Database, write_engine: Any, cursors: list[Any],
    sql: StatementCounter,
) -> None:
    consumers = await given_data(write_engine)
    ids = [c["id"] for c in consumers[:6]]
    operations = [*OPERATIONS,
                  (f"{{ nodes(ids: {ids!r}) {{ id ... on Consumer {{ {FIELDS} }} }} }}"
                   .replace("'", '"'), {})]
    for query, variables in operations:
        cursors.clear()
        with sql.counting():
            driver = await gql(query, variables)
        driver_statements = list(sql.statements)
        assert "errors" not in driver, driver
        assert cursors and all(cursor is None for cursor in cursors), query

        database.driver_reads = False
        try:
            cursors.clear()
            with sql.counting():
                through_sqlalchemy = await gql(query, variables)
        finally:
            database.driver_reads = True
        assert cursors and all(cursor is not None for cursor in cursors)
        assert driver == through_sqlalchemy
        # the same statements, seen by the same listeners
        assert driver_statements == sql.statements


async def test_rows_and_their_types_are_sqlalchemys(
    database: Database, write_engine: Any
) -> None:
    consumers = await given_data(write_engine)
    statements = [
        (by_ids_statement("consumers", "postgresql"), {"ids": [c["id"] for c in consumers]}),
        (by_ids_statement("orders", "postgresql"), {"ids": ["ord_missing"]}),
        (by_ids_statement("consumers", ONE_KEY), {"ids": consumers[0]["id"]}),
        (by_ids_statement("orders", ONE_KEY), {"ids": "ord_missing"}),
        # bound in the statement itself, ±infinity made aware, a JSON value, no parameters
        (select(literal_column("'infinity'::timestamptz", UTCDateTime()).label("high"),
                literal_column("'-infinity'::timestamptz", UTCDateTime()).label("low"),
                func.coalesce(None, 7).label("seven"),
                literal_column("""'{"a": [1, 2.5, null]}'::json""", models.Consumer.metadata_.type)
                .label("json")), {}),
    ]
    for statement, params in statements:
        rows = await read(database, statement, params, driver_reads=True)
        expected = await read(database, statement, params, driver_reads=False)
        assert [row._fields for row in rows] == [row._fields for row in expected]
        assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
        assert [[type(value) for value in row] for row in rows] == [
            [type(value) for value in row] for row in expected]
        assert [row._mapping for row in rows] == [row._mapping for row in expected]
    assert rows[0].high == datetime.max.replace(tzinfo=UTC)
    assert rows[0].json == {"a": [1, 2.5, None]}


async def read(database: Database, statement: Any, params: dict[str, Any], *,
               driver_reads: bool) -> Sequence[Row[Any]]:
    database.driver_reads = driver_reads
    reader = database.reader()
    try:
        return await reader.rows(statement, params)
    finally:
        await reader.close()
        database.driver_reads = True


async def ended(engine: Any, pid: int) -> bool:
    """Whether the server process `pid` ends within 5 s."""
    for _ in range(250):
        async with engine.connect() as conn:
            if not (await conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": pid})).scalar_one():
                return True
        await asyncio.sleep(0.02)
    return False


@pytest.mark.usefixtures("own_backend")
async def test_a_killed_connection_is_an_outage_and_replaced(
    database: Database, write_engine: Any
) -> None:
    """The server ends the reader's connection under it (a restart, a killed backend): the
    read fails as SQLAlchemy's would (a DBAPIError marked as a disconnect, which the outage
    logic takes for one), the connection is not given out again, and the next read works."""
    consumers = await given_data(write_engine)
    statement = by_ids_statement("consumers", "postgresql")
    params = {"ids": [consumers[0]["id"]]}
    reader = database.reader()
    try:
        pid = (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with write_engine.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        assert await ended(write_engine, pid)
        with pytest.raises(DBAPIError) as raised:
            await reader.rows(statement, params)
        assert raised.value.connection_invalidated
        assert is_unavailable(raised.value)
        rows = await reader.rows(statement, params)  # on a new connection
        assert [row.id for row in rows] == [consumers[0]["id"]]
        assert (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await reader.close()


async def test_a_statement_error_is_sqlalchemys_and_keeps_the_connection(
    database: Database,
) -> None:
    """A statement the server refuses (here a division by zero) raises SQLAlchemy's
    DBAPIError subclass with the server's SQLSTATE, not marked as a disconnect; the
    connection stays the reader's."""
    statement = select(literal_column("1 / 0").label("x"))
    outcomes = []
    for driver_reads in (True, False):
        database.driver_reads = driver_reads
        reader = database.reader()
        try:
            pid = (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            with pytest.raises(DBAPIError) as raised:
                await reader.rows(statement)
            same = (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        finally:
            await reader.close()
            database.driver_reads = True
        assert not raised.value.connection_invalidated
        assert same == pid
        orig: Any = raised.value.orig
        outcomes.append((type(raised.value), orig.sqlstate))
    assert outcomes[0] == outcomes[1] == (outcomes[0][0], "22012")


@pytest.mark.usefixtures("own_backend")
async def test_a_cancelled_read_closes_its_connection(database: Database, write_engine: Any
                                                      ) -> None:
    """A read cancelled while the server runs it (a request's deadline, a failing sibling
    field): the connection goes back to the pool closed, as SQLAlchemy leaves it, and the
    server stops the statement; the reader's next read runs on another connection."""
    statement = select(func.pg_sleep(30).label("slept"))
    reader = database.reader()
    try:
        pid = (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        read = asyncio.ensure_future(reader.rows(statement))
        for _ in range(200):  # until the server runs it
            async with write_engine.connect() as conn:
                if (await conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid "
                        "AND query LIKE '%pg_sleep%' AND state = 'active'"),
                        {"pid": pid})).scalar_one():
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the read never reached the server")
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        assert await ended(write_engine, pid), "the cancelled read's connection is still open"
        assert (await reader.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await reader.close()
