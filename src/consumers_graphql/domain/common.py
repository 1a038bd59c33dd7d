"""What every write use-case shares: its one transaction, run again when it lost a race;
batch results; the errors several aggregates report.

Both faces (GraphQL and REST) call the use-cases (consumers, audiences, orders). Expected
failures are data: single writes raise ``DomainErrors`` (every problem of the input, each
with the path of its field), batch writes return them per item. Paths name the use-case's
parameters as the API spells them (``("input", "3", "email")``, ``("id",)``); a face may
re-root them.

Every use-case runs in one transaction that it owns (or, in a request sent with an
Idempotency-Key, in a SAVEPOINT of the request's one transaction: store/idempotency.py).
Uniqueness is enforced by unique indexes and checked first so that the usual conflict is a
clean error; when a concurrent writer wins the race between that check and the write
(possible on PostgreSQL, where writers do not queue), the index refuses the write, the
transaction is rolled back and run again, and the check then reports the conflict like any
other. On SQLite every write transaction starts with BEGIN IMMEDIATE, so writers queue on
the busy timeout and the checks cannot be overtaken.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, TypeVar, cast

from sqlalchemy import Table
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from consumers_graphql.domain.validation import BATCH_MAX, Path
from consumers_graphql.errors import DomainError, DomainErrors, ErrorCode
from consumers_graphql.store import models
from consumers_graphql.store.db import Database
from consumers_graphql.store.events import NewEvent, record_events
from consumers_graphql.store.idempotency import (
    conflicted,
    decided,
    joined_events,
    joined_session,
)

T = TypeVar("T")

consumers = cast(Table, models.Consumer.__table__)
audiences = cast(Table, models.Audience.__table__)
memberships = cast(Table, models.ConsumerAudience.__table__)
orders = cast(Table, models.Order.__table__)


# A transaction that lost a race is run again; each run sees the winner's committed rows,
# so a second run almost always settles it.
TRANSACTION_ATTEMPTS = 5
_RETRYABLE_SQLSTATES = frozenset({
    "23505",  # unique_violation: a concurrent insert of the same email, name, …
    "23503",  # foreign_key_violation: a referenced row deleted concurrently
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
})
_ONE_MICROSECOND = timedelta(microseconds=1)


class Omitted(Enum):
    """The value of an input field the caller did not send (as opposed to an explicit null)."""

    OMITTED = "omitted"


OMITTED = Omitted.OMITTED


class ErrorPolicy(Enum):
    """What a batch does when some items are bad."""

    REJECT_EVERYTHING = "REJECT_EVERYTHING"
    REJECT_FAILED_ROWS = "REJECT_FAILED_ROWS"


@dataclass
class ItemResult:
    """The outcome of one batch item: its row when written, else why not."""

    row: Row[Any] | None = None
    errors: list[DomainError] = field(default_factory=list)
    created: bool = False  # an upsert's: the row was inserted, not updated


@dataclass
class BatchResult:
    """One result per input item, in input order; ``errors`` repeats every item's errors and
    adds the batch's own (``BATCH_TOO_LARGE``)."""

    results: list[ItemResult]
    errors: list[DomainError]

    @property
    def count(self) -> int:
        return sum(1 for result in self.results if result.row is not None)


def not_found(path: Path, what: str) -> DomainError:
    return DomainError(f"No {what} has this id.", field=path, code=ErrorCode.NOT_FOUND)


def too_large(path: Path, count: int) -> DomainError:
    return DomainError(
        f"A batch takes at most {BATCH_MAX} items; {count} were given. Nothing was written.",
        field=path, code=ErrorCode.BATCH_TOO_LARGE,
    )


def duplicate(path: Path, what: str, first: str) -> DomainError:
    return DomainError(
        f"Same {what} as item {first} of this batch.", field=path,
        code=ErrorCode.DUPLICATE_IN_BATCH,
    )


def external_id_taken(path: Path, what: str) -> DomainError:
    return DomainError(f"An {what} with this externalId already exists.", field=path,
                       code=ErrorCode.EXTERNAL_ID_TAKEN)


