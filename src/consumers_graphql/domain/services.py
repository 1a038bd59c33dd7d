"""Write use-cases: consumers (single and batch), audiences and their members, orders.

Both faces (GraphQL and REST) call these. Expected failures are data: single writes raise
``DomainErrors`` (every problem of the input, each with the path of its field), batch writes
return them per item. Paths name the use-case's parameters as the API spells them
(``("input", "3", "email")``, ``("id",)``); a face may re-root them.

Every use-case runs in one transaction that it owns. Uniqueness is enforced by unique
indexes and checked first so that the usual conflict is a clean error; when a concurrent
writer wins the race between that check and the write (possible on PostgreSQL, where writers
do not queue), the index refuses the write, the transaction is rolled back and run again,
and the check then reports the conflict like any other. On SQLite every write transaction
starts with BEGIN IMMEDIATE, so writers queue on the busy timeout and the checks cannot be
overtaken.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from operator import itemgetter
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from ulid import ULID

from consumers_graphql.domain import validation
from consumers_graphql.domain.validation import BATCH_MAX, Path
from consumers_graphql.errors import DomainError, DomainErrors, ErrorCode
from consumers_graphql.ids import IdKind, is_id_of, new_id, sequential_ids
from consumers_graphql.store import models
from consumers_graphql.store.db import MONEY_SCALE, Database
from consumers_graphql.store.normalize import derived_fields, fold
from consumers_graphql.store.repository import AUDIENCE_COLUMNS, CONSUMER_COLUMNS, ORDER_COLUMNS

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


@dataclass(frozen=True)
class ConsumerFields:
    """A consumer's writable fields as sent; ``OMITTED`` where not sent. On create an omitted
    field is null; on update it is left unchanged and null clears it."""

    email: Any = OMITTED
    phone: Any = OMITTED
    full_name: Any = OMITTED
    metadata: Any = OMITTED
    external_id: Any = OMITTED


@dataclass(frozen=True)
class ConsumerChange:
    """One item of a batch update: which consumer, and what to change."""

    id: Any
    fields: ConsumerFields


@dataclass(frozen=True)
class AudienceFields:
    name: Any = OMITTED
    description: Any = OMITTED


@dataclass(frozen=True)
class OrderFields:
    consumer_id: Any
    amount: Any
    currency: Any
    placed_at: Any = OMITTED
    external_id: Any = OMITTED


@dataclass
class ItemResult:
    """The outcome of one batch item: its row when written, else why not."""

    row: Row[Any] | None = None
    errors: list[DomainError] = field(default_factory=list)


@dataclass
class BatchResult:
    """One result per input item, in input order; ``errors`` repeats every item's errors and
    adds the batch's own (``BATCH_TOO_LARGE``)."""

    results: list[ItemResult]
    errors: list[DomainError]

    @property
    def count(self) -> int:
        return sum(1 for result in self.results if result.row is not None)


# (public name, column, rule): the order in which problems are reported.
_CONSUMER_RULES: tuple[tuple[str, str, Callable[[Any, Path], Any]], ...] = (
    ("email", "email", validation.email),
    ("phone", "phone", validation.phone),
    ("fullName", "full_name", validation.full_name),
    ("metadata", "metadata", validation.metadata),
    ("externalId", "external_id", validation.external_id),
)
_CONSUMER_WRITABLE = tuple(column for _, column, _ in _CONSUMER_RULES)


def _not_found(path: Path, what: str) -> DomainError:
    return DomainError(f"No {what} has this id.", field=path, code=ErrorCode.NOT_FOUND)


def _too_large(path: Path, count: int) -> DomainError:
    return DomainError(
        f"A batch takes at most {BATCH_MAX} items; {count} were given. Nothing was written.",
        field=path, code=ErrorCode.BATCH_TOO_LARGE,
    )


def _duplicate(path: Path, what: str, first: str) -> DomainError:
    return DomainError(
        f"Same {what} as item {first} of this batch.", field=path,
        code=ErrorCode.DUPLICATE_IN_BATCH,
    )


def _email_taken(path: Path) -> DomainError:
    return DomainError("A consumer with this email already exists.", field=path,
                       code=ErrorCode.EMAIL_TAKEN)


def _external_id_taken(path: Path, what: str) -> DomainError:
    return DomainError(f"An {what} with this externalId already exists.", field=path,
                       code=ErrorCode.EXTERNAL_ID_TAKEN)


