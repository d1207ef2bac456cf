"""Alembic migrations: the schema comes only from them, the same on SQLite and PostgreSQL;
`idverify migrate` works from any working directory; the app refuses an unmigrated database."""
from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.records.engine import make_engine, migrate, schema_is_current
from service.records.tables import Base
from service.settings import Settings

ROOT = str(Path(__file__).resolve().parents[3])


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("pg_database_factory")()


def test_upgrade_matches_models_and_downgrades(fresh_url):
    engine = make_engine(fresh_url)
    try:
        assert not schema_is_current(engine)
        migrate(fresh_url)
        assert schema_is_current(engine)
        with engine.connect() as conn:
            # the models imported so far must match the migrated schema exactly (tables whose
            # models live in modules this test did not import are left out of the comparison)
            known = lambda name, kind, _parent: kind != "table" or name in Base.metadata.tables  # noqa: E731
            ctx = MigrationContext.configure(conn, opts={"include_name": known})
            assert compare_metadata(ctx, Base.metadata) == []
        assert {"api_keys", "audit_records", "alembic_version"} <= set(inspect(engine).get_table_names())
        migrate(fresh_url)  # idempotent

        from alembic import command

        from service.records.engine import alembic_config
        command.downgrade(alembic_config(fresh_url), "base")
        engine.dispose()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(fresh_url)
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def test_idverify_migrate_from_another_directory(fresh_url, tmp_path):
    env = {**os.environ, "IDV_DATABASE_URL": fresh_url, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    engine = make_engine(fresh_url)
    try:
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def test_app_refuses_an_unmigrated_database(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}"), models=object())
    with pytest.raises(RuntimeError, match="idverify migrate"):
        with TestClient(app):
            pass


def test_default_database_is_sqlite_under_var():
    from sqlalchemy.engine import make_url

    url = make_url(Settings(_env_file=None).database_url) if "IDV_DATABASE_URL" not in os.environ else None
    if url is None:
        pytest.skip("IDV_DATABASE_URL is set in this environment")
    assert url.get_backend_name() == "sqlite"
    assert os.path.dirname(url.database) == os.path.join(ROOT, "var")
