"""Idempotency keys in the database: one request's write and its key in one transaction.

A request sent with an ``Idempotency-Key`` (web/idempotency.py has the HTTP side) runs as
one *unit*: a transaction on the write engine, opened before the request's work and
committed after it, with the key's row (the first answer's status, headers and body)
inserted last. Every use-case the request runs (``Service._transaction``, domain/common.py)
joins the unit instead of opening a transaction of its own, each in a SAVEPOINT so that its
run-again-after-a-lost-race logic still works; the request's reads (a mutation's payload,
REST's response shaping) run on the unit's connection (``Reader.join``), so they see its
uncommitted writes. The commit makes the writes and the key durable together: a crash
(``kill -9``) before it leaves neither, after it both.

Claiming a key, in the unit's transaction:
- in this process, a set of the keys being run answers IN_USE at once;
- on PostgreSQL, ``pg_try_advisory_xact_lock`` on a 64-bit hash of (API key id, key):
  another process or host running the same key holds it, and the request is IN_USE. A
  transaction-scoped lock, so it works behind pgbouncer in transaction mode, and is let go
  by the commit or rollback, a crash included;
- on SQLite, write transactions are serialised (BEGIN IMMEDIATE and the process's writer
  turn): another process's request waits for the first to commit, then finds its row;
- then the stored row, if any and not expired: the same request is replayed, another one is
  REUSED; otherwise the request runs. The unique index on (api_key_id, key) is the backstop:
  should two inserts still race, the loser rolls back and answers from the winner's row.

Expired rows are treated as absent, and deleted a few at a time (PRUNE_BATCH) by keyed
requests (at most one a second in each process, unless the last prune found a full batch),
in a short transaction of its own before the unit: no cron, and a bounded cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import BigInteger, Table, bindparam, delete, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from consumers_graphql.store import models
from consumers_graphql.store.db import Database, Reader
from consumers_graphql.store.events import NewEvent, record_events

idempotency_keys = cast(Table, models.IdempotencyKey.__table__)

# Expired rows a prune deletes, at most; and how often a process prunes, at most, unless
# its last prune found a full batch (then the next keyed request prunes again: it keeps up
# with any rate of keyed writes). A prune costs a transaction (0.7 ms on SQLite).
PRUNE_BATCH = 100
PRUNE_INTERVAL_S = 1.0
IN_USE = "IDEMPOTENCY_KEY_IN_USE"
REUSED = "IDEMPOTENCY_KEY_REUSED"

# The open unit of the request being run in this task (and the tasks it starts), if any.
_unit: ContextVar[Unit | None] = ContextVar("consumers_idempotency_unit", default=None)
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:lock_id)").bindparams(
    bindparam("lock_id", type_=BigInteger))


@dataclass
class Unit:
    database: Database
    session: AsyncSession
    # Whether a use-case ran in the unit to an outcome worth keeping: it wrote, or it
    # refused for what the database holds (a taken email, an unknown id). A unit without
    # one (refusals of the input itself only: an invalid email, a batch too large) wrote
    # nothing and would answer the same again: as Stripe does, its answer is not recorded,
    # so that the fixed request can be sent with the same key.
    decided: bool = False
    # Whether a use-case in the unit met a deadlock or a serialization failure: its locks
    # (an upsert's advisory locks, rows) belong to the unit's transaction, not to the
    # use-case's SAVEPOINT, so running the use-case again cannot help; the whole unit is
    # rolled back and the request runs again (IdempotencyStore.run).
    conflicted: bool = False
    # The change events of the use-cases run so far (store/events.py), inserted at the end
    # of the unit, with its key: on PostgreSQL under the commit-order lock, held from then
    # to the commit. Were each use-case to insert its own, the first one's lock would be
    # held through the others' work: every writer of the database would wait for the
    # unit's row locks, and a writer holding a row the unit wants, while waiting for the
    # lock, would close a deadlock with it.
    events: list[NewEvent] = field(default_factory=list)


def joined_session(database: Database) -> AsyncSession | None:
    """The session of the keyed request's open transaction on `database`, if the caller
    runs inside one: the use-case joins it (in a SAVEPOINT) instead of opening its own."""
    unit = _unit.get()
    return unit.session if unit is not None and unit.database is database else None


def joined_events(database: Database) -> list[NewEvent] | None:
    """The change events of the keyed request's unit on `database`, if the caller runs
    inside one: a use-case adds its own (and takes them back if its SAVEPOINT is rolled
    back); the unit records them at its end (see Unit.events)."""
    unit = _unit.get()
    return unit.events if unit is not None and unit.database is database else None


def conflicted(database: Database) -> bool:
    """Marks the keyed request's unit on `database`, if the caller runs inside one, as
    having met a deadlock (see Unit.conflicted); whether it did."""
    unit = _unit.get()
    if unit is None or unit.database is not database:
        return False
    unit.conflicted = True
    return True


def decided(database: Database, outcome: bool) -> None:
    """A use-case joined to the keyed request's unit on `database` is over: `outcome` says
    whether it wrote or refused for the database's state (see Unit.decided)."""
    unit = _unit.get()
    if unit is not None and unit.database is database and outcome:
        unit.decided = True


@dataclass(frozen=True)
class Answer:
    """A response as it is recorded and replayed: status, the headers of its own
    (content-type, location), body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replayed: bool = False


class Refusal(Exception):
    """The key cannot be used now (409 IN_USE) or for this request (422 REUSED)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# What the request's work gives back: its answer, and whether it may be recorded (an answer
# refused before the use-case ran, such as a malformed body, is not: nothing was done).
Work = Callable[[], Awaitable[tuple[Answer, bool]]]