def _consumer_values(
    fields: ConsumerFields, path: Path
) -> tuple[dict[str, Any], list[DomainError]]:
    """The validated, normalised values of the fields sent (None for an explicit null)."""
    values: dict[str, Any] = {}
    errors: list[DomainError] = []
    for public, column, rule in _CONSUMER_RULES:
        raw = getattr(fields, column)
        if raw is OMITTED:
            continue
        if raw is None:
            values[column] = None
            continue
        try:
            values[column] = rule(raw, (*path, public))
        except DomainError as error:
            errors.append(error)
    return values, errors


def _later(now: datetime, previous: datetime) -> datetime:
    """``now``, or just after ``previous`` should the clock not have moved past it."""
    return now if now > previous else previous + _ONE_MICROSECOND


def _mark_duplicates(
    keys: Iterable[tuple[int, Any, Path]], what: str, errors: list[list[DomainError]]
) -> None:
    """Every repetition of a key after its first occurrence is DUPLICATE_IN_BATCH."""
    first_seen: dict[Any, int] = {}
    for index, key, path in keys:
        if key is None:
            continue
        if key in first_seen:
            errors[index].append(_duplicate(path, what, str(first_seen[key])))
        else:
            first_seen[key] = index


def _is_race(error: DBAPIError) -> bool:
    if isinstance(error, IntegrityError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    # SQLite past its busy timeout: wait once more rather than fail.
    return "database is locked" in str(error.orig)


class Services:
    """The write use-cases over one database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                async with self._database.write_session() as session, session.begin():
                    return await work(session)
            except DBAPIError as error:
                if attempt >= TRANSACTION_ATTEMPTS or not _is_race(error):
                    raise
                attempt += 1

    # -- consumers ------------------------------------------------------------------------

    async def create_consumer(self, fields: ConsumerFields) -> Row[Any]:
        outcome = await self._create_consumers(
            [fields], ErrorPolicy.REJECT_EVERYTHING, lambda _: ("input",)
        )
        return _single(outcome)

    async def create_consumers(
        self,
        items: Sequence[ConsumerFields],
        policy: ErrorPolicy = ErrorPolicy.REJECT_EVERYTHING,
    ) -> BatchResult:
        if len(items) > BATCH_MAX:
            return _refused(len(items), _too_large(("input",), len(items)))
        return await self._create_consumers(items, policy, lambda i: ("input", str(i)))

    async def _create_consumers(
        self,
        items: Sequence[ConsumerFields],
        policy: ErrorPolicy,
        item_path: Callable[[int], Path],
    ) -> BatchResult:
        values: list[dict[str, Any]] = []
        invalid: list[list[DomainError]] = []
        for index, fields in enumerate(items):
            item_values, item_errors = _consumer_values(fields, item_path(index))
            values.append({column: item_values.get(column) for column in _CONSUMER_WRITABLE})
            invalid.append(item_errors)
        # A repeat is reported whatever else is wrong with either item (an invalid value is
        # None here, so it repeats nothing).
        _mark_duplicates(
            ((i, fold(v["email"]), (*item_path(i), "email")) for i, v in enumerate(values)),
            "email", invalid,
        )
        _mark_duplicates(
            ((i, v["external_id"], (*item_path(i), "externalId"))
             for i, v in enumerate(values)),
            "externalId", invalid,
        )

        async def work(session: AsyncSession) -> BatchResult:
            errors = [list(item_errors) for item_errors in invalid]
            candidates = [i for i, item_errors in enumerate(errors) if not item_errors]
            taken_emails, taken_external_ids = await _taken_consumer_keys(
                session,
                [fold(values[i]["email"]) for i in candidates],
                [values[i]["external_id"] for i in candidates],
            )
            for i in candidates:
                if fold(values[i]["email"]) in taken_emails:
                    errors[i].append(_email_taken((*item_path(i), "email")))
                if values[i]["external_id"] in taken_external_ids:
                    errors[i].append(_external_id_taken((*item_path(i), "externalId"),
                                                        "consumer"))
            writable = [i for i, item_errors in enumerate(errors) if not item_errors]
            if policy is ErrorPolicy.REJECT_EVERYTHING and len(writable) < len(items):
                writable = []
            rows = await _insert_consumers(session, [values[i] for i in writable])
            results = [ItemResult(errors=item_errors) for item_errors in errors]
            for i, row in zip(writable, rows, strict=True):
                results[i].row = row
            return BatchResult(results, [e for item_errors in errors for e in item_errors])

        return await self._transaction(work)

    async def update_consumer(self, id: Any, fields: ConsumerFields) -> Row[Any]:
        outcome = await self._update_consumers(
            [ConsumerChange(id, fields)], ErrorPolicy.REJECT_EVERYTHING,
            id_path=lambda _: ("id",), item_path=lambda _: ("input",),
        )
        return _single(outcome)

    async def update_consumers(
        self,
        items: Sequence[ConsumerChange],
        policy: ErrorPolicy = ErrorPolicy.REJECT_EVERYTHING,
    ) -> BatchResult:
        if len(items) > BATCH_MAX:
            return _refused(len(items), _too_large(("input",), len(items)))
        return await self._update_consumers(
            items, policy,
            id_path=lambda i: ("input", str(i), "id"), item_path=lambda i: ("input", str(i)),
        )

    async def _update_consumers(
        self,
        items: Sequence[ConsumerChange],
        policy: ErrorPolicy,
        *,
        id_path: Callable[[int], Path],
        item_path: Callable[[int], Path],
    ) -> BatchResult:
        changes: list[dict[str, Any]] = []
        invalid: list[list[DomainError]] = []
        ids: list[str | None] = []  # None: not a consumer id
        for index, item in enumerate(items):
            item_changes, item_errors = _consumer_values(item.fields, item_path(index))
            if isinstance(item.id, str) and is_id_of(item.id, IdKind.CONSUMER):
                ids.append(item.id)
            else:
                ids.append(None)
                item_errors.insert(0, _not_found(id_path(index), "consumer"))
            changes.append(item_changes)
            invalid.append(item_errors)
        # A repeat is reported whatever else is wrong with either item.
        _mark_duplicates(((i, id, id_path(i)) for i, id in enumerate(ids)), "id", invalid)
        _mark_duplicates(
            ((i, fold(c.get("email")), (*item_path(i), "email"))
             for i, c in enumerate(changes)),
            "email", invalid,
        )
        _mark_duplicates(
            ((i, c.get("external_id"), (*item_path(i), "externalId"))
             for i, c in enumerate(changes)),
            "externalId", invalid,
        )

        async def work(session: AsyncSession) -> BatchResult:
            errors = [list(item_errors) for item_errors in invalid]
            candidates = [i for i, item_errors in enumerate(errors) if not item_errors]
            current = await _consumers_for_update(session, [items[i].id for i in candidates])
            proposed: dict[int, dict[str, Any]] = {}
            for i in candidates:
                row = current.get(items[i].id)
                if row is None:
                    errors[i].append(_not_found(id_path(i), "consumer"))
                    continue
                new = _apply_consumer_changes(row, changes[i], (*item_path(i), "metadata"))
                if isinstance(new, DomainError):
                    errors[i].append(new)
                elif any(new[column] != _current_value(row, column)
                         for column in _CONSUMER_WRITABLE):
                    proposed[i] = new
            await _check_consumer_uniqueness(
                session, items, current, proposed, errors, item_path
            )
            rejected = policy is ErrorPolicy.REJECT_EVERYTHING and any(errors)
            to_write = {} if rejected else {
                items[i].id: new for i, new in proposed.items() if not errors[i]
            }
            updated = await _write_consumer_changes(session, to_write, current)
            results = [ItemResult(errors=item_errors) for item_errors in errors]
            for i, result in enumerate(results):
                if not result.errors and not rejected:
                    id = items[i].id
                    result.row = updated[id] if id in updated else current[id]
            return BatchResult(results, [e for item_errors in errors for e in item_errors])

        return await self._transaction(work)

    async def delete_consumer(self, id: Any) -> Row[Any]:
        """Deletes the consumer with its memberships and orders; returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.CONSUMER):
            raise DomainErrors([_not_found(("id",), "consumer")])

        async def work(session: AsyncSession) -> Row[Any]:
            row = (await session.execute(
                select(*CONSUMER_COLUMNS).where(consumers.c.id == id).with_for_update()
            )).one_or_none()
            if row is None:
                raise DomainErrors([_not_found(("id",), "consumer")])
            await session.execute(delete(memberships).where(memberships.c.consumer_id == id))
            await session.execute(delete(orders).where(orders.c.consumer_id == id))
            await session.execute(delete(consumers).where(consumers.c.id == id))
            return row

        return await self._transaction(work)

    # -- audiences ------------------------------------------------------------------------

    async def create_audience(self, fields: AudienceFields) -> Row[Any]:
        values, errors = _audience_values(fields, creating=True)
        if errors:
            raise DomainErrors(errors)

        async def work(session: AsyncSession) -> Row[Any]:
            await _check_audience_name(session, values["name"], None)
            now = datetime.now(UTC)
            statement = insert(audiences).returning(*AUDIENCE_COLUMNS)
            return (await session.execute(statement, {
                "id": new_id(IdKind.AUDIENCE, now),
                "name": values["name"],
                "description": values.get("description"),
                "created_at": now,
                "updated_at": now,
            })).one()

        return await self._transaction(work)

    async def update_audience(self, id: Any, fields: AudienceFields) -> Row[Any]:
        values, errors = _audience_values(fields, creating=False)
        if not isinstance(id, str) or not is_id_of(id, IdKind.AUDIENCE):
            errors.insert(0, _not_found(("id",), "audience"))
        if errors:
            raise DomainErrors(errors)

        async def work(session: AsyncSession) -> Row[Any]:
            row = await _audience_for_update(session, id, ("id",))
            new = {column: values.get(column, getattr(row, column))
                   for column in ("name", "description")}
            if all(new[column] == getattr(row, column) for column in new):
                return row
            if new["name"] != row.name:
                await _check_audience_name(session, new["name"], id)
            statement = (
                update(audiences).where(audiences.c.id == id)
                .values(**new, updated_at=_later(datetime.now(UTC), row.updated_at))
                .returning(*AUDIENCE_COLUMNS)
            )
            return (await session.execute(statement)).one()

        return await self._transaction(work)

    async def delete_audience(self, id: Any) -> Row[Any]:
        """Deletes the audience and its memberships (not the consumers); returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.AUDIENCE):
            raise DomainErrors([_not_found(("id",), "audience")])

        async def work(session: AsyncSession) -> Row[Any]:
            row = await _audience_for_update(session, id, ("id",))
            await session.execute(delete(memberships).where(memberships.c.audience_id == id))
            await session.execute(delete(audiences).where(audiences.c.id == id))
            return row

        return await self._transaction(work)

    async def add_audience_consumers(
        self, audience_id: Any, consumer_ids: Sequence[Any]
    ) -> Row[Any]:
        """Makes the consumers members; those already members stay so. All or nothing."""
        static_errors = _membership_argument_errors(audience_id, consumer_ids)

        async def work(session: AsyncSession) -> Row[Any]:
            row = await _check_membership_targets(
                session, audience_id, consumer_ids, static_errors
            )
            members = set((await session.execute(
                select(memberships.c.consumer_id).where(
                    memberships.c.audience_id == audience_id,
                    memberships.c.consumer_id.in_(consumer_ids),
                )
            )).scalars())
            now = datetime.now(UTC)
            new = [{"consumer_id": c, "audience_id": audience_id, "created_at": now}
                   for c in consumer_ids if c not in members]
            if new:
                await session.execute(insert(memberships), new)
            return row

        return await self._transaction(work)

    async def remove_audience_consumers(
        self, audience_id: Any, consumer_ids: Sequence[Any]
    ) -> Row[Any]:
        """Ends the consumers' membership; those not members are left as they are."""
        static_errors = _membership_argument_errors(audience_id, consumer_ids)

        async def work(session: AsyncSession) -> Row[Any]:
            row = await _check_membership_targets(
                session, audience_id, consumer_ids, static_errors
            )
            await session.execute(delete(memberships).where(
                memberships.c.audience_id == audience_id,
                memberships.c.consumer_id.in_(consumer_ids),
            ))
            return row

        return await self._transaction(work)

    # -- orders ---------------------------------------------------------------------------

    async def record_order(self, fields: OrderFields) -> Row[Any]:
        """Records the order and brings the consumer's totals up to date with it."""
        values, errors = _order_values(fields)
        if errors:
            raise DomainErrors(errors)
        consumer_id = values["consumer_id"]

        async def work(session: AsyncSession) -> Row[Any]:
            problems: list[DomainError] = []
            if values["external_id"] is not None:
                taken = (await session.execute(
                    select(orders.c.id).where(orders.c.external_id == values["external_id"])
                )).first()
                if taken is not None:
                    problems.append(_external_id_taken(("input", "externalId"), "order"))
            consumer = await _consumer_for_totals(session, consumer_id)
            if consumer is None:
                problems.insert(0, _not_found(("input", "consumerId"), "consumer"))
            elif (consumer.total_order_value + values["amount"]
                  > validation.TOTAL_ORDER_VALUE_MAX):
                problems.append(validation.invalid(
                    ("input", "amount"),
                    "This order would take the consumer's totalOrderValue past "
                    f"{validation.TOTAL_ORDER_VALUE_MAX:,}.",
                ))
            if problems:
                raise DomainErrors(problems)
            assert consumer is not None
            now = datetime.now(UTC)
            placed_at = values["placed_at"] or now
            statement = insert(orders).returning(*ORDER_COLUMNS)
            order = (await session.execute(statement, {
                "id": new_id(IdKind.ORDER, now),
                "consumer_id": consumer_id,
                "amount": values["amount"],
                "currency": values["currency"],
                "placed_at": placed_at,
                "external_id": values["external_id"],
                "created_at": now,
            })).one()
            await _refresh_totals(session, consumer, now)
            return order

        return await self._transaction(work)

    async def delete_order(self, id: Any) -> Row[Any]:
        """Deletes the order and takes it out of the consumer's totals; returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.ORDER):
            raise DomainErrors([_not_found(("id",), "order")])

        async def work(session: AsyncSession) -> Row[Any]:
            owner = (await session.execute(
                select(orders.c.consumer_id).where(orders.c.id == id)
            )).scalar_one_or_none()
            # The consumer's row is locked before the order's, as everywhere: no deadlocks.
            consumer = None if owner is None else await _consumer_for_totals(session, owner)
            order = None if consumer is None else (await session.execute(
                delete(orders).where(orders.c.id == id).returning(*ORDER_COLUMNS)
            )).one_or_none()
            if consumer is None or order is None:
                raise DomainErrors([_not_found(("id",), "order")])
            await _refresh_totals(session, consumer, datetime.now(UTC))
            return order

        return await self._transaction(work)


# -- helpers that run inside a transaction -------------------------------------------------


def _single(outcome: BatchResult) -> Row[Any]:
    if outcome.errors:
        raise DomainErrors(outcome.errors)
    row = outcome.results[0].row
    assert row is not None, "an item without errors is written"
    return row


def _refused(count: int, error: DomainError) -> BatchResult:
    return BatchResult([ItemResult() for _ in range(count)], [error])


def _current_value(row: Row[Any], column: str) -> Any:
    return row._mapping[column]


async def _taken_consumer_keys(
    session: AsyncSession, email_keys: Sequence[str | None], external_ids: Sequence[str | None]
) -> tuple[set[str], set[str]]:
    """Which of these email keys and external ids belong to a consumer already."""
    wanted_emails = {key for key in email_keys if key is not None}
    wanted_external = {key for key in external_ids if key is not None}
    if not wanted_emails and not wanted_external:
        return set(), set()
    rows = (await session.execute(
        select(consumers.c.email_key, consumers.c.external_id).where(or_(
            consumers.c.email_key.in_(wanted_emails),
            consumers.c.external_id.in_(wanted_external),
        ))
    )).all()
    return ({row.email_key for row in rows} & wanted_emails,
            {row.external_id for row in rows} & wanted_external)


# A consumer as inserted: the columns of a read (CONSUMER_COLUMNS), by name and position.
_INSERTED_FIELDS = tuple(column.name for column in CONSUMER_COLUMNS)
_Inserted = namedtuple("_Inserted", _INSERTED_FIELDS)  # type: ignore[misc]  # names computed from the columns
_NO_MONEY = Decimal(0).quantize(Decimal(1).scaleb(-MONEY_SCALE))  # as Money reads it back
_COLUMN_NAMES = tuple(column.name for column in consumers.c)


async def _insert_consumers(
    session: AsyncSession, values: Sequence[dict[str, Any]]
) -> list[Any]:
    """One INSERT for all rows, rows returned in the order given. Every column's value is
    decided here (no database default applies), so the rows are these values, as a read
    would give them; RETURNING asks only for the ids, which keeps the batch one
    statement without reading 500 rows back through their type processors."""
    if not values:
        return []
    now = datetime.now(UTC)
    ids = sequential_ids(IdKind.CONSUMER, ULID.from_datetime(now), len(values))
    shared = {"total_orders": 0, "total_order_value": _NO_MONEY, "last_order_at": None,
              "created_at": now, "updated_at": now}  # the same for every row
    params = [
        {"id": id, **value, **shared,
         **derived_fields(value["email"], value["phone"], value["full_name"])}
        for id, value in zip(ids, values, strict=True)
    ]
    connection = await session.connection()
    if connection.dialect.name == "sqlite":
        result = await connection.exec_driver_sql(
            _sqlite_insert(len(params)), _sqlite_parameters(connection.dialect, params, shared)
        )
    else:  # SQLAlchemy's insertmanyvalues: one statement too
        result = await session.execute(insert(consumers).returning(consumers.c.id), params)
    if sorted(row[0] for row in result.all()) != ids:
        raise RuntimeError("the INSERT did not write one row per item")
    return [_Inserted(**{name: row[name] for name in _INSERTED_FIELDS}) for row in params]


# SQLite: the multi-row INSERT written out and its parameters bound here, through the very
# bind processors SQLAlchemy would use (so the values stored are the same), but those of
# the columns every row shares run once per batch instead of once per row, and no
# per-row parameter dictionary is built: 4 to 5 ms less for 500 rows (bench/ W5). 500 rows
# of 14 columns are 7,000 parameters, within SQLite's 32,766 (RETURNING already needs a
# SQLite newer than that limit).
@lru_cache(maxsize=4)
def _sqlite_insert(count: int) -> str:
    row = "(" + ", ".join("?" * len(_COLUMN_NAMES)) + ")"
    return (f"INSERT INTO consumers ({', '.join(_COLUMN_NAMES)}) VALUES "
            + ", ".join([row] * count) + " RETURNING id")


@lru_cache(maxsize=2)
def _bind_processors(dialect: Any) -> tuple[Callable[[Any], Any] | None, ...]:
    return tuple(column.type.dialect_impl(dialect).bind_processor(dialect)
                 for column in consumers.c)


def _sqlite_parameters(
    dialect: Any, params: Sequence[dict[str, Any]], shared: dict[str, Any]
) -> tuple[Any, ...]:
    processors = _bind_processors(dialect)
    constant: list[tuple[int, Any]] = []
    per_row: list[tuple[int, Callable[[Any], Any]]] = []
    for index, (name, process) in enumerate(zip(_COLUMN_NAMES, processors, strict=True)):
        if name in shared:
            constant.append((index, process(shared[name]) if process else shared[name]))
        elif process is not None:
            per_row.append((index, process))
    row_values = itemgetter(*_COLUMN_NAMES)
    flat: list[Any] = []
    for row in params:
        bound = list(row_values(row))
        for index, process in per_row:
            bound[index] = process(bound[index])
        for index, value in constant:
            bound[index] = value
        flat.extend(bound)
    return tuple(flat)


async def _consumers_for_update(
    session: AsyncSession, ids: Sequence[str]
) -> dict[str, Row[Any]]:
    if not ids:
        return {}
    statement = (
        select(*CONSUMER_COLUMNS).where(consumers.c.id.in_(ids))
        .order_by(consumers.c.id).with_for_update()
    )
    return {row.id: row for row in (await session.execute(statement)).all()}


def _apply_consumer_changes(
    row: Row[Any], changes: dict[str, Any], metadata_path: Path
) -> dict[str, Any] | DomainError:
    """The consumer's writable columns after the changes (metadata merged shallowly)."""
    new = {column: _current_value(row, column) for column in _CONSUMER_WRITABLE}
    for column, value in changes.items():
        if column == "metadata" and value is not None:
            value = validation.merge_metadata(new["metadata"], value)
            try:
                validation.check_metadata_size(value, metadata_path)
            except DomainError as error:
                return error
        new[column] = value
    return new


