"""Audience use-cases: create, update, delete, and membership."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from consumers_graphql.domain import validation
from consumers_graphql.domain.common import (
    OMITTED,
    Service,
    audiences,
    consumers,
    later,
    mark_duplicates,
    memberships,
    not_found,
    too_large,
)
from consumers_graphql.domain.shapes import audience_json
from consumers_graphql.domain.validation import BATCH_MAX, Path
from consumers_graphql.errors import DomainError, DomainErrors, ErrorCode
from consumers_graphql.ids import IdKind, is_id_of, new_id
from consumers_graphql.store.events import NewEvent
from consumers_graphql.store.queries.common import AUDIENCE_COLUMNS


@dataclass(frozen=True)
class AudienceFields:
    name: Any = OMITTED
    description: Any = OMITTED


class AudienceService(Service):
    """Audiences and their members."""

    async def create_audience(self, fields: AudienceFields) -> Row[Any]:
        values, errors = _audience_values(fields, creating=True)
        if errors:
            raise DomainErrors(errors)

        async def work(session: AsyncSession) -> Row[Any]:
            await _check_audience_name(session, values["name"], None)
            now = datetime.now(UTC)
            statement = insert(audiences).returning(*AUDIENCE_COLUMNS)
            row = (await session.execute(statement, {
                "id": new_id(IdKind.AUDIENCE, now),
                "name": values["name"],
                "description": values.get("description"),
                "created_at": now,
                "updated_at": now,
            })).one()
            await self._record(session, [NewEvent("AUDIENCE_CREATED", row.id, audience_json(row))])
            return row

        return await self._transaction(work)

    async def update_audience(self, id: Any, fields: AudienceFields) -> Row[Any]:
        values, errors = _audience_values(fields, creating=False)
        if not isinstance(id, str) or not is_id_of(id, IdKind.AUDIENCE):
            errors.insert(0, not_found(("id",), "audience"))
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
                .values(**new, updated_at=later(datetime.now(UTC), row.updated_at))
                .returning(*AUDIENCE_COLUMNS)
            )
            updated = (await session.execute(statement)).one()
            await self._record(
                session, [NewEvent("AUDIENCE_UPDATED", updated.id, audience_json(updated))])
            return updated

        return await self._transaction(work)

    async def delete_audience(self, id: Any) -> Row[Any]:
        """Deletes the audience and its memberships (not the consumers); returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.AUDIENCE):
            raise DomainErrors([not_found(("id",), "audience")])

        async def work(session: AsyncSession) -> Row[Any]:
            row = await _audience_for_update(session, id, ("id",))
            await session.execute(delete(memberships).where(memberships.c.audience_id == id))
            await session.execute(delete(audiences).where(audiences.c.id == id))
            await self._record(session, [NewEvent("AUDIENCE_DELETED", id, audience_json(row))])
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
                await self._record(session, [_members_event(
                    "AUDIENCE_MEMBERS_ADDED", row, [item["consumer_id"] for item in new])])
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
            removed = set((await session.execute(delete(memberships).where(
                memberships.c.audience_id == audience_id,
                memberships.c.consumer_id.in_(consumer_ids),
            ).returning(memberships.c.consumer_id))).scalars())
            if removed:
                await self._record(session, [_members_event(
                    "AUDIENCE_MEMBERS_REMOVED", row,
                    [c for c in dict.fromkeys(consumer_ids) if c in removed])])
            return row

        return await self._transaction(work)


def _members_event(kind: str, audience: Row[Any], consumer_ids: list[str]) -> NewEvent:
    """A membership change: the audience as REST shows it, and the consumers that joined or
    left it (in the order sent; those that already were or were not members are left
    out)."""
    return NewEvent(kind, audience.id, {**audience_json(audience), "consumerIds": consumer_ids})


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
        raise DomainErrors([not_found(path, "audience")])
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
        audience_errors.append(not_found(("audienceId",), "audience"))
    if len(consumer_ids) > BATCH_MAX:
        raise DomainErrors([*audience_errors, too_large(("consumerIds",), len(consumer_ids))])
    per_item: list[list[DomainError]] = [[] for _ in consumer_ids]
    for i, consumer_id in enumerate(consumer_ids):
        if not isinstance(consumer_id, str) or not is_id_of(consumer_id, IdKind.CONSUMER):
            per_item[i].append(not_found(("consumerIds", str(i)), "consumer"))
    mark_duplicates(
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
            errors[0].append(not_found(("audienceId",), "audience"))
    checkable = [c for i, c in enumerate(consumer_ids) if not errors[i + 1]]
    found = set((await session.execute(
        select(consumers.c.id).where(consumers.c.id.in_(checkable))
    )).scalars()) if checkable else set()
    for i, consumer_id in enumerate(consumer_ids):
        if not errors[i + 1] and consumer_id not in found:
            errors[i + 1].append(not_found(("consumerIds", str(i)), "consumer"))
    flat = [e for item_errors in errors for e in item_errors]
    if flat:
        raise DomainErrors(flat)
    assert row is not None
    return row
