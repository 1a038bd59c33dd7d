"""Change events: the outbox every write records its events in (store/events.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from consumers_graphql.store.db import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("subject_id", sa.String(32), nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        # AUTOINCREMENT: a position is never given twice, even after the newest are deleted.
        sqlite_autoincrement=True,
    )
    op.create_index("uq_events_id", "events", ["id"], unique=True)
    op.create_index("ix_events_subject_id_position", "events", ["subject_id", "position"])


def downgrade() -> None:
    op.drop_table("events")
