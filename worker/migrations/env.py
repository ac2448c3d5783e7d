"""Alembic's environment for the job store: `worker.store.migrate(url)` runs it (online only).

On PostgreSQL the upgrade holds an advisory lock, so that replicas started together migrate once
and the others wait, then find nothing to do."""

from alembic import context
from sqlalchemy import create_engine, text

from worker.store import Base

MIGRATION_LOCK = 7_261_842  # any fixed number: the advisory lock's key

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
    try:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if postgres:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
engine.dispose()
