"""Reads sent to asyncpg directly, past SQLAlchemy's per-statement work.

A read of the API (a page, a relation's pages, a look-up by id) is one of a few dozen
statements, each built once (store/pagination.py and store/queries/ cache them). Through
SQLAlchemy, every execution still pays ~0.1 ms of Python on top of asyncpg's own: the
statement's cache key, the compiled cache, an execution context, a greenlet hop to the
driver adapter and back, a cursor, a result. On PostgreSQL, without tracing, the Reader
(store/db.py) sends these reads to the pooled connection's asyncpg connection itself, with
what SQLAlchemy would send and giving what SQLAlchemy would give:

- the SQL is SQLAlchemy's own compilation of the statement for the engine's dialect, so
  asyncpg prepares (and caches) the same text; the parameters go through the same bind
  processors, in the compiled order;
- the rows are SQLAlchemy `Row`s, built with the columns' result processors
  (`UTCDateTime`, `Money`, ...), so `row.id`, `row._fields` and `row._mapping` are as
  before;
- the engine's `before_cursor_execute` and `after_cursor_execute` listeners are called (the
  access log's statement count and time, tests counting statements) with no cursor and no
  execution context, which only SQLAlchemy makes;
- an error goes through SQLAlchemy's own handling (`Connection._handle_dbapi_exception`):
  the driver's error translated as its adapter does, wrapped as a `DBAPIError`, a
  disconnect invalidating the connection and the pool, as any statement's would.

What a statement needs that only SQLAlchemy's execution does (parameters rendered into the
SQL at execution: expanding `IN`, `literal_execute`) keeps going through SQLAlchemy, as do
tracing's SQL spans (OpenTelemetry's instrumentation keeps each span on the execution
context) and a keyed write's reads (they run on its transaction's connection).

The SQLAlchemy internals used here (`_bind_processors`, `_result_columns`,
`_handle_dbapi_exception`, the asyncpg adapter's `_handle_exception`) are those of the
pinned minor version (pyproject.toml); tests/test_driver_reads.py holds every read shape to
the same rows through both paths, and the errors to the same classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy.engine import Connection, Dialect, Row
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.sql import Executable
from sqlalchemy.util.concurrency import greenlet_spawn

# Compiled statements kept at most; the API has a few dozen shapes (the page cache of
# store/pagination.py holds 512), so a full cache is emptied and filled again.
_CACHE_MAX = 1024
_REQUIRED = object()  # a parameter the call must give


class DriverStatement(NamedTuple):
    """A statement compiled once for asyncpg: its SQL, its parameters' names in order with
    their bind processors, and what makes its rows."""

    sql: str
    # each parameter's name, bind processor, and value when the call gives none (a value
    # bound in the statement itself: a limit, a literal)
    parameters: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]
    metadata: SimpleResultMetaData
    processors: Sequence[Any] | None

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        values = [params.get(name, default) for name, _process, default in self.parameters]
        if _REQUIRED in values:
            missing = [name for name, _p, default in self.parameters
                       if default is _REQUIRED and name not in params]
            raise KeyError(f"no value for the bound parameters {missing}")
        return [value if process is None else process(value)
                for value, (_name, process, _default) in zip(values, self.parameters,
                                                              strict=True)]

    def rows(self, records: Sequence[Any]) -> list[Row[Any]]:
        metadata, processors = self.metadata, self.processors
        key_to_index = metadata._key_to_index
        return [Row(metadata, processors, key_to_index, record) for record in records]


# by statement (a statement is hashed by identity, and kept alive here while cached); None:
# the statement is not for the driver
_compiled: dict[tuple[Executable, str], DriverStatement | None] = {}


def driver_statement(statement: Executable, dialect: Dialect) -> DriverStatement | None:
    """The statement compiled for the driver, or None when only SQLAlchemy's execution can
    send it."""
    key = (statement, dialect.name)
    try:
        return _compiled[key]
    except KeyError:
        pass
    if len(_compiled) >= _CACHE_MAX:
        _compiled.clear()
    prepared = _compiled[key] = _compile(statement, dialect)
    return prepared


def _compile(statement: Executable, dialect: Dialect) -> DriverStatement | None:
    if not statement.is_select:
        return None
    compiled: Any = cast(Any, statement).compile(dialect=dialect)
    if (compiled.literal_execute_params or compiled.post_compile_params
            or compiled.escaped_bind_names or compiled.positiontup is None):
        return None
    bind_processors = compiled._bind_processors
    binds = compiled.binds
    columns = compiled._result_columns
    processors = [column.type._cached_result_processor(dialect, None) for column in columns]
    return DriverStatement(
        sql=compiled.string,
        parameters=tuple(
            (name, bind_processors.get(name),
             _REQUIRED if binds[name].required else binds[name].effective_value)
            for name in compiled.positiontup),
        metadata=SimpleResultMetaData([column.keyname for column in columns]),
        processors=processors if any(processors) else None,
    )


async def raise_as_sqlalchemy(
    connection: Connection, error: Exception, statement: DriverStatement, args: list[Any]
) -> None:
    """Raises what SQLAlchemy raises for the driver's `error` on `connection`, and does what
    it does: a disconnect invalidates the connection (and the pool's older connections)."""
    adapted: Any = connection.connection.dbapi_connection
    try:
        adapted._handle_exception(error)  # raises the DBAPI adapter's translation
    except Exception as translated:
        await greenlet_spawn(connection._handle_dbapi_exception, translated, statement.sql,
                             tuple(args), None, None)
    raise error  # not reached: both raise
