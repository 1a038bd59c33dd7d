"""Rows written straight into the database, for read tests that need exact data (NULLs,
ties, timestamps) before the write API exists to make it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers_graphql.ids import IdKind, new_id
from consumers_graphql.store import models
from consumers_graphql.store.normalize import derived_fields

BASE_TIME = datetime(2024, 11, 1, 10, 0, 0, tzinfo=UTC)


def consumer_row(n: int, **fields: Any) -> dict[str, Any]:
    created = fields.pop("created_at", BASE_TIME + timedelta(minutes=n))
    row: dict[str, Any] = {
        "id": fields.pop("id", new_id(IdKind.CONSUMER, created)),
        "email": f"user{n}@example.com",
        "phone": None,
        "full_name": f"User {n}",
        "metadata": None,
        "external_id": None,
        "total_orders": 0,
        "total_order_value": Decimal(0),
        "last_order_at": None,
        "created_at": created,
        "updated_at": created,
    }
    row.update(fields)
    row.update(derived_fields(row["email"], row["phone"], row["full_name"]))
    return row


async def insert_rows(engine: AsyncEngine, model: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        async with engine.begin() as conn:
            await conn.execute(insert(model.__table__), rows)


async def insert_consumers(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    await insert_rows(engine, models.Consumer, rows)


def audience_row(name: str, **fields: Any) -> dict[str, Any]:
    return {"id": new_id(IdKind.AUDIENCE, BASE_TIME), "name": name, "description": None,
            "created_at": BASE_TIME, "updated_at": BASE_TIME, **fields}


def order_row(consumer_id: str, amount: str, placed_at: datetime, **fields: Any) -> dict[str, Any]:
    return {"id": new_id(IdKind.ORDER, placed_at), "consumer_id": consumer_id,
            "amount": Decimal(amount), "currency": "USD", "placed_at": placed_at,
            "external_id": None, "created_at": placed_at, **fields}
