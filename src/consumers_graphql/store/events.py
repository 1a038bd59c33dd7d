"""Change events: an outbox written by every write in its own transaction, read in commit order.

Every use-case records the events of its write (``record_events``) in the transaction that
makes the write, so a rolled-back write leaves none and a committed one all of them. Readers
(Query.events, REST's ``/api/v1/events``, subscriptions) page through them by *position*.

Positions are in commit order: a reader that has seen position N never later sees a smaller
one appear. On SQLite that is free: write transactions are serialised (BEGIN IMMEDIATE), so
an AUTOINCREMENT key is drawn in commit order. On PostgreSQL, transactions commit out of the
order they draw sequence values in, so the events of a transaction are inserted last, right
after it takes a transaction-level advisory lock (EVENTS_LOCK): positions are drawn under
the lock, and the lock is let go only once the commit is visible (PostgreSQL releases a
transaction's locks after it marks it committed), so the next writer draws larger positions
only after this one's are visible. The price is that the *tails* of writing transactions
(the INSERT of the events and the commit) run one at a time; the rest of each transaction
runs concurrently. The alternative, ordering by transaction id and handing out only what
is older than the oldest running transaction (``pg_snapshot_xmin``), costs writers nothing
but holds every reader back behind the oldest open transaction of the whole cluster (an
idle session in a transaction, a long report, any database on the server): delivery would
have no bound. The README's "Change events" section has the numbers. Every committed row is
therefore safe to hand out, on both databases; a transaction-level lock also works behind
pgbouncer in transaction mode.

On PostgreSQL the transaction also sends ``pg_notify(NOTIFY_CHANNEL, payload)``, delivered
at its commit: the payload is the largest position it recorded, as decimal text (listeners
read the rows themselves). In this process, ``subscribe_commits`` callbacks run after any
transaction that recorded events has committed.

Retention: events are kept ``event_retention_days`` and then deleted, oldest position first,
PRUNE_BATCH at a time, by later writes (at most once per PRUNE_INTERVAL_S in each process):
no cron. Since only a prefix of the positions is ever deleted, a cursor whose event is still
there has nothing missing after it; a cursor whose event is gone, or older than retention,
is refused (BAD_USER_INPUT), never answered with a gap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Any, NewType, cast

from sqlalchemy import (
    BigInteger,
    Table,
    Text,
    bindparam,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable
from ulid import ULID

from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import IdKind, block_start, kind_of, sequential_ids
from consumers_graphql.store import models
from consumers_graphql.store.db import Database, Reader, UTCDateTime, _json_text
from consumers_graphql.store.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page

logger = logging.getLogger("consumers_graphql.events")

events = cast(Table, models.Event.__table__)



class EventType(StrEnum):
    """What changed (DESIGN.md's names). The subject is the consumer, order or audience."""

    CONSUMER_CREATED = "CONSUMER_CREATED"
    CONSUMER_UPDATED = "CONSUMER_UPDATED"
    CONSUMER_DELETED = "CONSUMER_DELETED"
    ORDER_RECORDED = "ORDER_RECORDED"
    ORDER_DELETED = "ORDER_DELETED"
    AUDIENCE_CREATED = "AUDIENCE_CREATED"
    AUDIENCE_UPDATED = "AUDIENCE_UPDATED"
    AUDIENCE_DELETED = "AUDIENCE_DELETED"
    AUDIENCE_MEMBERS_ADDED = "AUDIENCE_MEMBERS_ADDED"
    AUDIENCE_MEMBERS_REMOVED = "AUDIENCE_MEMBERS_REMOVED"


EVENT_TYPES: tuple[str, ...] = tuple(kind.value for kind in EventType)
_EVENT_TYPES = frozenset(EVENT_TYPES)

# Opaque to callers: compare them, keep them, give them back. (An integer underneath: the
# events table's key.)
Position = NewType("Position", int)

NOTIFY_CHANNEL = "consumers_events"

# Execution options that mark the statements of the outbox a write sends (EVENTS_: its
# events, one INSERT, on PostgreSQL after the lock) and the prune's (PRUNE_: at most once a
# PRUNE_INTERVAL_S): the tests count them apart from the write's own.
EVENTS_EXECUTION_OPTION = "consumers_events"
PRUNE_EXECUTION_OPTION = "consumers_events_prune"
_MARKED = {EVENTS_EXECUTION_OPTION: True}

# The transaction-level advisory lock every PostgreSQL transaction takes right before it
# inserts its events (see the module's docstring): a fixed 64-bit key of its own (idempotency
# keys and upserts lock 64-bit hashes and a two-key space, which it is unlikely to meet).
EVENTS_LOCK = 0x1E6B_4C0A_93F2_5D71
_LOCK = text("SELECT pg_advisory_xact_lock(:lock_id)").bindparams(
    bindparam("lock_id", type_=BigInteger)).execution_options(
        **{EVENTS_EXECUTION_OPTION: True})

# One prune at a time on PostgreSQL (transaction-scoped: let go at commit or rollback).
PRUNE_LOCK = EVENTS_LOCK + 1
_TRY_PRUNE_LOCK = text("SELECT pg_try_advisory_xact_lock(:lock_id)").bindparams(
    bindparam("lock_id", type_=BigInteger)).execution_options(
        **{PRUNE_EXECUTION_OPTION: True})

# Expired events a prune deletes, at most, and how often a process prunes, at most, unless
# its last prune found a full batch.
PRUNE_BATCH = 500
PRUNE_INTERVAL_S = 1.0
# Events are deleted this long after they leave retention, not at once: a cursor accepted
# just before its event leaves retention is read well before its event can be deleted.
PRUNE_GRACE = timedelta(minutes=5)

_CURSOR_SCOPE = "events"


@dataclass(frozen=True)
class EventRecord:
    position: Position
    id: str  # evt_…
    type: str  # one of EVENT_TYPES
    subject_id: str
    occurred_at: datetime
    data: dict[str, Any]  # the subject as REST shows it after the change (before: deletes)

    @property
    def cursor(self) -> str:
        return encode_cursor(self)


@dataclass(frozen=True)
class NewEvent:
    """An event a write records (record_events)."""

    type: str
    subject_id: str
    data: dict[str, Any]


# --- writing -----------------------------------------------------------------------------------


async def record_events(database: Database, session: AsyncSession,
                        new: Sequence[NewEvent], at: datetime | None = None) -> None:
    """Inserts `new` in `session`'s transaction, in one multi-row INSERT, as the last
    statements of the write: on PostgreSQL under EVENTS_LOCK, then the notification. Their
    ids sort in the order given; their time is `at` (the write's), else now."""
    if not new:
        return
    for item in new:
        if item.type not in _EVENT_TYPES:
            raise ValueError(f"unknown event type {item.type!r}")
    at = at or models.utcnow()
    ids = sequential_ids(IdKind.EVENT, block_start(at), len(new))
    # Before the lock (on PostgreSQL): the lock is held to the commit, and a prune needs
    # not be in the commit order.
    await _maybe_prune(database, session)
    connection = await session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql":
        await session.execute(_LOCK, {"lock_id": EVENTS_LOCK})
        # One statement whatever the count, prepared once: the columns as arrays (the JSON
        # as text, written by orjson), unnested in their order, which is the order the
        # positions are drawn in.
        await session.execute(_PG_INSERT, {
            "ids": ids, "types": [item.type for item in new],
            "subjects": [item.subject_id for item in new], "at": at,
            "data": [_json_text(item.data) for item in new]})
        # currval: the last position this session drew, the largest of the transaction's.
        await session.execute(_NOTIFY)
    else:
        # The statement written out once per row count, the parameters bound as SQLAlchemy
        # would bind them (the time once for all rows): 500 events in about 1 ms, where
        # compiling a 500-row `values([...])` takes tens.
        time_bind, json_bind = _sqlite_binds(dialect)
        when = time_bind(at) if time_bind is not None else at
        parameters: list[Any] = []
        for event_id, item in zip(ids, new, strict=True):
            parameters += (event_id, item.type, item.subject_id, when,
                           json_bind(item.data) if json_bind is not None else item.data)
        await connection.exec_driver_sql(_sqlite_insert(len(new)), tuple(parameters),
                                         execution_options=_MARKED)
    _mark(database, session.sync_session)


_PG_INSERT = text(
    "INSERT INTO events (id, type, subject_id, occurred_at, data) "
    "SELECT id, type, subject_id, :at, CAST(data AS json) FROM unnest("
    "CAST(:ids AS text[]), CAST(:types AS text[]), CAST(:subjects AS text[]), "
    "CAST(:data AS text[])) AS given (id, type, subject_id, data)"
).bindparams(bindparam("at", type_=UTCDateTime()),
             *(bindparam(name, type_=postgresql.ARRAY(Text()))
               for name in ("ids", "types", "subjects", "data"))
             ).execution_options(**_MARKED)
_NOTIFY = text(
    f"SELECT pg_notify('{NOTIFY_CHANNEL}', currval(pg_get_serial_sequence('events', "
    "'position'))::text)").execution_options(**_MARKED)


@lru_cache(maxsize=4)
def _sqlite_insert(count: int) -> str:
    return ("INSERT INTO events (id, type, subject_id, occurred_at, data) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?)"] * count))