async def _check_consumer_uniqueness(
    session: AsyncSession,
    items: Sequence[ConsumerChange],
    current: dict[str, Row[Any]],
    proposed: dict[int, dict[str, Any]],
    errors: list[list[DomainError]],
    item_path: Callable[[int], Path],
) -> None:
    """EMAIL_TAKEN / EXTERNAL_ID_TAKEN for changes that take a key another consumer has."""
    email_changes: dict[int, str] = {}
    external_changes: dict[int, str] = {}
    for i, new in proposed.items():
        row = current[items[i].id]
        key = fold(new["email"])
        if key is not None and key != row.email_key:
            email_changes[i] = key
        if new["external_id"] is not None and new["external_id"] != row.external_id:
            external_changes[i] = new["external_id"]
    if not email_changes and not external_changes:
        return
    owners = (await session.execute(
        select(consumers.c.id, consumers.c.email_key, consumers.c.external_id).where(or_(
            consumers.c.email_key.in_(set(email_changes.values())),
            consumers.c.external_id.in_(set(external_changes.values())),
        ))
    )).all()
    email_owner = {row.email_key: row.id for row in owners if row.email_key is not None}
    external_owner = {row.external_id: row.id for row in owners if row.external_id is not None}
    for i, key in email_changes.items():
        if email_owner.get(key, items[i].id) != items[i].id:
            errors[i].append(_email_taken((*item_path(i), "email")))
    for i, key in external_changes.items():
        if external_owner.get(key, items[i].id) != items[i].id:
            errors[i].append(_external_id_taken((*item_path(i), "externalId"), "consumer"))


