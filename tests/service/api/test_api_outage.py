"""Issue 12, item 5: during a database outage /verify and the other routes answer 503
`database_unavailable` with Retry-After and X-Request-ID (never a bare 500, a dropped connection,
or a 200 without its audit record), and recover without a restart. PostgreSQL: the test's own
database refuses connections (ALLOW_CONNECTIONS false + pg_terminate_backend; the shared server
is never stopped). SQLite: a read-only database file."""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from conftest import reencoded
from service.app import create_app
from service.records import audit, keys
from service.records.engine import make_engine, migrate
from service.settings import Settings


def _photos(bundled_images):
    photo = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    return {"id_photo": ("a.png", photo, "image/png"), "live_photo": ("b.jpg", reencoded(photo), "image/jpeg")}


def _answer(r) -> tuple[str, str]:
    """Every answer is 200 or 503 database_unavailable with Retry-After, with X-Request-ID:
    (status, request id); the 200s' records are checked by _records_exist once the database is back."""
    assert "X-Request-ID" in r.headers, (r.status_code, r.text)
    if r.status_code == 503:
        assert r.json()["error"]["code"] == "database_unavailable" and int(r.headers["Retry-After"]) >= 1
        return "503", r.headers["X-Request-ID"]
    assert r.status_code == 200, (r.status_code, r.text)
    return "200", r.headers["X-Request-ID"]


def _records_exist(engine_url: str, answers) -> None:
    engine = make_engine(engine_url)
    try:
        for status, request_id in answers:
            if status == "200":
                assert audit.get(engine, request_id) is not None, ("a 200 without its audit record", request_id)
    finally:
        engine.dispose()


def _check(r, engine_url: str) -> str:
    answer = _answer(r)
    _records_exist(engine_url, [answer])
    return answer[0]


def test_postgresql_outage_under_load(pg_database_factory, models, bundled_images):
    url = pg_database_factory()
    migrate(url)
    engine = make_engine(url)
    kiosk = keys.create_key(engine, "kiosk", "k")[1]
    operator = keys.create_key(engine, "operator", "o")[1]
    engine.dispose()
    name = url.rsplit("/", 1)[1]
    admin = create_engine(url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    photos = _photos(bundled_images)

    def outage(on: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if on else "true"}'))
            if on:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                             {"d": name})

    answers: list[tuple[str, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with TestClient(create_app(Settings(database_url=url), models=models)) as client:
        def caller():
            while not stop.is_set():
                try:
                    r = client.post("/verify", headers={"X-API-Key": kiosk}, files=photos)
                    answers.append(_answer(r))
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)
                    return

        threads = [threading.Thread(target=caller) for _ in range(3)]
        try:
            for t in threads:
                t.start()
            time.sleep(2)
            outage(True)
            time.sleep(3)
            # the other routes during the outage
            for path in ("/audit", "/admin/keys"):
                r = client.get(path, headers={"X-API-Key": operator})
                assert r.status_code == 503 and r.headers["Retry-After"] and r.headers["X-Request-ID"]
            assert client.get("/readyz").status_code == 503
            assert client.get("/healthz").status_code == 200
            outage(False)
            time.sleep(3)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            outage(False)
            admin.dispose()
        assert not failures, failures
        statuses = [status for status, _ in answers]
        assert "503" in statuses and "200" in statuses, statuses
        _records_exist(url, answers)
        # recovered without a restart
        assert _check(client.post("/verify", headers={"X-API-Key": kiosk}, files=photos), url) == "200"
        assert client.get("/readyz").status_code == 200
    print(f"\n{len(answers)} /verify answers through a PostgreSQL outage: {statuses.count('200')} x 200 with "
          f"their record, {statuses.count('503')} x 503; none missing")


def test_sqlite_read_only_and_missing_database(tmp_path, models, bundled_images):
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(url)
    kiosk = keys.create_key(engine, "kiosk", "k")[1]
    engine.dispose()
    photos = _photos(bundled_images)
    app = create_app(Settings(database_url=url), models=models)
    with TestClient(app) as client:
        healthy = app.state.engine
        app.state.engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")   # read-only
        r = client.post("/verify", headers={"X-API-Key": kiosk}, files=photos)
        assert _check(r, url) == "503"
        assert audit.get(healthy, r.headers["X-Request-ID"]) is None
        app.state.engine = create_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")      # unreachable
        r = client.post("/verify", headers={"X-API-Key": kiosk}, files=photos)
        assert _check(r, url) == "503"
        app.state.engine = healthy
        assert _check(client.post("/verify", headers={"X-API-Key": kiosk}, files=photos), url) == "200"