@lru_cache(maxsize=2)
def _sqlite_binds(dialect: Any) -> tuple[Callable[[Any], Any] | None, ...]:
    return tuple(events.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                 for name in ("occurred_at", "data"))


# --- commit callbacks --------------------------------------------------------------------------

_callbacks: weakref.WeakKeyDictionary[Database, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary())
_RECORDED = "consumers_graphql.events.recorded"
_LISTENING = "consumers_graphql.events.listening"


def subscribe_commits(database: Database, callback: Callable[[], None]) -> Callable[[], None]:
    """`callback()` runs (on the event loop's thread, inside the commit: keep it short, e.g.
    set an asyncio.Event) after each transaction of this process on `database` that
    recorded events has committed. Returns the function that unsubscribes it."""
    callbacks = _callbacks.setdefault(database, [])
    callbacks.append(callback)

    def unsubscribe() -> None:
        with contextlib.suppress(ValueError):  # (unsubscribed twice)
            callbacks.remove(callback)

    return unsubscribe


def _mark(database: Database, session: Session) -> None:
    """Remembers that `session`'s transaction recorded events, so that its commit calls the
    callbacks (and a rollback forgets it)."""
    if _LISTENING not in session.info:
        session.info[_LISTENING] = True
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_rollback", _after_rollback)
    session.info[_RECORDED] = database


