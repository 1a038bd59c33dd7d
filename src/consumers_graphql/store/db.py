"""Engines, sessions and the column types that must behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from time import monotonic, thread_time
from typing import Any, cast

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Dialect,
    Engine,
    NullPool,
    Numeric,
    QueuePool,
    String,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import Result, Row
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql import Executable
from sqlalchemy.types import TypeDecorator

from consumers_graphql.settings import Pooler, Settings
from consumers_graphql.store import sqlite_driver
from consumers_graphql.store.driver_reads import (
    DriverStatement,
    driver_statement,
    raise_as_sqlalchemy,
)
from consumers_graphql.store.outage import Outage, error_class, from_replica, mark_replica

logger = logging.getLogger("consumers_graphql.db")

# How often (in SQLite virtual machine steps, some tens of microseconds) an inline read
# checks its time budget.
_PROGRESS_STEPS = 10_000

# Money is kept to four decimal places: enough for every ISO 4217 minor unit.
MONEY_SCALE = 4
_MONEY_FACTOR = Decimal(10) ** MONEY_SCALE
_MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_SCALE)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; ``timestamptz`` on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a UTC timestamp is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """process_result_value without its layers of calls (a page reads some 300 of
        these): on asyncpg, which decodes ``timestamptz`` into UTC datetimes itself
        whatever the session's time zone (tests/test_queries.py holds it to that), only
        its ``±infinity``, which it gives as naive datetime.max/min, made aware; the naive
        UTC text of SQLite given its zone as it is parsed."""
        if dialect.name == "postgresql" and dialect.driver == "asyncpg":
            return _aware
        impl = self.impl_instance.result_processor(dialect, coltype)
        if dialect.name != "sqlite" or impl is None:
            return super().result_processor(dialect, coltype)

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            parsed = cast(datetime, impl(value))
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)

        return process


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


class Money(TypeDecorator[Decimal]):
    """Exact decimals: NUMERIC on PostgreSQL, an integer count of 1/10,000 units on SQLite
    (whose NUMERIC is a float)."""

    impl = Numeric(19, MONEY_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(19, MONEY_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = Decimal(value)
        if dialect.name == "sqlite":
            return int((value * _MONEY_FACTOR).to_integral_exact())
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return (Decimal(int(value)) / _MONEY_FACTOR).quantize(_MONEY_QUANTUM)
        return Decimal(value).quantize(_MONEY_QUANTUM)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """process_result_value in one call per value. asyncpg gives NUMERIC as Decimal:
        quantized only (an expression's scale may differ from the column's)."""
        if dialect.name == "sqlite":
            def from_count(value: Any) -> Decimal | None:
                return None if value is None else Decimal(int(value)).scaleb(-MONEY_SCALE)

            return from_count
        if dialect.name == "postgresql" and dialect.driver == "asyncpg":
            def quantized(value: Any) -> Decimal | None:
                return None if value is None else value.quantize(_MONEY_QUANTUM)

            return quantized
        return super().result_processor(dialect, coltype)


def SortableText(length: int) -> String:
    """Text that orders byte-wise on both databases (PostgreSQL's "C" collation, SQLite's
    BINARY), so ordering never depends on the server's locale."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