async def _write_consumer_changes(
    session: AsyncSession, changes: dict[str, dict[str, Any]], current: dict[str, Row[Any]]
) -> dict[str, Row[Any]]:
    """One UPDATE per changed row, sent as a single executemany, then one SELECT."""
    if not changes:
        return {}
    now = datetime.now(UTC)
    params = [
        {
            "_id": id,
            **new,
            **derived_fields(new["email"], new["phone"], new["full_name"]),
            "updated_at": _later(now, current[id].updated_at),
        }
        for id, new in changes.items()
    ]
    columns = list(params[0])
    statement = (
        update(consumers)
        .where(consumers.c.id == bindparam("_id"))
        .values({column: bindparam(f"_{column}") for column in columns if column != "_id"})
    )
    await session.execute(statement, [
        {key if key == "_id" else f"_{key}": value for key, value in row.items()}
        for row in params
    ])
    rows = (await session.execute(
        select(*CONSUMER_COLUMNS).where(consumers.c.id.in_(list(changes)))
    )).all()
    return {row.id: row for row in rows}


def _audience_values(
    fields: AudienceFields, *, creating: bool
) -> tuple[dict[str, Any], list[DomainError]]:
    values: dict[str, Any] = {}
    errors: list[DomainError] = []
    if fields.name is None or (fields.name is OMITTED and creating):
        errors.append(validation.invalid(("input", "name"), "name is required."))
    elif fields.name is not OMITTED:
        try:
            values["name"] = validation.audience_name(fields.name, ("input", "name"))
        except DomainError as error:
            errors.append(error)
    if fields.description is None:
        values["description"] = None
    elif fields.description is not OMITTED:
        try:
            values["description"] = validation.description(
                fields.description, ("input", "description")
            )
        except DomainError as error:
            errors.append(error)
    return values, errors


