"""Consumer use-cases: create, update, upsert by externalId (single and batch) and delete."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from operator import itemgetter
from typing import Any

from sqlalchemy import Select, String, bindparam, delete, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from consumers_graphql.domain import validation
from consumers_graphql.domain.common import (
    OMITTED,
    BatchResult,
    ErrorPolicy,
    ItemResult,
    LostRace,
    Service,
    consumers,
    external_id_taken,
    later,
    mark_duplicates,
    memberships,
    not_found,
    orders,
    refused,
    single,
    too_large,
)
from consumers_graphql.domain.shapes import consumer_json
from consumers_graphql.domain.validation import BATCH_MAX, Path
from consumers_graphql.errors import DomainError, DomainErrors, ErrorCode
from consumers_graphql.ids import IdKind, block_start, is_id_of, sequential_ids
from consumers_graphql.store.db import MONEY_SCALE
from consumers_graphql.store.events import NewEvent
from consumers_graphql.store.normalize import derived_fields, fold
from consumers_graphql.store.queries.common import CONSUMER_COLUMNS, one_of


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
class ConsumerUpsert:
    """One item of an upsert: the externalId that finds (or will name) the consumer, and
    the fields to write; ``fields.external_id`` is not read (the key is not changed)."""

    external_id: Any
    fields: ConsumerFields


# (public name, column, rule): the order in which problems are reported.
_Rules = tuple[tuple[str, str, Callable[[Any, Path], Any]], ...]
_CONSUMER_RULES: _Rules = (
    ("email", "email", validation.email),
    ("phone", "phone", validation.phone),
    ("fullName", "full_name", validation.full_name),
    ("metadata", "metadata", validation.metadata),
    ("externalId", "external_id", validation.external_id),
)
_CONSUMER_WRITABLE = tuple(column for _, column, _ in _CONSUMER_RULES)
# An upsert's fields: its externalId is the key, never a change.
_UPSERT_RULES = tuple(rule for rule in _CONSUMER_RULES if rule[1] != "external_id")


def _email_taken(path: Path) -> DomainError:
    return DomainError("A consumer with this email already exists.", field=path,
                       code=ErrorCode.EMAIL_TAKEN)


def _consumer_values(
    fields: ConsumerFields, path: Path, rules: _Rules = _CONSUMER_RULES
) -> tuple[dict[str, Any], list[DomainError]]:
    """The validated, normalised values of the fields sent (None for an explicit null)."""
    values: dict[str, Any] = {}
    errors: list[DomainError] = []
    for public, column, rule in rules:
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


class ConsumerService(Service):
    """Consumers: created and updated one at a time or in batches (a single write is a batch
    of one), deleted with their memberships and orders."""

    async def create_consumer(self, fields: ConsumerFields) -> Row[Any]:
        outcome = await self._create_consumers(
            [fields], ErrorPolicy.REJECT_EVERYTHING, lambda _: ("input",)
        )
        return single(outcome)

    async def create_consumers(
        self,
        items: Sequence[ConsumerFields],
        policy: ErrorPolicy = ErrorPolicy.REJECT_EVERYTHING,
    ) -> BatchResult:
        if len(items) > BATCH_MAX:
            return refused(len(items), too_large(("input",), len(items)))
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
        mark_duplicates(
            ((i, fold(v["email"]), (*item_path(i), "email")) for i, v in enumerate(values)),
            "email", invalid,
        )
        mark_duplicates(
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
                    errors[i].append(external_id_taken((*item_path(i), "externalId"),
                                                        "consumer"))
            writable = [i for i, item_errors in enumerate(errors) if not item_errors]
            if policy is ErrorPolicy.REJECT_EVERYTHING and len(writable) < len(items):
                writable = []
            rows = await _insert_consumers(session, [values[i] for i in writable])
            await self._record(session, [_consumer_event("CONSUMER_CREATED", row)
                                         for row in rows])
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
        return single(outcome)

    async def update_consumers(
        self,
        items: Sequence[ConsumerChange],
        policy: ErrorPolicy = ErrorPolicy.REJECT_EVERYTHING,
    ) -> BatchResult:
        if len(items) > BATCH_MAX:
            return refused(len(items), too_large(("input",), len(items)))
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
                item_errors.insert(0, not_found(id_path(index), "consumer"))
            changes.append(item_changes)
            invalid.append(item_errors)
        # A repeat is reported whatever else is wrong with either item.
        mark_duplicates(((i, id, id_path(i)) for i, id in enumerate(ids)), "id", invalid)
        mark_duplicates(
            ((i, fold(c.get("email")), (*item_path(i), "email"))
             for i, c in enumerate(changes)),
            "email", invalid,
        )
        mark_duplicates(
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
                    errors[i].append(not_found(id_path(i), "consumer"))
                    continue
                new = _apply_consumer_changes(
                    row._mapping, changes[i], (*item_path(i), "metadata")
                )
                if isinstance(new, DomainError):
                    errors[i].append(new)
                elif _changes_anything(new, row._mapping):
                    proposed[i] = new
            await _check_consumer_uniqueness(
                session, items, current, proposed, errors, item_path
            )
            rejected = policy is ErrorPolicy.REJECT_EVERYTHING and any(errors)
            to_write = {} if rejected else {
                items[i].id: new for i, new in proposed.items() if not errors[i]
            }
            updated = await _write_consumer_changes(session, to_write, current)
            await self._record(session, [_consumer_event("CONSUMER_UPDATED", updated[id])
                                         for id in to_write])
            results = [ItemResult(errors=item_errors) for item_errors in errors]
            for i, result in enumerate(results):
                if not result.errors and not rejected:
                    id = items[i].id
                    result.row = updated[id] if id in updated else current[id]
            return BatchResult(results, [e for item_errors in errors for e in item_errors])

        return await self._transaction(work)

    async def upsert_consumer(
        self, external_id: Any, fields: ConsumerFields
    ) -> tuple[Row[Any], bool]:
        """The consumer written, and whether it was created (else updated, or left as it was
        when nothing changed)."""
        outcome = await self._upsert_consumers(
            [ConsumerUpsert(external_id, fields)], ErrorPolicy.REJECT_EVERYTHING,
            lambda _: ("input",),
        )
        return single(outcome), outcome.results[0].created

    async def upsert_consumers(
        self,
        items: Sequence[ConsumerUpsert],
        policy: ErrorPolicy = ErrorPolicy.REJECT_EVERYTHING,
    ) -> BatchResult:
        if len(items) > BATCH_MAX:
            return refused(len(items), too_large(("input",), len(items)))
        return await self._upsert_consumers(items, policy, lambda i: ("input", str(i)))

    async def _upsert_consumers(
        self,
        items: Sequence[ConsumerUpsert],
        policy: ErrorPolicy,
        item_path: Callable[[int], Path],
    ) -> BatchResult:
        """Update semantics for an externalId a consumer has, create semantics otherwise:
        on PostgreSQL the externalIds' advisory locks (upserts of one externalId queue),
        one SELECT (the consumers with these externalIds, locked, and the owners of the
        emails sent), every row decided here, then one INSERT … ON CONFLICT (external_id)
        DO UPDATE for all the rows that change."""
        keys: list[str | None] = []  # None: not a valid externalId
        changes: list[dict[str, Any]] = []
        invalid: list[list[DomainError]] = []
        for index, item in enumerate(items):
            path = item_path(index)
            item_errors: list[DomainError] = []
            try:
                keys.append(validation.external_id(item.external_id, (*path, "externalId")))
            except DomainError as error:
                keys.append(None)
                item_errors.append(error)
            item_changes, field_errors = _consumer_values(item.fields, path, _UPSERT_RULES)
            changes.append(item_changes)
            invalid.append(item_errors + field_errors)
        # A repeat is reported whatever else is wrong with either item.
        mark_duplicates(
            ((i, key, (*item_path(i), "externalId")) for i, key in enumerate(keys)),
            "externalId", invalid,
        )
        mark_duplicates(
            ((i, fold(c.get("email")), (*item_path(i), "email"))
             for i, c in enumerate(changes)),
            "email", invalid,
        )

        async def work(session: AsyncSession) -> BatchResult:
            errors = [list(item_errors) for item_errors in invalid]
            candidates = [i for i, item_errors in enumerate(errors) if not item_errors]
            current, email_owner = await _consumers_for_upsert(
                session,
                [keys[i] for i in candidates],
                {fold(changes[i].get("email")) for i in candidates} - {None},
            )
            proposed: dict[int, dict[str, Any]] = {}
            for i in candidates:
                row = current.get(keys[i])
                before = row._mapping if row is not None else _new_consumer(keys[i])
                new = _apply_consumer_changes(before, changes[i], (*item_path(i), "metadata"))
                if isinstance(new, DomainError):
                    errors[i].append(new)
                    continue
                if row is None or _changes_anything(new, before):
                    proposed[i] = new
                email_key = fold(new["email"])
                owner = email_owner.get(email_key) if email_key is not None else None
                if owner is not None and (row is None or owner != row.id):
                    errors[i].append(_email_taken((*item_path(i), "email")))
            rejected = policy is ErrorPolicy.REJECT_EVERYTHING and any(errors)
            writes = [] if rejected else [i for i in proposed if not errors[i]]
            written = await _upsert_consumer_rows(
                session, [(proposed[i], current.get(keys[i])) for i in writes]
            )
            await self._record(session, [
                _consumer_event("CONSUMER_UPDATED" if keys[i] in current
                                else "CONSUMER_CREATED", row)
                for i, row in zip(writes, written, strict=True)])
            results = [ItemResult(errors=item_errors) for item_errors in errors]
            for i, row in zip(writes, written, strict=True):
                results[i].row = row
                results[i].created = keys[i] not in current
            for i, result in enumerate(results):
                if result.row is None and not result.errors and not rejected:
                    result.row = current[keys[i]]  # unchanged: as it is
            return BatchResult(results, [e for item_errors in errors for e in item_errors])

        return await self._transaction(work)

    async def delete_consumer(self, id: Any) -> Row[Any]:
        """Deletes the consumer with its memberships and orders; returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.CONSUMER):
            raise DomainErrors([not_found(("id",), "consumer")])

        async def work(session: AsyncSession) -> Row[Any]:
            row = (await session.execute(
                select(*CONSUMER_COLUMNS).where(consumers.c.id == id).with_for_update()
            )).one_or_none()
            if row is None:
                raise DomainErrors([not_found(("id",), "consumer")])
            await session.execute(delete(memberships).where(memberships.c.consumer_id == id))
            await session.execute(delete(orders).where(orders.c.consumer_id == id))
            await session.execute(delete(consumers).where(consumers.c.id == id))
            await self._record(session, [_consumer_event("CONSUMER_DELETED", row)])
            return row

        return await self._transaction(work)