def later(now: datetime, previous: datetime) -> datetime:
    """``now``, or just after ``previous`` should the clock not have moved past it."""
    return now if now > previous else previous + _ONE_MICROSECOND


def mark_duplicates(
    keys: Iterable[tuple[int, Any, Path]], what: str, errors: list[list[DomainError]]
) -> None:
    """Every repetition of a key after its first occurrence is DUPLICATE_IN_BATCH."""
    first_seen: dict[Any, int] = {}
    for index, key, path in keys:
        if key is None:
            continue
        if key in first_seen:
            errors[index].append(duplicate(path, what, str(first_seen[key])))
        else:
            first_seen[key] = index


class LostRace(Exception):
    """A write found the database other than its transaction's reads had it (a row inserted
    concurrently, between a SELECT and the write): the transaction is rolled back and run
    again, and the rerun reads the winner's row."""


# A deadlock or a serialization failure inside a keyed request's unit (store/idempotency.py).
_UNIT_CONFLICTS = frozenset({"40001", "40P01"})


def _sqlstate(error: DBAPIError) -> str | None:
    code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_race(error: DBAPIError) -> bool:
    if isinstance(error, IntegrityError):
        return True
    sqlstate = _sqlstate(error)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    # SQLite past its busy timeout: wait once more rather than fail.
    return "database is locked" in str(error.orig)


class Service:
    """A use-case holder over one database: each method runs in its own transaction."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def _record(self, session: AsyncSession, new: Sequence[NewEvent]) -> None:
        """The write's change events, in its transaction, as its last statements (see
        store/events.py): nothing when `new` is empty (a write that changed nothing). In a
        keyed request's unit, the unit records them at its end (idempotency.Unit.events)."""
        pending = joined_events(self._database)
        if pending is not None:
            pending.extend(new)
        else:
            await record_events(self._database, session, new)

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`work` in a transaction of its own; or, inside a request sent with an
        Idempotency-Key (store/idempotency.py), in a SAVEPOINT of the request's transaction,
        which commits with the key's record. Either way a lost race runs it again."""
        joined = joined_session(self._database)
        attempt = 1
        while True:
            try:
                if joined is not None:
                    pending = joined_events(self._database)
                    recorded = len(pending) if pending is not None else 0
                    try:
                        try:
                            async with joined.begin_nested():
                                result = await work(joined)
                        except BaseException:
                            if pending is not None:  # they went with the SAVEPOINT
                                del pending[recorded:]
                            raise
                    except DomainErrors as refused:
                        decided(self._database, _for_state(refused.errors))
                        raise
                    except DomainError as refused:
                        decided(self._database, _for_state([refused]))
                        raise
                    decided(self._database, not isinstance(result, BatchResult)
                            or result.count > 0 or _for_state(result.errors))
                    return result
                async with self._database.write_session() as session, session.begin():
                    return await work(session)
            except DBAPIError as error:
                if joined is not None and _sqlstate(error) in _UNIT_CONFLICTS:
                    # The locks in the cycle are the keyed request's transaction's, not this
                    # SAVEPOINT's: only running the whole request again can help.
                    conflicted(self._database)
                    raise
                if attempt >= TRANSACTION_ATTEMPTS or not is_race(error):
                    raise
                attempt += 1
            except LostRace:
                if attempt >= TRANSACTION_ATTEMPTS:
                    raise
                attempt += 1


# Refusals that depend on what the database holds, not on the input alone: a keyed request
# refused with one of them is recorded (store/idempotency.py's Unit.decided).
_STATE_CODES = frozenset({ErrorCode.EMAIL_TAKEN, ErrorCode.EXTERNAL_ID_TAKEN,
                          ErrorCode.NAME_TAKEN, ErrorCode.NOT_FOUND})


def _for_state(errors: Sequence[DomainError]) -> bool:
    return any(error.code in _STATE_CODES for error in errors)


def single(outcome: BatchResult) -> Row[Any]:
    if outcome.errors:
        raise DomainErrors(outcome.errors)
    row = outcome.results[0].row
    assert row is not None, "an item without errors is written"
    return row


def refused(count: int, error: DomainError) -> BatchResult:
    return BatchResult([ItemResult() for _ in range(count)], [error])
