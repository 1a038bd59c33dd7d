"""Consumers, audiences, memberships, orders, API keys; trigram search on both databases.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from consumers_graphql.store.db import Money, SortableText, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_SEARCH = [
    # External-content FTS5 index over consumers.search_text, kept in step by triggers.
    """CREATE VIRTUAL TABLE consumers_fts USING fts5(
        search_text, content='consumers', content_rowid='rowid', tokenize='trigram')""",
    """CREATE TRIGGER consumers_fts_insert AFTER INSERT ON consumers BEGIN
        INSERT INTO consumers_fts(rowid, search_text) VALUES (new.rowid, new.search_text);
    END""",
    """CREATE TRIGGER consumers_fts_delete AFTER DELETE ON consumers BEGIN
        INSERT INTO consumers_fts(consumers_fts, rowid, search_text)
        VALUES ('delete', old.rowid, old.search_text);
    END""",
    """CREATE TRIGGER consumers_fts_update AFTER UPDATE OF search_text ON consumers BEGIN
        INSERT INTO consumers_fts(consumers_fts, rowid, search_text)
        VALUES ('delete', old.rowid, old.search_text);
        INSERT INTO consumers_fts(rowid, search_text) VALUES (new.rowid, new.search_text);
    END""",
]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "consumers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("email", sa.String(254)),
        sa.Column("phone", sa.String(32)),
        sa.Column("full_name", sa.String(200)),
        sa.Column("metadata", sa.JSON()),
        sa.Column("external_id", sa.String(255)),
        sa.Column("total_orders", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("total_order_value", Money(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_order_at", UTCDateTime()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("email_key", SortableText(254)),
        sa.Column("full_name_key", SortableText(200)),
        sa.Column("search_text", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.PrimaryKeyConstraint("id", name="pk_consumers"),
    )
    op.create_index("uq_consumers_email_key", "consumers", ["email_key"], unique=True)
    op.create_index("uq_consumers_external_id", "consumers", ["external_id"], unique=True)
    for name in ("created_at", "email_key", "full_name_key", "last_order_at",
                 "total_order_value", "total_orders"):
        op.create_index(f"ix_consumers_{name}_id", "consumers", [name, "id"])
    op.create_index("ix_consumers_phone", "consumers", ["phone"])

    op.create_table(
        "audiences",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", SortableText(200), nullable=False),
        sa.Column("description", sa.String(2000)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audiences"),
    )
    op.create_index("uq_audiences_name", "audiences", ["name"], unique=True)

    op.create_table(
        "consumer_audiences",
        sa.Column("consumer_id", sa.String(32), nullable=False),
        sa.Column("audience_id", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["consumer_id"], ["consumers.id"], ondelete="CASCADE",
                                name="fk_consumer_audiences_consumer_id_consumers"),
        sa.ForeignKeyConstraint(["audience_id"], ["audiences.id"], ondelete="CASCADE",
                                name="fk_consumer_audiences_audience_id_audiences"),
        sa.PrimaryKeyConstraint("consumer_id", "audience_id", name="pk_consumer_audiences"),
    )
    op.create_index("ix_consumer_audiences_audience_id", "consumer_audiences",
                    ["audience_id", "consumer_id"])

    op.create_table(
        "orders",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("consumer_id", sa.String(32), nullable=False),
        sa.Column("amount", Money(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("placed_at", UTCDateTime(), nullable=False),
        sa.Column("external_id", sa.String(255)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["consumer_id"], ["consumers.id"], ondelete="CASCADE",
                                name="fk_orders_consumer_id_consumers"),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
    )
    op.create_index("ix_orders_consumer_id_placed_at_id", "orders",
                    ["consumer_id", "placed_at", "id"])
    op.create_index("uq_orders_external_id", "orders", ["external_id"], unique=True)

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime()),
        sa.Column("revoked_at", UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("uq_api_keys_secret_hash", "api_keys", ["secret_hash"], unique=True)

    if dialect == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "CREATE INDEX ix_consumers_search_text_trgm ON consumers "
            "USING gin (search_text gin_trgm_ops)"
        )
    elif dialect == "sqlite":
        for statement in _SQLITE_SEARCH:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS consumers_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS consumers_fts")
    for name in ("api_keys", "orders", "consumer_audiences", "audiences", "consumers"):
        op.drop_table(name)
