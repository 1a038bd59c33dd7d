"""Order use-cases: record and delete, each keeping the consumer's totals exact."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from consumers_graphql.domain import validation
from consumers_graphql.domain.common import (
    OMITTED,
    Service,
    consumers,
    external_id_taken,
    later,
    not_found,
    orders,
)
from consumers_graphql.domain.shapes import consumer_json, order_json
from consumers_graphql.errors import DomainError, DomainErrors
from consumers_graphql.ids import IdKind, is_id_of, new_id
from consumers_graphql.store.events import NewEvent
from consumers_graphql.store.queries.common import CONSUMER_COLUMNS, ORDER_COLUMNS


@dataclass(frozen=True)
class OrderFields:
    consumer_id: Any
    amount: Any
    currency: Any
    placed_at: Any = OMITTED
    external_id: Any = OMITTED


class OrderService(Service):
    """Orders, and the consumer's totals that follow them."""

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
                    problems.append(external_id_taken(("input", "externalId"), "order"))
            consumer = await _consumer_for_totals(session, consumer_id)
            if consumer is None:
                problems.insert(0, not_found(("input", "consumerId"), "consumer"))
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
            owner = await _refresh_totals(session, consumer, now)
            await self._record(session, _order_events("ORDER_RECORDED", order, owner))
            return order

        return await self._transaction(work)

    async def delete_order(self, id: Any) -> Row[Any]:
        """Deletes the order and takes it out of the consumer's totals; returns it as it was."""
        if not isinstance(id, str) or not is_id_of(id, IdKind.ORDER):
            raise DomainErrors([not_found(("id",), "order")])

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
                raise DomainErrors([not_found(("id",), "order")])
            owner = await _refresh_totals(session, consumer, datetime.now(UTC))
            await self._record(session, _order_events("ORDER_DELETED", order, owner))
            return order

        return await self._transaction(work)


def _order_values(fields: OrderFields) -> tuple[dict[str, Any], list[DomainError]]:
    errors: list[DomainError] = []
    values: dict[str, Any] = {"placed_at": None, "external_id": None}
    if not isinstance(fields.consumer_id, str) or not is_id_of(
        fields.consumer_id, IdKind.CONSUMER
    ):
        errors.append(not_found(("input", "consumerId"), "consumer"))
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


def _order_events(kind: str, order: Row[Any], owner: Row[Any]) -> list[NewEvent]:
    """The order's event, and its consumer's CONSUMER_UPDATED: its totals changed."""
    return [NewEvent(kind, order.id, order_json(order)),
            NewEvent("CONSUMER_UPDATED", owner.id, consumer_json(owner))]


async def _refresh_totals(session: AsyncSession, consumer: Row[Any], now: datetime) -> Row[Any]:
    """Sets the consumer's totals from its orders, summed exactly by the database; the
    consumer as it is then."""
    count, total, last = (await session.execute(
        select(func.count(), func.sum(orders.c.amount), func.max(orders.c.placed_at))
        .where(orders.c.consumer_id == consumer.id)
    )).one()
    return (await session.execute(
        update(consumers).where(consumers.c.id == consumer.id).values(
            total_orders=count,
            total_order_value=total if total is not None else Decimal(0),
            last_order_at=last,
            updated_at=later(now, consumer.updated_at),
        ).returning(*CONSUMER_COLUMNS)
    )).one()
