"""API keys: a rate limit of their own (`keys create --rate-limit-capacity N
--rate-limit-restore-rate R`); null keeps the server's (CONSUMERS_RATE_LIMIT_*).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add columns with every option in place.
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("rate_limit_capacity", sa.Integer(), nullable=True))
        table.add_column(sa.Column("rate_limit_restore_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN in place on both databases (SQLite 3.35+, which RETURNING
    # needs already): batch mode would rebuild api_keys on SQLite, dropping the table first,
    # and with it every idempotency key (their foreign key cascades).
    op.execute("ALTER TABLE api_keys DROP COLUMN rate_limit_restore_rate")
    op.execute("ALTER TABLE api_keys DROP COLUMN rate_limit_capacity")
