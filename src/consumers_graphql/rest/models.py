"""The reference's JSON shapes, as pydantic models: they document the API (OpenAPI) and
type the request bodies. Responses are built by `rest.shapes` and match these exactly."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ConsumerOut(BaseModel):
    """interface Consumer of the reference: every key present, null where empty."""

    id: str = Field(examples=["cons_01HXYZ123456789"])
    email: str | None
    phone: str | None = Field(description="E.164, e.g. +14155550100")
    fullName: str | None
    metadata: dict[str, Any] | None
    externalId: str | None
    totalOrders: int
    totalOrderValue: float
    lastOrderAt: str | None = Field(description="RFC 3339, UTC")
    createdAt: str = Field(description="RFC 3339, UTC, e.g. 2024-11-01T10:00:00Z")
    updatedAt: str = Field(description="RFC 3339, UTC")


class AudienceOut(BaseModel):
    id: str
    name: str
    description: str | None
    createdAt: str
    updatedAt: str


class OrderOut(BaseModel):
    id: str
    consumerId: str
    amount: float
    currency: str
    placedAt: str
    externalId: str | None
    createdAt: str


class ConsumerWithRelationsOut(ConsumerOut):
    """A consumer; `audiences` and `orders` are present only when `include` asks for them."""

    audiences: list[AudienceOut] | None = Field(
        default=None, description="With include=audiences: every audience, by name."
    )
    orders: list[OrderOut] | None = Field(
        default=None,
        description="With include=orders: the 100 most recently placed orders, newest first.",
    )


class PageInfoOut(BaseModel):
    startCursor: str | None
    endCursor: str | None


class ConsumersListOut(BaseModel):
    data: list[ConsumerWithRelationsOut]
    pageInfo: PageInfoOut


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorOut(BaseModel):
    error: str = Field(examples=["Validation failed"])
    details: list[ErrorDetail]


class CreateConsumerRequest(BaseModel):
    """interface CreateConsumerRequest of the reference."""

    model_config = ConfigDict(extra="forbid")

    email: str | None = None
    phone: str | None = Field(default=None, description="E.164 format recommended")
    fullName: str | None = None
    metadata: dict[str, Any] | None = None
    externalId: str | None = None


class UpdateConsumerRequest(CreateConsumerRequest):
    """Omitted keys stay unchanged; null clears; metadata is merged shallowly (a key set to
    null is removed, metadata: null clears it)."""


class BatchUpdateConsumerItem(UpdateConsumerRequest):
    id: str