def _changes_anything(new: Mapping[str, Any], current: Mapping[Any, Any]) -> bool:
    """Whether writing ``new`` changes the consumer: a write that changes nothing is not
    made (``updatedAt`` stays). Metadata is compared as JSON values, where `true` is not
    `1` and `1` is not `1.0`, though Python's ``==`` says they are equal."""
    return any(
        not _same_json(new[column], current[column]) if column == "metadata"
        else new[column] != current[column]
        for column in _CONSUMER_WRITABLE
    )


def _same_json(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(value, b[key])
                                            for key, value in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _consumer_event(kind: str, row: Any) -> NewEvent:
    return NewEvent(kind, row.id, consumer_json(row))


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
    ids = sequential_ids(IdKind.CONSUMER, block_start(now), len(values))
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
    return f"{_sqlite_values(count)} RETURNING id"


def _sqlite_values(count: int) -> str:
    row = "(" + ", ".join("?" * len(_COLUMN_NAMES)) + ")"
    return (f"INSERT INTO consumers ({', '.join(_COLUMN_NAMES)}) VALUES "
            + ", ".join([row] * count))


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
    current: Mapping[Any, Any], changes: dict[str, Any], metadata_path: Path
) -> dict[str, Any] | DomainError:
    """The consumer's writable columns after the changes (metadata merged shallowly)."""
    new = {column: current[column] for column in _CONSUMER_WRITABLE}
    for column, value in changes.items():
        if column == "metadata" and value is not None:
            grows = bool(new["metadata"])  # merged into nothing, it can only shrink
            value = validation.merge_metadata(new["metadata"], value)
            if grows:
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
            errors[i].append(external_id_taken((*item_path(i), "externalId"), "consumer"))


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
            "updated_at": later(now, current[id].updated_at),
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