def _after_commit(session: Session) -> None:
    # Also dispatched when a SAVEPOINT is released (a use-case of a keyed request's unit):
    # only the commit of the whole transaction makes the events visible.
    if session.in_nested_transaction():
        return
    database = session.info.get(_RECORDED)
    session.info[_RECORDED] = None
    if database is None:
        return
    for callback in list(_callbacks.get(database, ())):
        try:
            callback()
        except Exception:  # one subscriber's bug must not fail the write that committed
            logger.exception("a commit callback of the events failed")


def _after_rollback(session: Session) -> None:
    # A SAVEPOINT rolled back leaves what the transaction recorded before it (a spurious
    # callback, should it have recorded nothing else, only makes a subscriber look).
    if not session.in_nested_transaction():
        session.info[_RECORDED] = None


# --- reading -----------------------------------------------------------------------------------

_COLUMNS = (events.c.position, events.c.id, events.c.type, events.c.subject_id,
            events.c.occurred_at, events.c.data)


def _record(row: Any) -> EventRecord:
    return EventRecord(Position(row.position), row.id, row.type, row.subject_id,
                       row.occurred_at, row.data)


async def _rows(database: Database, reader: Reader | None,
                *statements: Executable) -> list[Sequence[Row[Any]]]:
    """The rows of each statement: on the request's `reader` when given (the API's faces:
    its connection is given back when the request ends, whatever its fields do), else on a
    connection of the primary's (a notification announced an event: it is there)."""
    if reader is not None:
        return [(await reader.execute(statement)).all() for statement in statements]
    async with database.primary_engine.connect() as conn:
        return [(await conn.execute(statement)).all() for statement in statements]


def _filtered(statement: Any, types: Sequence[str] | None, subject_id: str | None) -> Any:
    if types is not None:
        statement = statement.where(events.c.type.in_(list(types)))
    if subject_id is not None:
        statement = statement.where(events.c.subject_id == subject_id)
    return statement


def _after(database: Database, after: Position | None, types: Sequence[str] | None,
           subject_id: str | None, limit: int) -> Any:
    statement = _filtered(select(*_COLUMNS).order_by(events.c.position).limit(limit),
                          types, subject_id)
    if after is None:
        return _in_retention(database, statement)
    return statement.where(events.c.position > after)