async def _audience_for_update(session: AsyncSession, id: str, path: Path) -> Row[Any]:
    row = (await session.execute(
        select(*AUDIENCE_COLUMNS).where(audiences.c.id == id).with_for_update()
    )).one_or_none()
    if row is None:
        raise DomainErrors([_not_found(path, "audience")])
    return row


async def _check_audience_name(session: AsyncSession, name: str, own_id: str | None) -> None:
    owner = (await session.execute(
        select(audiences.c.id).where(audiences.c.name == name)
    )).scalar_one_or_none()
    if owner is not None and owner != own_id:
        raise DomainErrors([DomainError(
            "An audience with this name already exists.", field=("input", "name"),
            code=ErrorCode.NAME_TAKEN,
        )])


def _membership_argument_errors(
    audience_id: Any, consumer_ids: Sequence[Any]
) -> list[list[DomainError]]:
    """Problems visible without the database: [audienceId's, then one list per consumer id].
    A list over the batch limit is refused at once."""
    audience_errors: list[DomainError] = []
    if not isinstance(audience_id, str) or not is_id_of(audience_id, IdKind.AUDIENCE):
        audience_errors.append(_not_found(("audienceId",), "audience"))
    if len(consumer_ids) > BATCH_MAX:
        raise DomainErrors([*audience_errors, _too_large(("consumerIds",), len(consumer_ids))])
    per_item: list[list[DomainError]] = [[] for _ in consumer_ids]
    for i, consumer_id in enumerate(consumer_ids):
        if not isinstance(consumer_id, str) or not is_id_of(consumer_id, IdKind.CONSUMER):
            per_item[i].append(_not_found(("consumerIds", str(i)), "consumer"))
    _mark_duplicates(
        ((i, c, ("consumerIds", str(i))) for i, c in enumerate(consumer_ids) if not per_item[i]),
        "consumer id", per_item,
    )
    return [audience_errors, *per_item]


