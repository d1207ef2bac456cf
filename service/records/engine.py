"""Database engine and sessions from settings.database_url; `idverify migrate`.

SQLite (the embedded default) and PostgreSQL get the same schema from the Alembic migrations.
Writers that must be serialised (the audit chain, key changes) use `write_session`: on SQLite
it opens the transaction with BEGIN IMMEDIATE, so the write lock is taken up front and a
concurrent writer waits instead of failing on a lock upgrade.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, exc as sa_exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = ROOT / "migrations"
log = logging.getLogger("idverify.db")

_WRITE_LOCK = "idv_write_lock"
# what an unreachable, restarting, read-only or locked database raises: answered 503
# database_unavailable (service/app.py), never 500
OUTAGE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OUTAGE_ERRORS) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)


def normalise_url(url: str) -> str:
    """postgres:// and postgresql:// mean psycopg 3 here (psycopg2 is not installed)."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def make_engine(url: str, settings=None) -> Engine:
    """`settings`: the service's (IDV_DB_* waits). Without them (migrations, tests, tools) the
    PostgreSQL server's own statement, lock and idle-in-transaction timeouts apply."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _sqlite_transactions(engine)
        return engine
    # a restarting server must not hold callers for long: connect within IDV_DB_CONNECT_TIMEOUT_SECONDS,
    # a pooled connection (checked before use) within IDV_DB_POOL_TIMEOUT_SECONDS, else 503
    # database_unavailable; a held lock or a runaway statement ends at the server's timeouts
    connect_args: dict = {"connect_timeout": settings.db_connect_timeout_seconds if settings else 5}
    if settings is not None and (options := server_timeouts(settings)):
        connect_args["options"] = options
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         pool_timeout=settings.db_pool_timeout_seconds if settings else 10, connect_args=connect_args)


def server_timeouts(settings) -> str:
    """libpq `options` setting statement_timeout, lock_timeout and idle_in_transaction_session_timeout
    (milliseconds; a setting of 0 leaves the server's own)."""
    pairs = (("statement_timeout", settings.db_statement_timeout_seconds),
             ("lock_timeout", settings.db_lock_timeout_seconds),
             ("idle_in_transaction_session_timeout", settings.db_idle_in_transaction_timeout_seconds))
    return " ".join(f"-c {name}={max(1, round(seconds * 1000))}" for name, seconds in pairs if seconds > 0)


def _sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, emit BEGIN (the documented pysqlite recipe), so
    write transactions can ask for BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA secure_delete=ON")   # deleted rows are zeroed, not left in free space (retention.purge)
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_LOCK) else "BEGIN")


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on exit; holds the SQLite write lock from the start."""
    with Session(engine.execution_options(**{_WRITE_LOCK: True}), expire_on_commit=False) as session:
        with session.begin():
            yield session


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


def ping(engine: Engine, statement: str = "SELECT 1") -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
        return True
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as "not ready"
        log.warning("database not reachable: %s", exc)
        return False


def alembic_config(url: str | None = None, key_pepper: str | None = None):
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.attributes["database_url"] = normalise_url(url)
    if key_pepper is not None:
        cfg.attributes["key_pepper"] = key_pepper   # else migration 0003 reads IDV_KEY_PEPPER
    return cfg


def migrate(url: str, revision: str = "head", key_pepper: str | None = None) -> None:
    """Apply the Alembic migrations (works from any working directory)."""
    from alembic import command

    command.upgrade(alembic_config(url, key_pepper), revision)


def register(sub) -> None:
    p = sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    p.add_argument("--database-url", help="default: IDV_DATABASE_URL or SQLite under ./var/")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=_cmd_migrate, check_config=True)   # service/cli.py: refused settings end it first


def _cmd_migrate(args) -> int:
    from service.settings import get_settings

    url = args.database_url or get_settings().database_url
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    migrate(url, args.revision)
    print(f"database at {make_url(normalise_url(url)).render_as_string(hide_password=True)} is at {args.revision}")
    return 0


def schema_is_current(engine: Engine) -> bool:
    """Is the database at the latest migration?"""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
