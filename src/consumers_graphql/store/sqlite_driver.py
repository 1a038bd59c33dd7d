"""SQLAlchemy's aiosqlite adapter, with one thread hop per statement instead of five.

aiosqlite runs each sqlite3 call on the connection's own thread; every call is a round trip
through a queue and the event loop's self-pipe. SQLAlchemy's adapter makes one per step of a
statement: open a cursor, execute, fetch all rows, close the cursor, and a rollback when the
connection goes back to the pool. Measured on W1 (`bench/`), those hops were about a tenth
of a request on SQLite.

Here a statement is one call on that thread: execute, read the description, fetch every row,
close, and the results are kept on the adapter's cursor, which is what SQLAlchemy's adapter
ends up holding anyway (it buffers every row of a non-streaming cursor). A rollback with no
transaction open is a no-op in sqlite3, so it is skipped without the hop.

Like SQLAlchemy's own adapter (see its `isolation_level` setter), this queues work on
aiosqlite's thread through the connection's `_tx` queue; `tests/test_sqlite_driver.py` pins
that contract. Streaming (server-side) cursors are SQLAlchemy's, unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_

_Outcome = tuple[Any, Sequence[Any], int, int | None]


class _Cursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_dbapi_connection) -> None:
        # No aiosqlite cursor is opened here: each statement opens and closes its own
        # sqlite3 cursor on the connection's thread.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]  # each statement opens its own
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]  # None before an INSERT, as sqlite3

    def execute(self, operation: Any, parameters: Any = None) -> None:
        self._run(False, operation, parameters)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> None:
        self._run(True, operation, seq_of_parameters)

    def _run(self, many: bool, operation: Any, parameters: Any) -> None:
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]  # typed as the DBAPI protocol

        def statement() -> _Outcome:
            cursor = raw.cursor()
            try:
                if many:
                    cursor.executemany(operation, parameters)
                elif parameters is None:
                    cursor.execute(operation)
                else:
                    cursor.execute(operation, parameters)
                description = cursor.description
                rows = cursor.fetchall() if description else ()
                return description, rows, cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()

        try:
            # What aiosqlite's own _execute checks: a closed connection is an error (which
            # SQLAlchemy's adapter turns into a lost connection), not a wait forever.
            if not connection._running:
                raise ValueError("no active connection")
            raw = connection._conn  # ValueError("no active connection") once closed
            future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
            connection._tx.put_nowait((future, statement))
            self._description, rows, self._rowcount, self._lastrowid = await_(future)
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self._rows = collections.deque(rows)

    async def _async_soft_close(self) -> None:
        return None  # everything is fetched and the sqlite3 cursor closed already

    def close(self) -> None:
        self._rows.clear()


class _Connection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = _Cursor

    def rollback(self) -> None:
        raw: sqlite3.Connection | None = self._connection._connection
        if raw is not None and raw.in_transaction:
            super().rollback()


class DBAPI(AsyncAdapt_aiosqlite_dbapi):
    """Pass as ``create_async_engine(url, module=DBAPI())`` for a ``sqlite+aiosqlite`` URL."""

    def __init__(self) -> None:
        super().__init__(aiosqlite, sqlite3)

    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        adapted = super().connect(*arg, **kw)
        return _Connection(self, adapted._connection)