async def _check_membership_targets(
    session: AsyncSession,
    audience_id: Any,
    consumer_ids: Sequence[Any],
    static_errors: list[list[DomainError]],
) -> Row[Any]:
    """The audience, locked, once it and every consumer are known to exist; else every
    problem at once."""
    errors = [list(e) for e in static_errors]
    row = None
    if not errors[0]:
        row = (await session.execute(
            select(*AUDIENCE_COLUMNS).where(audiences.c.id == audience_id).with_for_update()
        )).one_or_none()
        if row is None:
            errors[0].append(_not_found(("audienceId",), "audience"))
    checkable = [c for i, c in enumerate(consumer_ids) if not errors[i + 1]]
    found = set((await session.execute(
        select(consumers.c.id).where(consumers.c.id.in_(checkable))
    )).scalars()) if checkable else set()
    for i, consumer_id in enumerate(consumer_ids):
        if not errors[i + 1] and consumer_id not in found:
            errors[i + 1].append(_not_found(("consumerIds", str(i)), "consumer"))
    flat = [e for item_errors in errors for e in item_errors]
    if flat:
        raise DomainErrors(flat)
    assert row is not None
    return row


def _order_values(fields: OrderFields) -> tuple[dict[str, Any], list[DomainError]]:
    errors: list[DomainError] = []
    values: dict[str, Any] = {"placed_at": None, "external_id": None}
    if not isinstance(fields.consumer_id, str) or not is_id_of(
        fields.consumer_id, IdKind.CONSUMER
    ):
        errors.append(_not_found(("input", "consumerId"), "consumer"))
    values["consumer_id"] = fields.consumer_id
    currency: str | None = None
    try:
        currency = values["currency"] = validation.currency(
            fields.currency, ("input", "currency")
        )
    except DomainError as error:
        errors.append(error)
    try:
        values["amount"] = validation.amount(fields.amount, ("input", "amount"), currency)
    except DomainError as error:
        errors.append(error)
    if fields.placed_at not in (OMITTED, None):
        if not isinstance(fields.placed_at, datetime) or fields.placed_at.tzinfo is None:
            errors.append(validation.invalid(
                ("input", "placedAt"), "placedAt must be a timestamp with a time zone."
            ))
        else:
            values["placed_at"] = fields.placed_at.astimezone(UTC)
    if fields.external_id not in (OMITTED, None):
        try:
            values["external_id"] = validation.external_id(
                fields.external_id, ("input", "externalId")
            )
        except DomainError as error:
            errors.append(error)
    return values, errors


async def _consumer_for_totals(session: AsyncSession, id: str) -> Row[Any] | None:
    """The consumer, locked: its totals change only under this lock."""
    columns = [consumers.c.id, consumers.c.total_order_value, consumers.c.updated_at]
    row: Row[Any] | None = (await session.execute(
        select(*columns)
        .where(consumers.c.id == id).with_for_update()
    )).one_or_none()
    return row


async def _refresh_totals(session: AsyncSession, consumer: Row[Any], now: datetime) -> None:
    """Sets the consumer's totals from its orders, summed exactly by the database."""
    count, total, last = (await session.execute(
        select(func.count(), func.sum(orders.c.amount), func.max(orders.c.placed_at))
        .where(orders.c.consumer_id == consumer.id)
    )).one()
    await session.execute(
        update(consumers).where(consumers.c.id == consumer.id).values(
            total_orders=count,
            total_order_value=total if total is not None else Decimal(0),
            last_order_at=last,
            updated_at=_later(now, consumer.updated_at),
        )
    )
