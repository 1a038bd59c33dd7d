"""Rows to the reference's JSON shapes: what REST answers, and what change events carry."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row

from consumers_graphql.timestamps import format_datetime


def _time(value: Any) -> str | None:
    return None if value is None else format_datetime(value)


def consumer_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "email": row.email,
        "phone": row.phone,
        "fullName": row.full_name,
        "metadata": row.metadata,
        "externalId": row.external_id,
        "totalOrders": row.total_orders,
        "totalOrderValue": float(row.total_order_value),
        "lastOrderAt": _time(row.last_order_at),
        "createdAt": format_datetime(row.created_at),
        "updatedAt": format_datetime(row.updated_at),
    }


def audience_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "createdAt": format_datetime(row.created_at),
        "updatedAt": format_datetime(row.updated_at),
    }


def order_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "consumerId": row.consumer_id,
        "amount": float(row.amount),
        "currency": row.currency,
        "placedAt": format_datetime(row.placed_at),
        "externalId": row.external_id,
        "createdAt": format_datetime(row.created_at),
    }
