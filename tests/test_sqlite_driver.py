"""SQLite's two read paths: the one-hop aiosqlite adapter (consumers_graphql.store.sqlite_driver)
behaves as a DB-API cursor for everything SQLAlchemy asks of it and sends one call to the
connection's thread per statement; reads on the event loop's thread (db.Reader) hand a slow
statement to that thread. SQLite only: PostgreSQL uses asyncpg."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database, WalCheckpoints, make_engine


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


# -- reads on the event loop's thread (db.Reader) ------------------------------------------

_SLOW = text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) "
             "SELECT count(*) FROM n")


# Rows that each cost work to produce: the first comes at once, the rest while fetching.
_SLOW_ROWS = text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                  "WHERE i < 30000) SELECT i, (SELECT count(*) FROM t WHERE v <> i) FROM n")


def test_a_fully_buffered_result_fetches_every_row_when_it_is_made(tmp_path: Path) -> None:
    # db.InlineReads sets SQLAlchemy's FullyBufferedCursorFetchStrategy (an internal, hence
    # sqlalchemy <2.2) so that a read's rows are all fetched while its CPU budget watches,
    # and served from memory afterwards: this pins both halves.
    engine = create_engine(f"sqlite:///{tmp_path / 'buffered.db'}")
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE TABLE t (v TEXT)"))
            conn.execute(text("INSERT INTO t (v) VALUES ('a'), ('b'), ('c')"))
            result = conn.execute(text("SELECT v FROM t ORDER BY v"))
            result.cursor_strategy = FullyBufferedCursorFetchStrategy(result.cursor)
            assert result.cursor.fetchone() is None  # the cursor has nothing left
            assert result.scalars().all() == ["a", "b", "c"]

            raw = conn.connection.driver_connection
            assert raw is not None
            many = conn.execute(_SLOW_ROWS)  # its first row is there, the rest cost work
            raw.set_progress_handler(lambda: 1, 1_000)  # from now on: interrupted
            with pytest.raises(sqlite3.OperationalError, match="interrupted"):
                FullyBufferedCursorFetchStrategy(many.cursor)
            raw.set_progress_handler(None, 0)
            many.close()
    finally:
        engine.dispose()


def _recorded(database: Database) -> list[tuple[str, str]]:
    """(engine, statement) for every statement sent, by which engine."""
    sent: list[tuple[str, str]] = []
    names = {id(database.read_engine.sync_engine): "thread",
             id(database.write_engine.sync_engine): "write"}
    if database.inline is not None:
        names[id(database.inline.engine)] = "inline"
    for engine in database.engines:
        event.listen(engine, "before_cursor_execute",
                     lambda conn, _c, statement, *_a: sent.append(
                         (names[id(conn.engine)], statement)))
    return sent


async def test_reads_run_inline_and_slow_ones_move_to_the_driver_thread(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('a'), ('b')"))
    database = Database(settings.model_copy(update={"sqlite_inline_read_ms": 5.0}))
    sent = _recorded(database)
    reader = database.reader()
    try:
        rows = (await reader.execute(text("SELECT v FROM t ORDER BY v"))).all()
        assert [tuple(r) for r in rows] == [("a",), ("b",)]
        assert sent == [("inline", "SELECT v FROM t ORDER BY v")]

        sent.clear()  # over its 5 ms: interrupted, then run again on the driver's thread
        assert (await reader.execute(_SLOW)).scalar_one() == 300000
        assert [where for where, _ in sent] == ["inline", "thread"]

        sent.clear()  # a caller that knows a read is long sends it to the thread directly
        assert (await reader.execute(_SLOW, inline=False)).scalar_one() == 300000
        assert [where for where, _ in sent] == ["thread"]

        sent.clear()  # interrupted while its rows are fetched (the work is spread over them)
        many = await reader.execute(_SLOW_ROWS)
        assert len(many.all()) == 30_000
        assert [where for where, _ in sent] == ["inline", "thread"]

        sent.clear()  # the inline connection is fine after an interruption
        assert (await reader.execute(text("SELECT count(*) FROM t"))).scalar_one() == 2
        assert [where for where, _ in sent] == ["inline"]
    finally:
        await reader.close()
        await database.dispose()


async def test_inline_reads_cannot_write(settings: Settings, engine: AsyncEngine) -> None:
    database = Database(settings)
    reader = database.reader()
    try:
        with pytest.raises(OperationalError, match="readonly"):
            await reader.execute(text("INSERT INTO t (v) VALUES ('z')"))
    finally:
        await reader.close()
        await database.dispose()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0


async def test_no_inline_reads_when_switched_off(settings: Settings, engine: AsyncEngine) -> None:
    database = Database(settings.model_copy(update={"sqlite_inline_read_ms": 0}))
    assert database.inline is None
    sent = _recorded(database)
    reader = database.reader()
    try:
        assert (await reader.execute(text("SELECT 1"))).scalar_one() == 1
        assert sent == [("thread", "SELECT 1")]
    finally:
        await reader.close()
        await database.dispose()


async def test_a_locked_database_sends_the_read_to_the_driver_thread(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('a')"))
    # Another process holding the database exclusively: the inline read (no busy timeout,
    # it must not sleep on the loop) is refused at once, and the driver's thread, which
    # waits out the busy timeout, answers once the lock is gone.
    await engine.dispose()  # no other connection open: the holder can take the file
    path = str(settings.database_url).split("///", 1)[1]
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t (v) VALUES ('b')")
    holder.execute("COMMIT")  # exclusive mode keeps the lock until the connection closes
    database = Database(settings)
    sent = _recorded(database)
    reader = database.reader()
    asyncio.get_running_loop().call_later(0.2, holder.close)
    try:
        rows = (await reader.execute(text("SELECT v FROM t ORDER BY v"))).scalars().all()
        assert rows == ["a", "b"]
        assert [where for where, _ in sent] == ["inline", "thread"]
    finally:
        holder.close()
        await reader.close()
        await database.dispose()


async def test_write_transactions_are_checkpointed_off_the_commit(
    settings: Settings, engine: AsyncEngine
) -> None:
    database = Database(settings)
    checkpoints = database.checkpoints
    assert checkpoints is not None
    try:
        # the writers checkpoint by themselves only past the backstop
        async with database.write_engine.connect() as conn:
            pages = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
        assert pages == checkpoints.BACKSTOP_PAGES

        for n in range(3):
            async with database.write_session() as session, session.begin():
                await session.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"v{n}"})
        await checkpoints.idle()

        # every page of the log was copied back, by the background connection
        assert checkpoints.last is not None
        busy, log_pages, copied = checkpoints.last
        assert busy == 0 and log_pages > 0 and copied == log_pages
    finally:
        await database.dispose()
    with sqlite3.connect(settings.database_url.split("///", 1)[1]) as conn:
        assert conn.execute("SELECT v FROM t ORDER BY v").fetchall() == [("v0",), ("v1",), ("v2",)]


@pytest.mark.parametrize("url", ["postgresql+asyncpg://u@127.0.0.1/db",
                                 "sqlite+aiosqlite:///:memory:"])
def test_no_checkpoints_without_a_sqlite_file(url: str) -> None:
    assert WalCheckpoints.for_settings(Settings(database_url=url)) is None  # type: ignore[arg-type]


def test_checkpoints_open_a_file_uri_as_the_engines_do(tmp_path: Path) -> None:
    path = tmp_path / "uri.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES ('a')")
    url = f"sqlite+aiosqlite:///file:{path}?mode=rw&uri=true"
    checkpoints = WalCheckpoints.for_settings(Settings(database_url=url))  # type: ignore[arg-type]
    assert checkpoints is not None

    checkpoints._checkpoint()

    assert checkpoints.last is not None and checkpoints.last[1] >= 0  # the file, in WAL mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uri.db", "uri.db-shm", "uri.db-wal"]
