"""The ORM model: the one description of the tables, shared by migrations, reads and writes."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from consumers_graphql.store.db import Money, SortableText, UTCDateTime

ID_LENGTH = 32  # "cons_" + 26 ULID characters, with room for the longest prefix
EMAIL_MAX = 254
FULL_NAME_MAX = 200
EXTERNAL_ID_MAX = 255
AUDIENCE_NAME_MAX = 200
DESCRIPTION_MAX = 2000

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Consumer(Base):
    __tablename__ = "consumers"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(EMAIL_MAX))
    phone: Mapped[str | None] = mapped_column(String(32))
    full_name: Mapped[str | None] = mapped_column(String(FULL_NAME_MAX))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_MAX))
    total_orders: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    total_order_value: Mapped[Decimal] = mapped_column(
        Money, default=Decimal(0), server_default=text("0")
    )
    last_order_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Derived from the fields above by `consumers_graphql.store.normalize.derived_fields`, written
    # with them: the case-folded keys that uniqueness, sorting and search work on.
    email_key: Mapped[str | None] = mapped_column(SortableText(EMAIL_MAX))
    full_name_key: Mapped[str | None] = mapped_column(SortableText(FULL_NAME_MAX))
    search_text: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))

    audiences: Mapped[list[Audience]] = relationship(
        secondary="consumer_audiences", back_populates="consumers", lazy="raise"
    )
    orders: Mapped[list[Order]] = relationship(back_populates="consumer", lazy="raise")

    __table_args__ = (
        Index("uq_consumers_email_key", "email_key", unique=True),
        Index("uq_consumers_external_id", "external_id", unique=True),
        Index("ix_consumers_created_at_id", "created_at", "id"),
        Index("ix_consumers_email_key_id", "email_key", "id"),
        Index("ix_consumers_full_name_key_id", "full_name_key", "id"),
        Index("ix_consumers_last_order_at_id", "last_order_at", "id"),
        Index("ix_consumers_total_order_value_id", "total_order_value", "id"),
        Index("ix_consumers_total_orders_id", "total_orders", "id"),
        Index("ix_consumers_phone", "phone"),
    )


class Audience(Base):
    __tablename__ = "audiences"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(SortableText(AUDIENCE_NAME_MAX))
    description: Mapped[str | None] = mapped_column(String(DESCRIPTION_MAX))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    consumers: Mapped[list[Consumer]] = relationship(
        secondary="consumer_audiences", back_populates="audiences", lazy="raise"
    )

    __table_args__ = (Index("uq_audiences_name", "name", unique=True),)


class ConsumerAudience(Base):
    """Membership of a consumer in an audience."""

    __tablename__ = "consumer_audiences"

    consumer_id: Mapped[str] = mapped_column(
        ForeignKey("consumers.id", ondelete="CASCADE"), primary_key=True
    )
    audience_id: Mapped[str] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_consumer_audiences_audience_id", "audience_id", "consumer_id"),)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    consumer_id: Mapped[str] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"))
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_MAX))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    consumer: Mapped[Consumer] = relationship(back_populates="orders", lazy="raise")

    __table_args__ = (
        Index("ix_orders_consumer_id_placed_at_id", "consumer_id", "placed_at", "id"),
        Index("uq_orders_external_id", "external_id", unique=True),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # The first characters of the secret ("sk_live_abcd"), shown in listings to recognise it.
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[str] = mapped_column(String(64))  # space-separated: "read write"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The key's own rate limit (web/rate_limit.py); null: the server's settings.
    rate_limit_capacity: Mapped[int | None] = mapped_column(Integer)
    rate_limit_restore_rate: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("uq_api_keys_secret_hash", "secret_hash", unique=True),)


class IdempotencyKey(Base):
    """The first answer to a write sent with an ``Idempotency-Key`` (web/idempotency.py),
    recorded in the write's own transaction: a crash leaves both or neither. Scoped to the
    API key; kept for ``idempotency_key_hours``, deleted a few at a time by later keyed
    writes."""

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(SortableText(255))
    # SHA-256 (hex) of the request: method, path and query, canonical JSON body.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    # The answer's own headers (content-type, location), as a JSON list of pairs.
    headers: Mapped[list[list[str]]] = mapped_column(JSON)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("uq_idempotency_keys_api_key_id_key", "api_key_id", "key", unique=True),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )


class Event(Base):
    """A change, recorded in the transaction of the write that made it (an outbox): what
    Query.events, REST's /api/v1/events and subscriptions hand out, in `position` order
    (store/events.py says why that order is the commit order). Kept for
    ``event_retention_days``, deleted a few at a time by later writes."""

    __tablename__ = "events"

    # SQLite: AUTOINCREMENT, so that a position is never used twice, even once the newest
    # events are pruned. PostgreSQL: a sequence drawn under the events lock.
    position: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(ID_LENGTH))
    type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        Index("uq_events_id", "id", unique=True),
        Index("ix_events_subject_id_position", "subject_id", "position"),
        {"sqlite_autoincrement": True},
    )
