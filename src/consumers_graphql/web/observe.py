"""What one HTTP request did, as the access line and the metrics report it: the faces and
the database fill in a `RequestFacts` kept in a context variable for the request (set by
web/access_log.py), so neither face knows of logging formats or of Prometheus.

Statements and their time are counted by SQLAlchemy's engine events on every engine of the
Database (`count_statements`), all of them: the API key look-up included."""

from __future__ import annotations

import re
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from consumers_graphql.store.db import Database

GRAPHQL, REST, OTHER = "graphql", "rest", "other"
# The operation type of a request that ran none (REST, health, a refusal before parsing).
NO_OPERATION = "none"
# A GraphQL Name, as the access line accepts it from a request (at most 100 characters).
_NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]{0,99}")
_STARTED = "consumers_statement_started"
# A body over its limit (413), refused by either face under the same code.
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
# A client too slow with its request head or body, answered 408 by the connection itself
# (web/connections.py): in a request's scope under TIMED_OUT when the app had the request,
# else reported through the hook the access log leaves in the server's lifespan state.
REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
TIMED_OUT = "consumers.request_timed_out"
TIMEOUT_HOOK = "consumers.report_request_timeout"
# A request the connection answered 400 itself (malformed, or its head or trailer fields
# over the limit; web/connections.py): in its scope under MALFORMED when the app had it,
# else reported through the hook the access log leaves in the server's lifespan state.
MALFORMED = "consumers.request_malformed"
MALFORMED_HOOK = "consumers.report_malformed_request"


@dataclass
class RequestFacts:
    face: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    operation_type: str = NO_OPERATION
    operation_name: str | None = None
    cost: int | None = None
    # The limit codes that refused the request (api/limits.py's, PAYLOAD_TOO_LARGE, TIMEOUT).
    refusals: list[str] = field(default_factory=list)
    statements: int = 0
    database_s: float = 0.0


current: ContextVar[RequestFacts | None] = ContextVar("request_facts", default=None)


def face_of(path: str) -> str:
    if path.rstrip("/") == "/graphql":
        return GRAPHQL
    if path.startswith("/api/"):
        return REST
    return OTHER


def refused(code: str) -> None:
    """The request was refused by the limit `code` (a constant of the code base: the
    metrics' label values stay few)."""
    facts = current.get()
    if facts is not None and code not in facts.refusals:
        facts.refusals.append(code)


def authenticated(key_id: str) -> None:
    facts = current.get()
    if facts is not None and key_id:
        facts.key_id = key_id


def operation(operation_type: str | None, name: str | None) -> None:
    facts = current.get()
    if facts is None:
        return
    facts.operation_type = operation_type or NO_OPERATION
    facts.operation_name = name if name is not None and _NAME.fullmatch(name) else None


def priced(cost: int) -> None:
    facts = current.get()
    if facts is not None:
        facts.cost = cost


def _before(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any,
            _many: Any) -> None:
    facts = current.get()
    if facts is not None:
        facts.statements += 1
        conn.info[_STARTED] = time.perf_counter()


def _after(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any,
           _many: Any) -> None:
    started = conn.info.pop(_STARTED, None)
    facts = current.get()
    if facts is not None and started is not None:
        facts.database_s += time.perf_counter() - started


def count_statements(database: Database) -> None:
    """Every statement the request's code sends, and the time until its result came back
    (a statement that fails is counted, not timed)."""
    for engine in database.engines:
        event.listen(engine, "before_cursor_execute", _before)
        event.listen(engine, "after_cursor_execute", _after)
