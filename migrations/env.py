"""Alembic environment: the URL comes from `idverify migrate` (config.attributes) or from the
settings (IDV_DATABASE_URL); the metadata from service.records.tables."""
from __future__ import annotations

from alembic import context

from service.records.engine import make_engine, normalise_url
from service.records.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url")
    if not url:
        from service.settings import get_settings

        url = get_settings().database_url
    return normalise_url(url)


def run_offline() -> None:
    url = database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = database_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata,
                              render_as_batch=url.startswith("sqlite"), compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
