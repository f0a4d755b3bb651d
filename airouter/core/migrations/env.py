"""Alembic environment of the state store: run programmatically by ``Store`` at start, on
the connection it passes (``config.attributes["connection"]``); never from an ini file."""

from __future__ import annotations

from alembic import context

from airouter.core.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
)
with context.begin_transaction():
    context.run_migrations()