def _in_retention(database: Database, statement: Any) -> Any:
    """`statement` without the events past retention that are not pruned yet (PRUNE_GRACE):
    a cursor at one of them is refused, so a reader starting from the oldest event must not
    be handed one (its next page would be refused, and the one after starting again)."""
    return statement.where(events.c.occurred_at >= models.utcnow() - retention(database))


async def read_events(database: Database, *, after: Position | None,
                      types: Sequence[str] | None, subject_id: str | None,
                      limit: int) -> list[EventRecord]:
    """At most `limit` events after `after` (from the oldest in retention when None), in position
    order, of `types` (any when None) and about `subject_id` (any when None). Read on the
    primary, so that an event a notification announced is there. Every committed event is
    safe to hand out (the module's docstring says why)."""
    (rows,) = await _rows(database, None, _after(database, after, types, subject_id, limit))
    return [_record(row) for row in rows]


class EventPage(Page[EventRecord]):
    """A page of events: its cursors are the events' own."""

    def cursor(self, index: int) -> str:
        return self.items[index].cursor


async def page_of_events(database: Database, reader: Reader, *, first: int | None,
                         after: str | None, types: Sequence[str] | None,
                         subject_id: str | None) -> EventPage:
    """A page of the feed as every list of the API pages: `first` 0..MAX_PAGE_SIZE (default
    DEFAULT_PAGE_SIZE), after the cursor or event id `after`, with exact hasNextPage and
    hasPreviousPage; read on the request's `reader`. Bad arguments are BadUserInput
    naming them."""
    if first is None:
        first = DEFAULT_PAGE_SIZE
    elif not 0 <= first <= MAX_PAGE_SIZE:
        raise BadUserInput(f"`first` must be between 0 and {MAX_PAGE_SIZE}; {first} was given.",
                           field=["first"])
    position = await resolve_after(database, after, reader=reader) if after is not None else None
    statements = [_after(database, position, types, subject_id, first + 1)]
    if position is not None:
        statements.append(_filtered(
            select(events.c.position).where(events.c.position <= position).limit(1),
            types, subject_id))
    rows, *before = await _rows(database, reader, *statements)
    return EventPage([_record(row) for row in rows[:first]], has_next_page=len(rows) > first,
                     has_previous_page=bool(before and before[0]))


async def count_events(database: Database, reader: Reader, *, types: Sequence[str] | None,
                       subject_id: str | None) -> int:
    """How many events the filters keep, whatever the page (a connection's totalCount)."""
    ((row,),) = await _rows(database, reader, _in_retention(database, _filtered(
        select(func.count()).select_from(events), types, subject_id)))
    return int(row[0] or 0)


async def events_by_id(database: Database, ids: Sequence[str], reader: Reader | None = None
                       ) -> dict[str, EventRecord]:
    """The events of `ids` that are kept (for ``node(id: "evt_…")``)."""
    if not ids:
        return {}
    (rows,) = await _rows(database, reader, select(*_COLUMNS).where(events.c.id.in_(list(ids))))
    return {row.id: _record(row) for row in rows}


async def head(database: Database) -> Position | None:
    """The newest position (None: no event yet): "live from now" starts after it."""
    ((row,),) = await _rows(database, None, select(func.max(events.c.position)))
    return None if row[0] is None else Position(int(row[0]))


def retention(database: Database) -> timedelta:
    return timedelta(days=database.settings.event_retention_days)


async def resolve_after(database: Database, value: str, argument: str = "after", *,
                        reader: Reader | None = None) -> Position:
    """The position of `value`: an event id (``evt_…``) or a cursor of Query.events. A
    malformed value, an unknown one, or one whose event is older than retention (or gone)
    is BadUserInput (BAD_USER_INPUT) naming `argument`."""
    position: int | None = None
    if value.startswith(f"{IdKind.EVENT.value}_"):
        if kind_of(value) is not IdKind.EVENT:
            raise BadUserInput(f"`{argument}` is not a valid event id.", field=[argument])
        event_id, where = value, events.c.id == value
    else:
        position, event_id = _decode_cursor(value, argument)
        where = events.c.position == position
    lookup = select(events.c.position, events.c.id, events.c.occurred_at).where(where)
    (found,) = await _rows(database, reader, lookup)
    if not found and reader is not None and not reader.on_primary:
        # A replica behind the primary, where the value was handed out (a subscription,
        # another host's page): what follows it reaches the replica in commit order too.
        (found,) = await _rows(database, None, lookup)
    oldest = models.utcnow() - retention(database)
    row = found[0] if found else None
    if row is None or row.id != event_id:
        # A cursor's event is gone, not unknown, when its position is older than the oldest
        # kept (prunes delete a prefix); an id's, when it was made before the retention.
        pruned = False
        if position is not None:
            ((first_kept,),) = await _rows(database, reader, select(func.min(events.c.position)))
            pruned = first_kept[0] is not None and position < first_kept[0]
        if pruned or _made_at(event_id) < oldest:
            raise _expired(database, argument)
        raise BadUserInput(f"`{argument}` names no event.", field=[argument])
    if row.occurred_at < oldest:
        raise _expired(database, argument)
    return Position(int(row.position))


