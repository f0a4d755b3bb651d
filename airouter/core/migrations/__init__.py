"""Alembic migrations of the state store (run by ``airouter.core.db.migrate``)."""
