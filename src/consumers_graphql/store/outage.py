"""The database out of reach: which errors mean it, the 503 a client gets then, and one
warning per outage in the log (not a traceback per request), one line when it is back.

An outage is an error that says nothing about the request: no connection could be made or
kept (refused, reset, closed by a server shutting down), the pool had none to give in time,
or a SQLite file could not be opened or stayed locked past the busy timeout. Anything else
the database says (a constraint, a bad statement) is a bug or a client's mistake, and stays
an internal error."""

from __future__ import annotations

import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
    """The error, then what it wraps (a DBAPI error's `orig`) or was raised from, outermost
    first, each once. Not `__context__`: an error raised while another was being handled
    (a fallback's re-run) says nothing about the first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


# A socket's failure (refused, reset, a name that does not resolve) or a timed-out wait for
# a connection; not any OSError (a missing file, a permission).
_UNAVAILABLE_ERRORS = (PoolTimeout, ConnectionError, socket.gaierror, TimeoutError)


def _unavailable_cause(error: BaseException | None) -> BaseException | None:
    """The deepest cause that says the database is out of reach, or None."""
    found: BaseException | None = None
    for cause in _causes(error) if error is not None else ():
        if _says_unavailable(cause):
            found = cause
    return found


def _says_unavailable(cause: BaseException) -> bool:
    if isinstance(cause, _UNAVAILABLE_ERRORS):
        return True
    if isinstance(cause, DBAPIError) and cause.connection_invalidated:
        return True
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
        return True
    return isinstance(cause, sqlite3.OperationalError) and str(cause) in _SQLITE_UNAVAILABLE


def is_unavailable(error: BaseException | None) -> bool:
    return _unavailable_cause(error) is not None


def error_class(error: BaseException) -> str:
    """The error by the driver's class and SQLSTATE, never its message (which can quote a
    user, a database or a host name): `InvalidCatalogNameError (SQLSTATE 3D000)`."""
    innermost = list(_causes(error))[-1]
    sqlstate = next((s for s in (getattr(c, "sqlstate", None) for c in _causes(error))
                     if isinstance(s, str)), None)
    name = type(innermost).__name__
    return f"{name} (SQLSTATE {sqlstate})" if sqlstate else name


# Set on an error raised by a statement (or a connection) sent to the read replica, so the
# replica's outage, not the primary's, hears of it (see `from_replica`).
_REPLICA = "_consumers_graphql_replica"


def mark_replica(error: BaseException) -> None:
    setattr(error, _REPLICA, True)


def from_replica(error: BaseException) -> bool:
    """Whether the error (or one it was raised from) came from the read replica."""
    return any(getattr(cause, _REPLICA, False) for cause in _causes(error))


def _describe(error: BaseException) -> str:
    """The deepest cause that says the database is out of reach, by class and first line: a
    driver's words about the connection, never a statement or its parameters."""
    cause = _unavailable_cause(error) or error
    if isinstance(cause, DBAPIError):  # SQLAlchemy's text quotes the statement
        cause = cause.orig if isinstance(cause.orig, BaseException) else cause
    text = str(cause)
    message = text.splitlines()[0][:200] if text else ""
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__


