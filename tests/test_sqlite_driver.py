"""The one-hop aiosqlite adapter (consumers_graphql.sqlite_driver) behaves as a DB-API cursor
for everything SQLAlchemy asks of it, and sends one call to the connection's thread per
statement. SQLite only: PostgreSQL uses asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers_graphql.db import make_engine
from consumers_graphql.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")  # type: ignore[arg-type]


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(settings, writer=True)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
    yield engine
    await engine.dispose()


class _CountingQueue:
    """Stands in for an aiosqlite connection's work queue, counting what is put on it."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.puts = 0

    def put_nowait(self, item: Any) -> None:
        self.puts += 1
        self.queue.put_nowait(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


async def test_statements_return_rows_counts_and_ids(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        inserted = await conn.execute(text("INSERT INTO t (v) VALUES (:v)"),
                                      [{"v": "a"}, {"v": "b"}, {"v": "c"}])  # executemany
        assert inserted.rowcount == 3
        one = await conn.execute(text("INSERT INTO t (v) VALUES ('d')"))
        assert one.lastrowid == 4
        returned = await conn.execute(text("UPDATE t SET v = v || '!' WHERE id > 2 "
                                           "RETURNING id, v"))
        assert sorted(returned.all()) == [(3, "c!"), (4, "d!")]
        deleted = await conn.execute(text("DELETE FROM t WHERE id = 1"))
        assert deleted.rowcount == 1
        rows = await conn.execute(text("SELECT id, v FROM t ORDER BY id"))
        assert list(rows.keys()) == ["id", "v"]
        assert rows.all() == [(2, "b"), (3, "c!"), (4, "d!")]
        assert (await conn.execute(text("SELECT v FROM t WHERE id = 99"))).first() is None


async def test_errors_are_sqlalchemy_errors_and_roll_back(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('x')"))
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (v) VALUES ('y')"))
            await conn.execute(text("INSERT INTO t (v) VALUES ('x')"))
    with pytest.raises(OperationalError, match="no such table"):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT * FROM missing"))
    async with engine.connect() as conn:
        # the failed transaction left nothing behind, and the connection still works
        assert (await conn.execute(text("SELECT v FROM t"))).scalars().all() == ["x"]


async def test_one_call_to_the_connection_thread_per_statement(
    settings: Settings, engine: AsyncEngine
) -> None:
    reader = make_engine(settings, writer=False)  # autocommit: no BEGIN is sent
    try:
        async with reader.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            counting = _CountingQueue(raw._tx)
            raw._tx = counting
            try:
                await conn.execute(text("SELECT 1"))
                await conn.execute(text("SELECT id, v FROM t"))
                assert counting.puts == 2
                await conn.rollback()  # no transaction is open: no call at all
                assert counting.puts == 2
            finally:
                raw._tx = counting.queue
    finally:
        await reader.dispose()