def _new_consumer(external_id: str | None) -> dict[str, Any]:
    """What an upsert's changes apply to when no consumer has the externalId: every field
    null, so that a create reads like an update of nothing (a metadata key set to null is
    left out, as an update would remove it)."""
    return {**dict.fromkeys(_CONSUMER_WRITABLE), "external_id": external_id}


# PostgreSQL: upserts of the same externalIds queue, each on transaction-scoped advisory
# locks of its externalIds taken before its SELECT, in one order (their hashes', within
# this namespace of the two-key form). Without them, transactions that all found an
# externalId new raced to insert it: the losers' INSERTs waited for the winner, updated its
# rows (locking them in the batch's order, where other transactions lock by id) and were
# run again (LostRace), and batches deadlocked (a second each: deadlock_timeout; a 500
# after five). With them, the SELECT of a transaction that waited sees the winner's rows.
# Released at commit or rollback, so they are safe behind a pooler in transaction mode.
_UPSERT_LOCK_SPACE = 0x636F6E73  # "cons"
_UPSERT_LOCKS = text(
    f"SELECT pg_advisory_xact_lock({_UPSERT_LOCK_SPACE}, key) FROM (SELECT DISTINCT "
    "hashtext(external_id) AS key FROM unnest(CAST(:external_ids AS text[])) AS external_id"
    ") AS keys ORDER BY key"
).bindparams(bindparam("external_ids", type_=postgresql.ARRAY(String())))


