"""Alembic environment: always run through `consumers_graphql.store.migrate`, which hands over a
connection (async engines cannot be driven from here)."""

from alembic import context

from consumers_graphql.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