class Outage:
    """Whether a database (the primary, or the read replica) is out of reach, as the last
    requests found it. Each has its own: the primary's is ended by the primary's engines
    only, the replica's by the replica's, so a key check on the primary does not end the
    replica's outage."""

    def __init__(self, retry_after_s: int, name: str = "database",
                 consequence: str = "requests get 503") -> None:
        self.retry_after_s = retry_after_s
        self.name = name
        self.consequence = consequence
        self._since: float | None = None
        self._pool_wait = False  # the outage was a wait for the pool, which any checkout ends
        self._lock = threading.Lock()  # SQLite's connect events come from its own threads

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
            self._pool_wait = isinstance(_unavailable_cause(error), PoolTimeout)
        logger.warning("%s unavailable (%s): %s until it is back", self.name,
                       _describe(error), self.consequence)

    def recovered(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            logger.info("%s available again, after %.1f s", self.name,
                        time.monotonic() - since)

    def checked_out(self) -> None:
        """A connection came out of the pool without a check of the server: that ends an
        outage of waiting for the pool, not one of the server (a locked SQLite file)."""
        if self._since is None or not self._pool_wait:  # the common case, without the lock
            return
        self.recovered()


# PostgreSQL's SQLSTATEs for a server that answers but will not let this client in, and
# what to check for each.
_REFUSALS = {
    "28P01": "check the user name and password",  # invalid_password
    "28000": "check the user name and the server's pg_hba.conf",  # invalid authorization
    "3D000": "create the database (createdb NAME) or fix its name",  # invalid_catalog_name
    "42501": "grant this user access to the database",  # insufficient_privilege
    "53300": "the server has no free connection: lower CONSUMERS_POOL_SIZE or raise "
             "max_connections",
    "57P03": "the server is starting up: try again in a moment",
}


def explain_unreachable(error: BaseException, url: str) -> str | None:
    """Two lines for a command that could not reach the database at all (refused, no such
    host, no answer, refused credentials, no such database, a SQLite file that cannot be
    opened or written), naming the URL without its password; None for any other error."""
    reason = _reason(error)
    return None if reason is None else _unusable(url, *reason)


def missing_sqlite_directory(url: str) -> str | None:
    """The same two lines for a SQLite file whose directory does not exist, found before
    connecting: aiosqlite (0.22) answers a failed connection's stop after its error, on a
    thread, and when a command has ended its event loop by then that thread prints a
    traceback."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    path = Path(database.removeprefix("file:").split("?", 1)[0])
    if path.parent.is_dir():
        return None
    return _unusable(url, "its directory does not exist",
                     "create the directory, or check the path")


def _unusable(url: str, what: str, todo: str) -> str:
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        where = f"the SQLite file {parsed.database!r}"
    else:
        user = f"{parsed.username}@" if parsed.username else ""
        where = (f"{parsed.drivername}://{user}{parsed.host or 'localhost'}:"
                 f"{parsed.port or 5432}/{parsed.database or ''}")
    return (f"Cannot use the database at CONSUMERS_DATABASE_URL ({where}): {what}.\n"
            f"{todo[0].upper()}{todo[1:]}, or set CONSUMERS_DATABASE_URL to another database.")


def _reason(error: BaseException) -> tuple[str, str] | None:
    for cause in _causes(error):
        # a query parameter of the URL the driver has no argument for (`?application_name=`)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if isinstance(cause, TypeError) and unexpected:
            return (f"the driver takes no parameter {unexpected.group(1)!r} (from the URL's "
                    "query string)", "remove it from the URL (`sslmode=` is understood)")
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused", "check that PostgreSQL is running on that host and port"
        if isinstance(cause, socket.gaierror):
            return "the host name does not resolve", "check the host name"
        if isinstance(cause, TimeoutError | PoolTimeout):
            return "no answer in time", "check the host, the port and any firewall between"
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate in _REFUSALS:
            return _first_line(cause), _REFUSALS[sqlstate]
        if isinstance(sqlstate, str) and sqlstate.startswith("08"):
            return _first_line(cause), "check the host, the port and the server's settings"
        if isinstance(cause, sqlite3.OperationalError | sqlite3.DatabaseError):
            message = str(cause)
            if "unable to open database file" in message:
                return message, ("check that its directory exists and that this user may "
                                 "create files there")
            if "readonly" in message:
                return message, "let this user write the file and its directory"
            if "not a database" in message:
                return message, "point CONSUMERS_DATABASE_URL at a SQLite database file"
        if isinstance(cause, OSError) and cause.errno is not None and not isinstance(
                cause, FileNotFoundError | PermissionError):
            return (cause.strerror or type(cause).__name__).lower(), "check the host and port"
    return None


def _first_line(cause: BaseException) -> str:
    text = str(cause)
    return text.splitlines()[0][:200] if text else type(cause).__name__