@lru_cache(maxsize=2)
def _upsert_select(dialect: str) -> Select[Any]:
    # Locked in id order, as every writer locks consumers, so that two batches do not
    # deadlock; the email owners are locked too, which only makes the check firmer.
    return (
        select(*CONSUMER_COLUMNS)
        .where(or_(one_of(consumers.c.external_id, "external_ids", dialect),
                   one_of(consumers.c.email_key, "email_keys", dialect)))
        .order_by(consumers.c.id).with_for_update()
    )


async def _consumers_for_upsert(
    session: AsyncSession, external_ids: Sequence[str | None], email_keys: set[str | None]
) -> tuple[dict[str | None, Row[Any]], dict[str, str]]:
    """The consumers with these externalIds, by externalId, and the ids of the consumers
    that have these email keys, by key: one statement."""
    if not external_ids:
        return {}, {}
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        await session.execute(_UPSERT_LOCKS, {"external_ids": list(external_ids)})
    rows = (await session.execute(
        _upsert_select(connection.dialect.name),
        {"external_ids": list(external_ids), "email_keys": list(email_keys)},
    )).all()
    wanted = set(external_ids)
    return ({row.external_id: row for row in rows if row.external_id in wanted},
            {row.email_key: row.id for row in rows if row.email_key is not None})


