"""Alembic environment: one linear migration history for the tables of every package."""

from __future__ import annotations

from alembic import context

from serving.db_schema import linearize_stamps, target_metadata

config = context.config


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        from metering.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as connection:
            with connection.begin():  # committed on its own: SQLite's DDL is not run in one transaction
                linearize_stamps(connection)
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
        return
    linearize_stamps(connectable)  # inside the caller's transaction (serving/db_schema.py: upgrade)
    context.configure(connection=connectable, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
