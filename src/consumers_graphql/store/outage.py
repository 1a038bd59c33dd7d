"""The database out of reach: which errors mean it, the 503 a client gets then, and one
warning per outage in the log (not a traceback per request), one line when it is back.

An outage is an error that says nothing about the request: no connection could be made or
kept (refused, reset, closed by a server shutting down), the pool had none to give in time,
or a SQLite file could not be opened or stayed locked past the busy timeout. Anything else
the database says (a constraint, a bad statement) is a bug or a client's mistake, and stays
an internal error."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

logger = logging.getLogger("consumers_graphql.db")

SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
GRAPHQL_MESSAGE = "The service is unavailable for a moment: retry after the Retry-After delay."
REST_MESSAGE = "Service unavailable"
# SQLSTATE classes of PostgreSQL that mean "no usable connection": connection exceptions
# (08…), operator intervention (57P…: shutting down, starting up), too many connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P", "53300")
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, what it wraps (a DBAPI error's `orig`) and what caused it, each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        pending += [current.__cause__, current.__context__,
                    orig if isinstance(orig, BaseException) else None]


def is_unavailable(error: BaseException | None) -> bool:
    if error is None:
        return False
    for cause in _causes(error):
        if isinstance(cause, PoolTimeout | OSError):  # the pool's wait, a socket's failure
            return True
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        if isinstance(cause, sqlite3.OperationalError) and str(cause) in _SQLITE_UNAVAILABLE:
            return True
    return False


def _describe(error: BaseException) -> str:
    """The innermost cause, by class and first line: a driver's words about the connection,
    never a statement or its parameters."""
    innermost = error
    for cause in _causes(error):
        if not isinstance(cause, DBAPIError):
            innermost = cause
    message = str(innermost).splitlines()[0][:200] if str(innermost) else ""
    return f"{type(innermost).__name__}: {message}" if message else type(innermost).__name__


class Outage:
    """Whether the database is out of reach, as the last requests found it."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self._since: float | None = None
        self._lock = threading.Lock()  # SQLite's connect events come from its own threads

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        logger.warning("database unavailable (%s): requests get 503 until it is back",
                       _describe(error))

    def recovered(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            logger.info("database available again, after %.1f s", time.monotonic() - since)