def _json_text(value: Any) -> str:
    """JSON columns as orjson writes them: compact, ten times faster than the standard
    library (2.5 to 0.2 µs for a small object; a 500-row batch writes 400). Integers past
    64 bits, which orjson refuses, go through the standard library; NaN never gets here
    (metadata refuses it)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


# A run of digits orjson may read otherwise than the standard library: an integer past 64
# bits (orjson makes it a float). Looked for only in a text with that many digits in all
# (counted in C, a third of the search's time; most metadata has a handful).
_LONG_DIGITS = re.compile(r"\d{19}")
_NOT_DIGITS = bytes(byte for byte in range(256) if not 0x30 <= byte <= 0x39)


def _json_value(text: str) -> Any:
    """JSON columns read by orjson, four to ten times faster than the standard library (a
    page reads a metadata object per consumer), and by the standard library where the two
    could differ: a long integer (above), or what orjson refuses (a lone surrogate escape)."""
    if (len(text.encode().translate(None, _NOT_DIGITS)) < 19
            or _LONG_DIGITS.search(text) is None):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def make_engine(settings: Settings, *, writer: bool, url: str | None = None,
                probe: bool = False, outage: Outage | None = None) -> AsyncEngine:
    """An engine for the configured database (or `url`: the replica's).

    `probe`: an engine without a pool (each use opens a connection of its own, and closes
    it), for the readiness probe: requests holding every pooled connection must not make a
    busy process look like a database that is down (web/health.py).

    A pooled PostgreSQL engine checks the connections it hands out as ping_idle_connections
    says; `outage`, the database's (Database), is ended by a check that works.

    Reader engines run every statement in autocommit, so each sees the latest committed data
    and holds no snapshot or lock between statements. Writer engines open real transactions;
    on SQLite with BEGIN IMMEDIATE, so concurrent writers queue on the busy timeout instead of
    failing with "database is locked" when a read lock cannot be upgraded.
    """
    url = url or settings.database_url
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            echo=settings.sql_echo,
            hide_parameters=True,
            json_serializer=_json_text,
            json_deserializer=_json_value,
            connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000},
            **({"poolclass": NullPool} if probe else {}),
            # one thread hop per statement on aiosqlite (see sqlite_driver)
            **({"module": sqlite_driver.DBAPI()}
               if make_url(url).drivername == "sqlite+aiosqlite" else {}),
        )
        _configure_sqlite(engine, settings, begin="BEGIN IMMEDIATE" if writer else None)
        return engine
    engine = create_async_engine(
        url,
        echo=settings.sql_echo,
        # No personal data in logs: errors and echoed statements never show their values.
        hide_parameters=True,
        json_serializer=_json_text,
        json_deserializer=_json_value,
        **({"poolclass": NullPool} if probe else {
            "pool_size": settings.pool_size, "max_overflow": settings.pool_size}),
        connect_args=pooler_connect_args(settings),
        **({} if writer else {"isolation_level": "AUTOCOMMIT"}),
    )
    if not probe:  # (a probe's connections are new at every use)
        ping_idle_connections(engine, outage)
    return engine


# A pooled connection given back less than this long ago is handed out again without a ping
# (HikariCP's `aliveBypassWindowMs` is the same idea, at the same 500 ms).
POOL_PING_IDLE_S = 0.5
# In a pooled connection's `info` (emptied by SQLAlchemy when it reconnects): when it was last
# given back to the pool, in time.monotonic() seconds.
_RETURNED_AT = "consumers_graphql_returned_at"
# When a connection kept between requests (Lending) was kept: idle since then, whatever the
# pool's return says.
_KEPT_AT = "consumers_graphql_kept_at"
# How long connections kept between requests (Lending) outlive the last request in flight:
# a client that sends its requests one at a time (a BFF, a script) gets its previous
# request's connection, and a load in bursts keeps its connections from one burst to the
# next, instead of a checkout and a return through the pool per request.
LENDING_GRACE_S = 0.1


def ping_idle_connections(engine: AsyncEngine, outage: Outage | None = None) -> None:
    """SQLAlchemy's `pool_pre_ping`, paid only where it can find something: a round trip
    before a pooled connection is handed out if it has been idle for POOL_PING_IDLE_S or
    more, and for every checkout while `outage` is on (a ping that works ends it: a
    connection that merely left the pool proves nothing about the server). A connection the
    driver already knows to be closed (asyncpg's `is_closed()`: the server's goodbye seen by
    the event loop, as at a restart) is never handed out, at no cost. A connection that died
    in between is found by its request's statement, and that disconnect error makes
    SQLAlchemy replace every connection of the pool made before it (`invalidate_pool`), as
    the failed ping did. Either check failing raises InvalidatePoolError from the pool's
    `checkout` event: SQLAlchemy's documented pessimistic recipe, and what `pool_pre_ping`
    does itself (SQLAlchemy 2.0 and 2.1: the pool then reconnects once).

    Under load every connection is back in the pool within milliseconds: no ping at all,
    where `pool_pre_ping` cost a round trip per request (three for a writer's: BEGIN, the
    ping, ROLLBACK). Unlike `pool_pre_ping`'s, a failed ping here is not passed to
    `handle_error` listeners (the tracing one): it is not a statement of the request."""
    sync_engine = engine.sync_engine
    dialect = sync_engine.dialect

    def returned(_dbapi_connection: Any, record: Any) -> None:
        kept_at = record.info.pop(_KEPT_AT, None)
        record.info[_RETURNED_AT] = monotonic() if kept_at is None else kept_at

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver, "is_closed", None)  # asyncpg's; other drivers: ping only
        if is_closed is not None and is_closed():
            raise InvalidatePoolError("the connection was closed while in the pool")
        down = outage is not None and outage.down
        returned_at = record.info.get(_RETURNED_AT)
        if not down and (returned_at is None  # new: the connect just reached the server
                         or monotonic() - returned_at < POOL_PING_IDLE_S):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                raise InvalidatePoolError("the connection did not answer a ping") from error
            raise
        if outage is not None:
            outage.recovered()

    event.listen(sync_engine, "checkin", returned)
    event.listen(sync_engine, "checkout", checked_out)


def pooler_connect_args(settings: Settings) -> dict[str, Any]:
    """asyncpg's arguments for the pooler in front of PostgreSQL.

    Behind pgbouncer in transaction mode (before 1.21, which tracks prepared statements),
    consecutive transactions of one client connection, and in autocommit consecutive
    statements, run on whichever server connection is free. A prepared statement kept by
    name (asyncpg's statement cache, SQLAlchemy's prepared statement cache) then meets a
    server that never saw it ("does not exist") or one where another client used its name
    ("already exists"). With both caches off, asyncpg prepares unnamed statements and parses
    each again in the same message sequence as its execution (asyncpg 0.29+), so a
    statement never leaves its server connection. SQLAlchemy's documented recipe of unique
    names (`prepared_statement_name_func`) is not used: a named statement is prepared in
    one exchange and executed in the next, which in autocommit can land on another server
    (tests/test_pgbouncer.py shows it failing, like the caches).

    Nothing else here is session-scoped: no `server_settings` or `SET` on connect, no
    session-level advisory lock, LISTEN or temporary table; the explicit locks (`LOCK
    TABLE`, the first key; an upsert's `pg_advisory_xact_lock`s) are inside their
    transactions.
    """
    if settings.database_pooler is Pooler.TRANSACTION:
        return {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    return {}


def _configure_sqlite(engine: AsyncEngine, settings: Settings, *, begin: str | None) -> None:
    busy_ms = int(settings.sqlite_busy_timeout_ms)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver: BEGIN is emitted by the hook below only.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if begin is not None:  # a writer: its own checkpoints only as a backstop
            cursor.execute(f"PRAGMA wal_autocheckpoint={WalCheckpoints.BACKSTOP_PAGES}")
        cursor.close()

    if begin is not None:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)


class WalCheckpoints:
    """SQLite's write-ahead log is copied back into the database file (a checkpoint) by
    the commit that takes it past 1,000 pages: a 500-row batch, which writes about that
    many, paid 8 to 14 ms for it on every third commit. Here checkpoints run after each
    write transaction on a connection of their own, on a worker thread, while requests
    go on; one at a time, and a commit during one asks for one more. They are PASSIVE:
    they never wait for or block readers and writers. The writers still checkpoint by
    themselves past BACKSTOP_PAGES, should these fall behind."""

    BACKSTOP_PAGES = 10_000

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._connection: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False
        self.last: tuple[int, int, int] | None = None  # (busy, log pages, pages copied)

    @classmethod
    def for_settings(cls, settings: Settings) -> WalCheckpoints | None:
        """For a SQLite file (an in-memory database has no log), opened as SQLAlchemy's
        sqlite3 dialect opens the URL (`file:` URIs included)."""
        if not settings.is_sqlite:
            return None
        url = make_url(settings.database_url).set(drivername="sqlite+pysqlite")
        if url.database in (None, "", ":memory:"):
            return None
        args, kwargs = url.get_dialect()().create_connect_args(url)
        options: dict[str, Any] = {**kwargs, "timeout": 0, "isolation_level": None,
                                   "check_same_thread": False}
        database: Any = args[0]
        return cls(lambda: sqlite3.connect(database, **options))

    def request(self) -> None:
        if self._closed:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def idle(self) -> None:
        """Returns once no checkpoint runs or is asked for."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await asyncio.to_thread(self._checkpoint)
            except Exception:  # the writers' backstop still applies
                logger.exception("background WAL checkpoint failed")
                return
            if not self._again:
                return

    def _checkpoint(self) -> None:
        try:
            if self._connection is None:
                self._connection = self._connect()
            row = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as error:  # the writers' backstop still applies
            logger.warning("background WAL checkpoint failed: %s", error)
            return
        self.last = (row[0], row[1], row[2])
        if row[1] == -1:  # not in WAL mode: nothing to do, ever
            logger.warning("the SQLite database is not in WAL mode: no background checkpoints")
            self._closed = True

    async def close(self) -> None:
        self._closed = True
        await self.idle()
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class InlineReads:
    """SQLite reads on the event loop's own thread (see Reader): one read-only `sqlite3`
    connection for the process. A read never yields to the loop while it runs, so reads of
    concurrent requests follow one another on it; a read from another thread finding it in
    use is sent to the driver's thread instead of waiting."""

    def __init__(self, settings: Settings) -> None:
        url = make_url(settings.database_url)
        self.budget = settings.sqlite_inline_read_ms / 1000
        self.engine = create_engine(
            url.set(drivername="sqlite+pysqlite"),
            echo=settings.sql_echo,
            hide_parameters=True,
            json_serializer=_json_text,  # JSON columns as the driver's thread reads them
            json_deserializer=_json_value,
            # timeout 0: a locked database is an error at once (the statement then goes to
            # the driver's thread, which waits) rather than a sleep on the loop.
            connect_args={"check_same_thread": False, "timeout": 0},
            poolclass=QueuePool, pool_size=1, max_overflow=0,
        )

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA query_only=ON")  # reads only, whatever is sent

        self._connection: Connection | None = None
        self._in_use = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> InlineReads | None:
        """On SQLite, unless `sqlite_inline_read_ms` is 0."""
        return cls(settings) if settings.is_sqlite and settings.sqlite_inline_read_ms > 0 else None

    def execute(self, statement: Executable, params: dict[str, Any] | None) -> Result[Any] | None:
        """The statement's rows, all fetched, or None when it must go to the driver's thread:
        it ran out of its budget, met a lock, or the connection is busy on another thread."""
        if not self._in_use.acquire(blocking=False):
            return None
        try:
            return self._execute(statement, params)
        finally:
            self._in_use.release()

    def _execute(self, statement: Executable, params: dict[str, Any] | None) -> Result[Any] | None:
        if self._connection is None:
            self._connection = self.engine.connect()
        connection = self._connection
        raw = cast(sqlite3.Connection, connection.connection.driver_connection)
        raw.set_progress_handler(_budget(self.budget), _PROGRESS_STEPS)
        result: Result[Any] | None = None
        try:
            result = connection.execute(statement, params)
            if result.returns_rows:
                # Every row fetched now, within the budget, as SQLAlchemy's dialects do for
                # results that must outlive their cursor.
                result.cursor_strategy = FullyBufferedCursorFetchStrategy(result.cursor)
            return result
        except (OperationalError, sqlite3.OperationalError) as error:
            # SQLAlchemy wraps what execute() meets; the fetch raises sqlite3's own error.
            message = str(getattr(error, "orig", None) or error)
            if message == "interrupted" or "locked" in message:
                if result is not None:
                    result.close()
                return None
            self._discard()
            raise
        except BaseException:
            self._discard()
            raise
        finally:
            if self._connection is connection:  # not discarded
                raw.set_progress_handler(None, 0)

    def _discard(self) -> None:
        """After an unexpected error, start again from a new connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.invalidate()
            connection.close()

    def dispose(self) -> None:
        with self._in_use:
            if self._connection is not None:
                connection, self._connection = self._connection, None
                connection.close()
            self.engine.dispose()


def _budget(seconds: float) -> Callable[[], bool]:
    """sqlite3's progress handler for a read on the loop: true (interrupt) once the read
    has used `seconds` of the thread's CPU. CPU time, because what holds the loop is the
    statement's work: a pause of the whole process (another program on the core) must not
    make a short read run twice. The clock starts at the first call, _PROGRESS_STEPS into
    the statement: SQLAlchemy's compiling of a new statement shape is not the read's."""
    deadline: float | None = None

    def over() -> bool:
        nonlocal deadline
        now = thread_time()
        if deadline is None:
            deadline = now + seconds
            return False
        return now > deadline

    return over


class Database:
    """The process's engines: one for reads (autocommit), one for transactional writes, on
    SQLite one for reads on the event loop's thread, and with a replica one for reads there.

    `read_engine` serves the reads that are not part of a write: the replica's engine when
    one is configured, else `primary_engine`. `primary_engine` reads in autocommit on the
    primary: a request that wrote reads its payload there (Reader.use_primary), and API keys
    are verified there (a revoked key is refused within key_cache_seconds, whatever a
    replica's lag). Writes go to `write_engine`, on the primary.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One outage per database, each ended by its own engines' events only (a key check
        # on the primary says nothing of the replica): the primary's (`outage`), and the
        # replica's. Errors reach them through `failed`.
        self.outage = Outage(settings.retry_after_s)
        self.replica_outage = None if settings.database_replica_url is None else Outage(
            settings.retry_after_s, "read replica",
            "queries and REST GETs get 503 (writes go on, on the primary)")
        self.primary_engine = make_engine(settings, writer=False, outage=self.outage)
        self.replica_engine = (
            None if settings.database_replica_url is None
            else make_engine(settings, writer=False, url=settings.database_replica_url,
                             outage=self.replica_outage)
        )
        self.read_engine = self.replica_engine or self.primary_engine
        self.write_engine = make_engine(settings, writer=True, outage=self.outage)
        self.inline = InlineReads.for_settings(settings)
        # Reads sent to asyncpg directly (store/driver_reads.py); tracing turns it off, its
        # SQL spans being made by SQLAlchemy's execution.
        self.driver_reads = self.read_engine.dialect.driver == "asyncpg"
        # Request readers' connections handed from one request to the next (PostgreSQL).
        outages: dict[AsyncEngine, Outage | None] = {self.primary_engine: self.outage}
        if self.replica_engine is not None:
            outages[self.replica_engine] = self.replica_outage
        self.lending = Lending(outages) if self.driver_reads else None
        self.write_sessions = async_sessionmaker(self.write_engine, expire_on_commit=False)
        # SQLite has one writer at a time. The services' transactions (every GraphQL and
        # REST write) take turns here, first come first served, instead of in SQLite's busy
        # handler, which polls with growing sleeps and lets a late writer overtake one that
        # has waited for seconds (bench/: four concurrent 500-row batches over HTTP had a
        # p99 of 2.3 s). API key bookkeeping and other processes still meet the busy
        # timeout.
        self._writer_turn = asyncio.Lock() if settings.is_sqlite else None
        self.checkpoints = WalCheckpoints.for_settings(settings)
        # The readiness probe's engines, without a pool (see make_engine).
        self.primary_probe = (self.primary_engine if _in_memory(settings.database_url)
                              else make_engine(settings, writer=False, probe=True))
        self.replica_probe = (
            None if settings.database_replica_url is None
            else make_engine(settings, writer=False, url=settings.database_replica_url,
                             probe=True))
        # A database is back once a connection to it opens, or a write commits (a SQLite
        # file locked past the busy timeout opens fine), or a pooled connection is checked
        # out: PostgreSQL's pings it first while the outage lasts (ping_idle_connections,
        # set up by make_engine); on SQLite that only ends a wait for the pool. Events, so
        # no request pays a check.
        for outage, engines in self._outage_engines():
            reached = _ended_by(outage.recovered)
            for engine in engines:
                if settings.is_sqlite and engine is self.primary_probe.sync_engine:
                    continue  # opens a file at every probe, locked or not: that proves nothing
                event.listen(engine, "connect", reached)
                if settings.is_sqlite:
                    event.listen(engine, "checkout", _ended_by(outage.checked_out))
        event.listen(self.write_engine.sync_engine, "commit", _ended_by(self.outage.recovered))

    def _outage_engines(self) -> list[tuple[Outage, list[Engine]]]:
        primary = [self.primary_engine.sync_engine, self.write_engine.sync_engine]
        if self.primary_probe is not self.primary_engine:
            primary.append(self.primary_probe.sync_engine)
        if self.inline is not None:
            primary.append(self.inline.engine)
        pairs = [(self.outage, primary)]
        if self.replica_outage is not None:
            assert self.replica_engine is not None and self.replica_probe is not None
            pairs.append((self.replica_outage, [self.replica_engine.sync_engine,
                                                self.replica_probe.sync_engine]))
        return pairs

    def failed(self, error: BaseException) -> None:
        """An error that says a database is out of reach (outage.is_unavailable): the
        replica's outage when a replica's statement or connection raised it (Reader marks
        those), the primary's otherwise."""
        if self.replica_outage is not None and from_replica(error):
            self.replica_outage.failed(error)
        else:
            self.outage.failed(error)

    @property
    def dialect(self) -> str:
        return self.read_engine.dialect.name

    @property
    def engines(self) -> list[Engine]:
        """Every engine that sends statements (for listeners that count or log them)."""
        return [engine for _outage, engines in self._outage_engines() for engine in engines]

    def reader(self) -> Reader:
        """A reader of its own (a WebSocket's, a background job's)."""
        return Reader(self.read_engine, self.inline, primary=self.primary_engine,
                      driver_reads=self.driver_reads)

    def request_reader(self) -> Reader:
        """An HTTP request's reader, closed when the request ends: its connection may be
        the one a request that just ended kept, and may be kept for the next (Lending)."""
        return Reader(self.read_engine, self.inline, primary=self.primary_engine,
                      driver_reads=self.driver_reads, lending=self.lending)

    async def dispose(self) -> None:
        if self.lending is not None:
            await self.lending.close()
        try:
            if self.checkpoints is not None:
                await self.checkpoints.close()
        finally:
            await self.primary_engine.dispose()
            if self.replica_engine is not None:
                await self.replica_engine.dispose()
            if self.primary_probe is not self.primary_engine:
                await self.primary_probe.dispose()
            if self.replica_probe is not None:
                await self.replica_probe.dispose()
            await self.write_engine.dispose()
            if self.inline is not None:
                self.inline.dispose()

    @asynccontextmanager
    async def write_session(self) -> AsyncIterator[AsyncSession]:
        if self._writer_turn is None:
            async with self.write_sessions() as session:
                yield session
            return
        async with self._writer_turn, self.write_sessions() as session:
            yield session
        if self.checkpoints is not None:
            self.checkpoints.request()


def _ended_by(end: Callable[[], None]) -> Callable[..., None]:
    def listener(*_args: Any) -> None:
        end()

    return listener


def _in_memory(url: str) -> bool:
    """A SQLite database in memory: each connection would open another, empty, one."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and (
        parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed))


# How long `serve` waits for the replica at start (replica_problem).
REPLICA_START_TIMEOUT_S = 30.0


async def replica_problem(settings: Settings) -> str | None:
    """At start: None when there is no replica or it answers; else the problem, one line
    naming CONSUMERS_DATABASE_REPLICA_URL and the error's class (a bad password, a missing
    database or role, a host that does not resolve or answer), never its message or the
    URL. `serve` exits with it as a configuration error."""
    if settings.database_replica_url is None:
        return None
    engine = make_engine(settings, writer=False, url=settings.database_replica_url, probe=True)
    try:
        async with asyncio.timeout(REPLICA_START_TIMEOUT_S):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        return (f"The read replica (CONSUMERS_DATABASE_REPLICA_URL) did not answer within "
                f"{REPLICA_START_TIMEOUT_S:g} s.")
    except (DBAPIError, OSError) as error:
        return (f"Cannot connect to the read replica (CONSUMERS_DATABASE_REPLICA_URL): "
                f"{error_class(error)}.")
    finally:
        await engine.dispose()
    return None


class Lending:
    """Read connections handed from one request to the next, past the pool's checkout and
    return (PostgreSQL; issue 14).

    A checkout and a return through SQLAlchemy cost two greenlets, a `Connection`, the
    pool's events and its metrics: 45-60 µs of CPU here, a tenth of a look-up by id under
    load; for a client sending one request at a time, a fifth of the look-up's CPU served
    (bench/README.md, ninth round). A request's connection is wanted again within
    microseconds under load, or within milliseconds by a client's next request, so a
    request that ends keeps its connection here, and the next request takes it instead of
    checking one out. The pool still counts it checked out (and so do its metrics). Kept
    connections outlive the last request in flight by LENDING_GRACE_S: then, with no
    request in flight since, they all go back to the pool, so an idle process holds none.

    A kept connection is lent only where the pool would have handed it out without a ping:
    one kept POOL_PING_IDLE_S or more goes back to the pool as idle since it was kept, so
    the pool's next checkout of it pings it (ping_idle_connections); one whose server said
    goodbye (asyncpg's `is_closed()`) is invalidated; nothing is kept or lent while the
    database's outage is on (every checkout pings then). Nor is a connection SQLAlchemy has
    invalidated, or one in a transaction. Kept per engine (the primary and a replica),
    newest first."""

    def __init__(self, outages: dict[AsyncEngine, Outage | None]) -> None:
        self._outages = outages
        self._kept: dict[AsyncEngine, list[tuple[AsyncConnection, float]]] = {
            engine: [] for engine in outages}
        self._open = 0  # request readers not closed yet
        self._expiry: asyncio.TimerHandle | None = None  # the grace, once none is open
        self._returns: set[asyncio.Task[None]] = set()  # kept ones going back after it

    @property
    def kept(self) -> int:
        """Connections kept for a next request."""
        return sum(len(kept) for kept in self._kept.values())

    @property
    def returning(self) -> bool:
        """Whether kept connections are on their way back to the pool, after the grace."""
        return bool(self._returns)

    def opened(self) -> None:
        """A request reader opened: kept connections stay for it."""
        self._open += 1
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def closed(self) -> None:
        """A request reader closed: the last one in flight starts the grace."""
        self._open -= 1
        if self._open == 0 and self._expiry is None and self.kept:
            self._expiry = asyncio.get_running_loop().call_later(
                LENDING_GRACE_S, self._expire)

    def _expire(self) -> None:
        """The grace is over with no request in flight: every kept connection goes back."""
        self._expiry = None
        if released := self.release():
            task = asyncio.get_running_loop().create_task(_give_back_all(released))
            self._returns.add(task)
            task.add_done_callback(self._returned)

    def _returned(self, task: asyncio.Task[None]) -> None:
        """Kept connections went back after the grace (what failed is logged: nobody waits
        for the task)."""
        self._returns.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.warning("kept connections could not go back to the pool", exc_info=error)

    async def close(self) -> None:
        """The process is stopping: every kept connection back to the pool, now."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        returns, self._returns = self._returns, set()
        await asyncio.gather(*returns, return_exceptions=True)
        await _give_back_all(self.release())

    def take(self, engine: AsyncEngine) -> tuple[AsyncConnection | None,
                                                 list[AsyncConnection]]:
        """A kept connection of `engine` fit to lend (or None), and those found unfit,
        which the caller gives back to the pool."""
        kept = self._kept.get(engine)
        if not kept:
            return None, []
        outage = self._outages[engine]
        if outage is not None and outage.down:
            unfit = [conn for conn, _at in kept]
            kept.clear()
            return None, unfit
        conn, kept_at = kept.pop()
        if monotonic() - kept_at >= POOL_PING_IDLE_S:  # and every one kept before it
            unfit = [conn, *(older for older, _at in kept)]
            kept.clear()
            return None, unfit  # (the pool's next checkout of each pings it: `_KEPT_AT`)
        fairy = _pooled(conn)
        if fairy.driver_connection.is_closed():
            return None, [conn]
        del fairy.info[_KEPT_AT]
        return conn, []

    def keep(self, conn: AsyncConnection) -> bool:
        """Keeps a request's connection for the next request, when it is fit to lend."""
        engine = conn.engine
        kept = self._kept.get(engine)
        if kept is None or conn.invalidated or conn.in_transaction():
            return False
        outage = self._outages[engine]
        if outage is not None and outage.down:
            return False
        now = monotonic()
        # idle from now: a connection given back to the pool later counts from here
        _pooled(conn).info[_KEPT_AT] = now
        kept.append((conn, now))
        return True

    def release(self) -> list[AsyncConnection]:
        """Every kept connection, for the pool: the grace after the last request ended,
        or the process is stopping."""
        released = [conn for kept in self._kept.values() for conn, _at in kept]
        for kept in self._kept.values():
            kept.clear()
        return released


def _pooled(conn: AsyncConnection) -> Any:
    """A started connection's pooled DBAPI connection (SQLAlchemy's fairy): its `info`,
    its `driver_connection`."""
    return cast(Any, conn.sync_connection).connection


async def _give_back_all(connections: list[AsyncConnection]) -> None:
    """Kept connections back to the pool; one whose server is gone is invalidated."""
    for conn in connections:
        if _pooled(conn).driver_connection.is_closed():
            await _invalidate_and_close(conn)
        else:
            await conn.close()


class ReaderClosed(RuntimeError):
    """A statement sent after the request's reads were closed (a load nobody waits for)."""


class Reader:
    """One request's read connection: opened on first use, in autocommit (so a mutation's
    payload reads its own writes), and serialised, because DataLoaders dispatch concurrently
    and a connection runs one statement at a time.

    On SQLite a read first runs on the event loop's own thread, as the raw-driver baseline
    of bench/ does: most reads of a request (a keyset page, a page of each relation, a
    look-up by id) take a fraction of a millisecond, less than handing them to the driver's
    thread and back. A read still running after its budget of CPU time (checked every
    _PROGRESS_STEPS steps of SQLite's machine; time spent waiting for the disk is not
    counted) is interrupted by sqlite3's progress handler and run again on the driver's
    thread. A caller that knows a statement can be long (a total, a search, a filtered page)
    sends it there directly with `inline=False`.

    A caller cancelled while its statement runs (graphql-core cancels the siblings of a
    field that fails) leaves the connection invalidated by SQLAlchemy: it goes back to the
    pool at once and the next statement opens another, so the request's other fields go on.
    """

    def __init__(self, engine: AsyncEngine, inline: InlineReads | None = None, *,
                 primary: AsyncEngine | None = None, driver_reads: bool = False,
                 lending: Lending | None = None) -> None:
        self._engine = engine
        # a request's reader: its connection may come from, and go to, the one before and
        # after it (Lending); counted open until closed
        self._lending = lending
        if lending is not None:
            lending.opened()
        self._driver_reads = driver_reads
        self._primary = primary or engine
        self._conn: AsyncConnection | None = None
        self._inline = inline
        self._lock = asyncio.Lock()
        self._closed = False
        # A keyed write's transaction (web/idempotency.py), while it lasts: its reads must
        # see its uncommitted writes, so they run on its connection.
        self._unit: AsyncConnection | None = None

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def on_primary(self) -> bool:
        """Whether the next statement goes to the primary (always, without a replica)."""
        return self._engine is self._primary

    def use_primary(self) -> None:
        """The request writes: its later reads (a mutation's payload, the next mutation's)
        go to the primary, which has the write, not to a replica that may lag behind it.
        The replica's connection, if one is open, is given back before the next statement."""
        self._engine = self._primary

    async def join(self, unit: AsyncConnection) -> None:
        """Until `leave`: every statement runs on `unit`, the connection of the request's
        open write transaction (web/idempotency.py), so that a payload shows what the
        request wrote before it commits. Never inline (the loop's own connection cannot see
        the uncommitted rows), never closed here: the transaction's owner ends it. The
        request's own connection, if one is open, goes back to the pool."""
        async with self._lock:
            if self._conn is not None:
                await self._give_back(self._conn)
            self._unit = unit
            self._engine = self._primary

    async def leave(self) -> None:
        """The transaction `join` gave is over: statements go back to a connection of the
        reader's own."""
        async with self._lock:
            self._unit = None

    async def execute(
        self, statement: Executable, params: dict[str, Any] | None = None, *,
        inline: bool = True,
    ) -> Result[Any]:
        with self._marking_replica_errors():
            return await self._execute(statement, params, inline=inline)

    @contextmanager
    def _marking_replica_errors(self) -> Iterator[None]:
        """What the statement raises is marked as the replica's when it went there (for
        Database.failed: the replica's outage, not the primary's)."""
        on_replica = not self.on_primary
        try:
            yield
        except Exception as error:
            if on_replica:
                mark_replica(error)
            raise

    async def _execute(
        self, statement: Executable, params: dict[str, Any] | None, *, inline: bool,
    ) -> Result[Any]:
        async with self._lock:
            if self._closed:
                raise ReaderClosed("the request's reads are over")
            if self._unit is not None:
                return await self._unit.execute(statement, params)
            if inline and self._inline is not None:
                result = self._inline.execute(statement, params)
                if result is not None:
                    return result
            conn = await self._connection()
            try:
                return await conn.execute(statement, params)
            except asyncio.CancelledError:
                await self._give_back(conn)
                raise
            except Exception as error:
                await self._give_back_if_dropped(conn, error)
                raise

    async def rows(
        self, statement: Executable, params: dict[str, Any] | None = None, *,
        inline: bool = True,
    ) -> Sequence[Row[Any]]:
        """The statement's rows: sent to asyncpg directly where it can be
        (store/driver_reads.py), else as `execute` sends it."""
        if self._driver_reads and self._unit is None:
            prepared = driver_statement(statement, self._engine.dialect)
            if prepared is not None:
                with self._marking_replica_errors():
                    return await self._driver_rows(prepared, params or {})
        return (await self.execute(statement, params, inline=inline)).all()

    async def _driver_rows(self, prepared: DriverStatement, params: dict[str, Any]
                           ) -> Sequence[Row[Any]]:
        args = prepared.arguments(params)
        async with self._lock:
            if self._closed:
                raise ReaderClosed("the request's reads are over")
            conn = await self._connection()
            sync = conn.sync_connection
            assert sync is not None  # (started by connect)
            driver: Any = sync.connection.driver_connection
            # the engine's listeners (every one the app and the tests set is the engine's):
            # a Connection's own `dispatch` joins them anew for every connection
            dispatch = sync.engine.dispatch
            if dispatch.before_cursor_execute:
                dispatch.before_cursor_execute(sync, None, prepared.sql, args, None, False)
            try:
                records = await driver.fetch(prepared.sql, *args)
            except asyncio.CancelledError:
                # as SQLAlchemy does with a statement cancelled under it: the connection is
                # in an unknown state, so it is closed, not reused (shielded: a second
                # cancel must not keep it)
                self._conn = None
                await asyncio.shield(_invalidate_and_close(conn))
                raise
            except Exception as error:
                try:
                    await raise_as_sqlalchemy(sync, error, prepared, args)
                except Exception as raised:
                    await self._give_back_if_dropped(conn, raised)
                    raise
            if dispatch.after_cursor_execute:
                dispatch.after_cursor_execute(sync, None, prepared.sql, args, None, False)
        return prepared.rows(records)

    async def _connection(self) -> AsyncConnection:
        """The reader's own connection, opened on first use (under the lock)."""
        if self._conn is not None and self._conn.engine is not self._engine:
            await self._give_back(self._conn)  # a replica's, before use_primary()
        if self._conn is None:
            conn = None
            if self._lending is not None:
                conn, unfit = self._lending.take(self._engine)
                if unfit:
                    await asyncio.shield(_give_back_all(unfit))
            if conn is None:
                conn = await self._engine.connect()
            if self._closed:  # closed while we waited for the pool: ours to give back
                await self._give_back(conn)
                raise ReaderClosed("the request's reads are over")
            self._conn = conn
        return self._conn

    async def _give_back_if_dropped(self, conn: AsyncConnection, error: Exception) -> None:
        """After a failed statement: a connection dropped under it (a restart, a killed
        backend) goes back to the pool; the next statement opens another."""
        if conn.invalidated or (isinstance(error, DBAPIError) and error.connection_invalidated):
            await self._give_back(conn)

    async def _give_back(self, conn: AsyncConnection) -> None:
        """Forgets `conn` (the next statement opens another) and returns it to the pool,
        shielded: a second cancel must not keep it."""
        if self._conn is conn:
            self._conn = None
        await asyncio.shield(conn.close())

    async def close(self) -> None:
        """Gives the connection back once a statement still running on it (a DataLoader
        batch whose waiters were cancelled) is over; at once, dropping the connection, when
        the request itself is being cancelled (its deadline passed). A request's reader
        hands it to the next request (Lending)."""
        if self._closed:
            return
        self._closed = True
        lending, self._lending = self._lending, None
        try:
            await self._close(lending)
        finally:
            if lending is not None:
                lending.closed()

    async def _close(self, lending: Lending | None) -> None:
        if self._conn is None and not self._lock.locked():
            return
        task = asyncio.current_task()
        if self._lock.locked() and task is not None and task.cancelling():
            await self._drop()
            return
        try:
            await self._lock.acquire()
        except asyncio.CancelledError:
            await self._drop()
            raise
        try:
            conn, self._conn = self._conn, None
            if conn is not None and (lending is None or not lending.keep(conn)):
                await conn.close()
        finally:
            self._lock.release()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.shield(_invalidate_and_close(conn))


async def _invalidate_and_close(conn: AsyncConnection) -> None:
    await conn.invalidate()
    await conn.close()
