"""Alembic environment: migrates the warehouse named by the caller or the settings."""

from __future__ import annotations

from alembic import context

from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    from mailflow.settings import get_settings

    url = get_settings().warehouse_url

if context.is_offline_mode():
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            # render_as_batch lets ALTERs run on SQLite too (table copy).
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
