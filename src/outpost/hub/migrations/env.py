"""Alembic environment: runs on the connection the hub hands over, on either database."""

from alembic import context

from outpost.hub.db import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