def _lock_id(api_key_id: str, key: str) -> int:
    digest = hashlib.sha256(f"{api_key_id}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def now_utc() -> datetime:
    return models.utcnow()


# Runs of a keyed request whose unit met a deadlock (Unit.conflicted), the last one answered
# as it ends.
UNIT_ATTEMPTS = 5


class _Conflicted(Exception):
    """The unit met a deadlock: roll it back and run the request again."""


@dataclass
class IdempotencyStore:
    """The process's keyed requests: the database's table, and the keys running here."""

    database: Database
    keep: timedelta
    _running: set[tuple[str, str]] = field(default_factory=set)
    _next_prune: float = 0.0  # time.monotonic()

    async def run(self, api_key_id: str, key: str, fingerprint: str, reader: Reader,
                  work: Work) -> Answer:
        """The stored answer for (api_key_id, key) when `fingerprint` matches it (Refusal
        REUSED when not), Refusal IN_USE when the key runs elsewhere; else `work`'s answer,
        recorded with its writes when it may be and is under 500 (anything else, an
        exception included, rolls its writes back)."""
        slot = (api_key_id, key)
        if slot in self._running:
            raise Refusal(409, IN_USE, _IN_USE_MESSAGE)
        self._running.add(slot)
        try:
            now = time.monotonic()
            if now >= self._next_prune:
                # Claimed before the prune's first await: concurrent keyed requests do not
                # all prune (nor, should it fail, retry it at every request).
                self._next_prune = now + PRUNE_INTERVAL_S
                if await self.prune() == PRUNE_BATCH:
                    self._next_prune = 0.0
            try:
                for attempt in range(1, UNIT_ATTEMPTS + 1):
                    try:
                        return await self._run(api_key_id, key, fingerprint, reader, work,
                                               last=attempt == UNIT_ATTEMPTS)
                    except _Conflicted:
                        # Rolled back whole: the request runs again, after a pause of its
                        # own, so that the units of a cycle do not all meet again at once.
                        await asyncio.sleep(random.uniform(0.005, 0.05) * 2 ** attempt)
                raise AssertionError("the last attempt returns")
            except IntegrityError:
                # Another insert of this key won the race (the index's backstop): its answer.
                async with self.database.write_session() as session, session.begin():
                    found = await self._stored(session, api_key_id, key)
                if found is None:
                    raise
                return _replay(found, fingerprint)
        finally:
            self._running.discard(slot)

    async def _run(self, api_key_id: str, key: str, fingerprint: str, reader: Reader,
                   work: Work, *, last: bool) -> Answer:
        async with self.database.write_session() as session:
            transaction = await session.begin()
            try:
                if self.database.dialect == "postgresql":
                    locked = (await session.execute(
                        _TRY_LOCK, {"lock_id": _lock_id(api_key_id, key)})).scalar_one()
                    if not locked:
                        raise Refusal(409, IN_USE, _IN_USE_MESSAGE)
                found = await self._stored(session, api_key_id, key)
                if found is not None:
                    if found.created_at > now_utc() - self.keep:
                        return _replay(found, fingerprint)
                    await session.execute(  # expired: as if absent
                        delete(idempotency_keys).where(idempotency_keys.c.id == found.id))
                unit = Unit(self.database, session)
                answer, recordable = await self._work(unit, reader, work)
                if unit.conflicted and not last:
                    raise _Conflicted  # rolled back below
                if answer.status >= 500 or not recordable or not unit.decided:
                    return answer  # rolled back below (nothing written in the last case)
                await record_events(self.database, session, unit.events)
                await session.execute(insert(idempotency_keys).values(
                    api_key_id=api_key_id, key=key, fingerprint=fingerprint,
                    status=answer.status, headers=[list(pair) for pair in answer.headers],
                    body=answer.body, created_at=now_utc()))
                await transaction.commit()
                return answer
            finally:
                if transaction.is_active:
                    await transaction.rollback()

    async def _work(self, unit: Unit, reader: Reader, work: Work) -> tuple[Answer, bool]:
        async with self._joined(unit, reader):
            return await work()

    @asynccontextmanager
    async def _joined(self, unit: Unit, reader: Reader) -> AsyncIterator[None]:
        await reader.join(await unit.session.connection())
        token = _unit.set(unit)
        try:
            yield
        finally:
            _unit.reset(token)
            await reader.leave()

    async def _stored(self, session: AsyncSession, api_key_id: str, key: str) -> Any:
        table = idempotency_keys
        return (await session.execute(
            select(table.c.id, table.c.fingerprint, table.c.status, table.c.headers,
                   table.c.body, table.c.created_at)
            .where(table.c.api_key_id == api_key_id, table.c.key == key))).first()

    async def prune(self) -> int:
        """Deletes at most PRUNE_BATCH expired rows, oldest first, in a transaction of its
        own (on PostgreSQL skipping rows another prune has locked); the number deleted."""
        table = idempotency_keys
        oldest = (select(table.c.id).where(table.c.created_at <= now_utc() - self.keep)
                  .order_by(table.c.created_at).limit(PRUNE_BATCH))
        if self.database.dialect == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        async with self.database.write_session() as session, session.begin():
            result = await session.execute(
                delete(table).where(table.c.id.in_(oldest.scalar_subquery())))
        return int(getattr(result, "rowcount", 0) or 0)


_IN_USE_MESSAGE = ("A request with this Idempotency-Key is still running: retry after a "
                   "moment (with backoff) to get its answer.")


def _replay(found: Any, fingerprint: str) -> Answer:
    if found.fingerprint != fingerprint:
        raise Refusal(422, REUSED, "This Idempotency-Key was already used for another "
                      "request (method, path or body differ): use a new key for a new request.")
    headers = [(str(name), str(value)) for name, value in found.headers]
    return Answer(found.status, headers, bytes(found.body), replayed=True)