# What ON CONFLICT DO UPDATE changes in an existing consumer: never its id, createdAt or
# order totals, which the VALUES row carries only because an INSERT needs a whole row.
_UPSERT_SET = ("email", "phone", "full_name", "metadata", "email_key", "full_name_key",
               "search_text", "updated_at")


async def _upsert_consumer_rows(
    session: AsyncSession, writes: Sequence[tuple[dict[str, Any], Row[Any] | None]]
) -> list[Any]:
    """One INSERT … ON CONFLICT (external_id) DO UPDATE for every row: new consumers
    (``None``: no current row) are inserted, existing ones updated. Returns the rows as
    written, in the order given, from the values sent (RETURNING brings back only each
    row's id, which says whether it was inserted or updated).

    A row believed new whose externalId a concurrent transaction inserted after the SELECT
    (PostgreSQL, where writers do not queue; upserts do, on their advisory locks, but a
    create or an update may give a consumer the externalId) is updated by the DO UPDATE
    with create semantics: that is detected (the id returned is not the one generated) and
    the transaction is run again (LostRace), when the SELECT finds the row."""
    if not writes:
        return []
    now = datetime.now(UTC)
    ids = sequential_ids(IdKind.CONSUMER, block_start(now), len(writes))
    params: list[dict[str, Any]] = []
    expected: dict[str, str] = {}  # external id -> the id RETURNING must give
    for new_id, (new, row) in zip(ids, writes, strict=True):
        derived = derived_fields(new["email"], new["phone"], new["full_name"])
        kept: dict[str, Any]
        if row is None:
            kept = {"id": new_id, "total_orders": 0, "total_order_value": _NO_MONEY,
                    "last_order_at": None, "created_at": now, "updated_at": now}
        else:
            kept = {"id": row.id, "total_orders": row.total_orders,
                    "total_order_value": row.total_order_value,
                    "last_order_at": row.last_order_at, "created_at": row.created_at,
                    "updated_at": later(now, row.updated_at)}
        expected[new["external_id"]] = kept["id"]
        # The VALUES row of an existing consumer gets a fresh id: ON CONFLICT decides on
        # the externalId alone, and a new id can never meet the primary key.
        params.append({**new, **kept, **derived, "id": new_id})
    connection = await session.connection()
    result: Any
    if connection.dialect.name == "sqlite":
        result = await connection.exec_driver_sql(
            _sqlite_upsert(len(params)), _sqlite_parameters(connection.dialect, params, {})
        )
    else:  # SQLAlchemy's insertmanyvalues: one statement too
        result = await session.execute(_postgresql_upsert(), params)
    returned = {row[1]: row[0] for row in result.all()}
    if len(returned) != len(params):
        raise RuntimeError("the upsert did not write one row per item")
    for row_params in params:
        external_id = row_params["external_id"]
        if returned[external_id] != expected[external_id]:
            if expected[external_id] == row_params["id"]:
                raise LostRace  # inserted concurrently: update semantics on the rerun
            raise RuntimeError("a locked consumer changed under the upsert")
        row_params["id"] = expected[external_id]
    return [_Inserted(**{name: row[name] for name in _INSERTED_FIELDS}) for row in params]


@lru_cache(maxsize=1)
def _postgresql_upsert() -> Any:
    statement = postgresql.insert(consumers)
    return statement.on_conflict_do_update(
        index_elements=[consumers.c.external_id],
        set_={name: statement.excluded[name] for name in _UPSERT_SET},
    ).returning(consumers.c.id, consumers.c.external_id)


@lru_cache(maxsize=4)
def _sqlite_upsert(count: int) -> str:
    updates = ", ".join(f"{name} = excluded.{name}" for name in _UPSERT_SET)
    return (f"{_sqlite_values(count)} ON CONFLICT (external_id) DO UPDATE SET {updates} "
            "RETURNING id, external_id")
