"""Alembic's environment: migrations run on the connection :func:`~medlens.monitoring.store.migrate`
hands over (no alembic.ini; the URL is the one given to ``--db``)."""

from __future__ import annotations

from alembic import context


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