def _expired(database: Database, argument: str) -> BadUserInput:
    days = database.settings.event_retention_days
    return BadUserInput(
        f"`{argument}` is older than the event retention ({days} days): its events are no "
        f"longer kept. Start again without `{argument}`, from the oldest event kept.",
        field=[argument])


def _made_at(event_id: str) -> datetime:
    """When an event id was made (its ULID's time; an id is made with its event)."""
    try:
        return ULID.from_str(event_id.partition("_")[2]).datetime
    except ValueError:  # past the largest ULID: no event has it
        return datetime.max.replace(tzinfo=UTC)


def encode_cursor(record: EventRecord) -> str:
    payload = json.dumps([_CURSOR_SCOPE, record.position, record.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_cursor(token: str, argument: str) -> tuple[int, str]:
    invalid = BadUserInput(f"`{argument}` is not a valid cursor.", field=[argument])
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        scope, position, event_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise invalid from None
    if scope != _CURSOR_SCOPE:
        raise BadUserInput(
            f"`{argument}` is a cursor of another connection; cursors are only valid with "
            "the arguments they were made under.", field=[argument])
    if (type(position) is not int or not 0 < position < 2**63
            or not isinstance(event_id, str) or kind_of(event_id) is not IdKind.EVENT):
        raise invalid
    return position, event_id


# --- retention ---------------------------------------------------------------------------------

# When each database may next be pruned by this process (time.monotonic()).
_next_prune: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()


async def _maybe_prune(database: Database, session: AsyncSession) -> None:
    """At most once a PRUNE_INTERVAL_S per process (again at once after a full batch),
    deletes up to PRUNE_BATCH events past retention, in the write's transaction: the
    oldest positions first, so that only a prefix of the positions is ever deleted."""
    now = time.monotonic()
    if now < _next_prune.get(database, 0.0):
        return
    _next_prune[database] = now + PRUNE_INTERVAL_S
    deleted = await prune(database, session)
    if deleted == PRUNE_BATCH:
        _next_prune[database] = 0.0


async def prune(database: Database, session: AsyncSession) -> int:
    """Deletes at most PRUNE_BATCH of the oldest events, all before the first one still in
    retention (plus PRUNE_GRACE); the number deleted. Costs one indexed read of one row
    when there is nothing to delete."""
    cutoff = models.utcnow() - retention(database) - PRUNE_GRACE
    by_position = (select(events.c.position, events.c.occurred_at)
                   .order_by(events.c.position)
                   .execution_options(**{PRUNE_EXECUTION_OPTION: True}))
    first = (await session.execute(by_position.limit(1))).first()
    if first is None or first.occurred_at >= cutoff:
        return 0
    # The oldest positions up to the first event still kept: a prefix, never a hole.
    last = None
    for row in (await session.execute(by_position.limit(PRUNE_BATCH))).all():
        if row.occurred_at >= cutoff:
            break
        last = row.position
    assert last is not None, "the first row is past retention"
    if database.dialect == "postgresql" and not (await session.execute(
            _TRY_PRUNE_LOCK, {"lock_id": PRUNE_LOCK})).scalar_one():
        # Another transaction prunes: skip rather than wait for its rows with this write's
        # own row locks held.
        return 0
    result = await session.execute(delete(events).where(events.c.position <= last)
                                   .execution_options(**{PRUNE_EXECUTION_OPTION: True}))
    return int(getattr(result, "rowcount", 0) or 0)
