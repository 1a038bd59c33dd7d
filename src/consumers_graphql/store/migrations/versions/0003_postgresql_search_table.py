"""PostgreSQL search: a narrow copy of each consumer's search text, for counting matches.

A trigram index is lossy, so PostgreSQL re-reads every candidate row to count a search's
matches. In the consumers table those rows are wide and spread out: `garcia` (22,000
matches in a million) reads 17,000 of its pages, about 100 ms. consumer_search holds only
the id and the search text (a third of the size, small enough to stay cached); the same
count reads 11,000 of its pages in about 25 ms. Statement-level triggers keep it in step
with consumers, one statement per write statement whatever the number of rows (an UPDATE
trigger with transition tables can name no columns, so every update of consumers runs
one; the copy follows rows by id, which never changes).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (trigger event, the statement that follows it on consumer_search)
_SYNC = {
    "insert": "INSERT INTO consumer_search (id, search_text) "
              "SELECT id, search_text FROM changed",
    "update": "UPDATE consumer_search s SET search_text = changed.search_text FROM changed "
              "WHERE s.id = changed.id AND s.search_text IS DISTINCT FROM changed.search_text",
    "delete": "DELETE FROM consumer_search s USING changed WHERE s.id = changed.id",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # No write may land between the copy and the triggers.
    op.execute("LOCK TABLE consumers IN SHARE ROW EXCLUSIVE MODE")
    op.execute("CREATE TABLE consumer_search ("
               "id varchar(32) PRIMARY KEY, search_text text NOT NULL)")
    op.execute("INSERT INTO consumer_search (id, search_text) "
               "SELECT id, search_text FROM consumers")
    op.execute("CREATE INDEX ix_consumer_search_trgm ON consumer_search "
               "USING gin (search_text gin_trgm_ops)")
    for event, statement in _SYNC.items():
        table = "OLD" if event == "delete" else "NEW"
        op.execute(f"""CREATE FUNCTION consumer_search_{event}() RETURNS trigger
            LANGUAGE plpgsql AS $$ BEGIN {statement}; RETURN NULL; END $$""")
        op.execute(f"""CREATE TRIGGER consumer_search_{event} AFTER {event.upper()}
            ON consumers REFERENCING {table} TABLE AS changed
            FOR EACH STATEMENT EXECUTE FUNCTION consumer_search_{event}()""")
    op.execute("""CREATE FUNCTION consumer_search_truncate() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN TRUNCATE consumer_search; RETURN NULL; END $$""")
    op.execute("""CREATE TRIGGER consumer_search_truncate AFTER TRUNCATE ON consumers
        FOR EACH STATEMENT EXECUTE FUNCTION consumer_search_truncate()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for event in (*_SYNC, "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS consumer_search_{event} ON consumers")
        op.execute(f"DROP FUNCTION IF EXISTS consumer_search_{event}()")
    op.execute("DROP TABLE IF EXISTS consumer_search")
