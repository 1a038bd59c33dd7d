"""SQLite search: one trigram index for the email and name, another for the phone.

The single FTS5 index over search_text mixed the phone digits into every search: a term
like `+44770091` read the posting lists of trigrams that every UK number has (`447`,
`770`, more than 100,000 rows in a million) to find about 1,000 matches. Apart, a term
that cannot be part of a phone skips the phone index, and a term that starts with `+` can
only be the start of a phone (stored in E.164), which the phone B-tree answers as a range.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import importlib
from collections.abc import Sequence

from alembic import op

_initial = importlib.import_module("consumers_graphql.store.migrations.versions.0001_initial")

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TEXT = "consumers_text_fts(rowid, email_key, full_name_key)"
_TEXT_DELETE = "consumers_text_fts(consumers_text_fts, rowid, email_key, full_name_key)"
_PHONE = "consumers_phone_fts(rowid, phone)"
_PHONE_DELETE = "consumers_phone_fts(consumers_phone_fts, rowid, phone)"

# External-content FTS5 indexes over consumers' columns, kept in step by triggers. The
# seed command drops the insert trigger while it fills both indexes in bulk.
INSERT_TRIGGER = "consumers_search_insert"
_UP = [
    *(f"DROP TRIGGER IF EXISTS consumers_fts_{event}" for event in ("insert", "delete", "update")),
    "DROP TABLE IF EXISTS consumers_fts",
    # Case-sensitive: the columns are folded by Python already (normalize.fold), as is the
    # term, so a match is exactly the substring the LIKE tests. FTS5's own folding goes
    # further than str.lower() (the long s is `s` to it), which made counts taken from the index
    # alone disagree with the rows.
    """CREATE VIRTUAL TABLE consumers_text_fts USING fts5(email_key, full_name_key,
        content='consumers', content_rowid='rowid', tokenize='trigram case_sensitive 1')""",
    """CREATE VIRTUAL TABLE consumers_phone_fts USING fts5(phone,
        content='consumers', content_rowid='rowid', tokenize='trigram case_sensitive 1')""",
    f"""CREATE TRIGGER {INSERT_TRIGGER} AFTER INSERT ON consumers BEGIN
        INSERT INTO {_TEXT} VALUES (new.rowid, new.email_key, new.full_name_key);
        INSERT INTO {_PHONE} VALUES (new.rowid, new.phone);
    END""",
    f"""CREATE TRIGGER consumers_search_delete AFTER DELETE ON consumers BEGIN
        INSERT INTO {_TEXT_DELETE} VALUES ('delete', old.rowid, old.email_key, old.full_name_key);
        INSERT INTO {_PHONE_DELETE} VALUES ('delete', old.rowid, old.phone);
    END""",
    f"""CREATE TRIGGER consumers_search_update_text
        AFTER UPDATE OF email_key, full_name_key ON consumers BEGIN
        INSERT INTO {_TEXT_DELETE} VALUES ('delete', old.rowid, old.email_key, old.full_name_key);
        INSERT INTO {_TEXT} VALUES (new.rowid, new.email_key, new.full_name_key);
    END""",
    f"""CREATE TRIGGER consumers_search_update_phone AFTER UPDATE OF phone ON consumers BEGIN
        INSERT INTO {_PHONE_DELETE} VALUES ('delete', old.rowid, old.phone);
        INSERT INTO {_PHONE} VALUES (new.rowid, new.phone);
    END""",
    "INSERT INTO consumers_text_fts(consumers_text_fts) VALUES ('rebuild')",
    "INSERT INTO consumers_phone_fts(consumers_phone_fts) VALUES ('rebuild')",
]

_DOWN = [
    *(f"DROP TRIGGER IF EXISTS consumers_search_{event}"
      for event in ("insert", "delete", "update_text", "update_phone")),
    "DROP TABLE IF EXISTS consumers_text_fts",
    "DROP TABLE IF EXISTS consumers_phone_fts",
    *_initial._SQLITE_SEARCH,  # 0001's index over search_text, as it was
    "INSERT INTO consumers_fts(consumers_fts) VALUES ('rebuild')",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _UP:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _DOWN:
            op.execute(statement)
