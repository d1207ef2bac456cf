"""Purge that purges: after `idverify audit purge --days 0`, nothing in the database files decrypts
to a retained image with the keys the service had (IDV_IMAGE_KEY, and every data key that key
unwraps from what the files still hold). SQLite: the database and its WAL. PostgreSQL: the whole
data directory of a private cluster (tests/pg_cluster.py), stopped cleanly so every buffer is
written. Before the purge the same scan finds the images: the scan can fail.

A candidate is every place a retained-image header (IDV1/IDV2 + nonce) appears; it counts as
decryptable when AES-CTR (GCM's keystream) under some key turns the bytes after it into the
start of a JPEG or PNG: a fragment is enough, no tag or whole blob needed."""
from __future__ import annotations

import base64
from contextlib import contextmanager

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi.testclient import TestClient
from sqlalchemy import text

from conftest import reencoded
from pg_cluster import private_pg  # noqa: F401 - fixture
from service.app import create_app
from service.cli import main as cli
from service.records import audit, keys, retention
from service.records.engine import make_engine, migrate
from service.settings import Settings

KEY = retention.generate_key()
IMAGE_STARTS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
HEADER = len(retention.MAGIC) + retention.NONCE_LEN
WRAPPED_LEN = HEADER + 32 + 16


def _occurrences(data: bytes, magic: bytes):
    i = data.find(magic)
    while i != -1:
        yield i
        i = data.find(magic, i + 1)


def _keystream_opens(key: bytes, nonce: bytes, fragment: bytes) -> bool:
    plain = Cipher(algorithms.AES(key), modes.CTR(nonce + b"\x00\x00\x00\x02")).decryptor().update(fragment)
    return plain.startswith(IMAGE_STARTS)


def scan(paths, audit_ids) -> dict:
    """What the files give away: {"candidates", "data_keys", "images"} (images: decryptable)."""
    cipher = retention.ImageCipher(KEY)
    master = base64.urlsafe_b64decode(KEY)
    blobs = [p.read_bytes() for p in paths if p.exists()]
    data_keys = set()
    for data in blobs:
        for i in _occurrences(data, retention.KEY_MAGIC):
            for audit_id in audit_ids:
                try:
                    data_keys.add(cipher.unwrap(data[i:i + WRAPPED_LEN], audit_id))
                except retention.ImageDecryptError:
                    pass
    candidates = images = 0
    for data in blobs:
        for magic in (retention.MAGIC, retention.MAGIC_V2):
            for i in _occurrences(data, magic):
                nonce, fragment = data[i + len(magic):i + HEADER], data[i + HEADER:i + HEADER + 16]
                if len(fragment) < 16:
                    continue
                candidates += 1
                images += any(_keystream_opens(k, nonce, fragment) for k in (master, *data_keys))
    return {"candidates": candidates, "data_keys": len(data_keys), "images": images}


@contextmanager
def serving(url: str, models, bundled_images, n: int = 6):
    """A running service that made n /verify calls with retention on (real app and models);
    yields their request ids. It keeps its database connections open, as a server does (on
    SQLite the WAL then outlives any one connection)."""
    engine = make_engine(url)
    kiosk = keys.create_key(engine, "kiosk", "k")[1]
    engine.dispose()
    photos = {"id_photo": ("chip.png", (bundled_images / "Tom_Hanks_54745.png").read_bytes(), "image/png"),
              "live_photo": ("frame.jpg", reencoded((bundled_images / "Tom_Hanks_54745.png").read_bytes()), "image/jpeg")}
    app = create_app(Settings(database_url=url, retain_images=True, image_key=KEY), models=models)
    ids = []
    with TestClient(app) as client:
        for _ in range(n):
            r = client.post("/verify", headers={"X-API-Key": kiosk}, files=photos)
            assert r.status_code == 200, r.text
            ids.append(r.headers["X-Request-ID"])
        yield ids


def _purge(url: str, capsys) -> None:
    capsys.readouterr()
    assert cli(["audit", "--database-url", url, "purge", "--days", "0"]) == 0
    out = capsys.readouterr().out
    assert "deleted 12 retained images of 6 records" in out and "deleted 6 image data keys" in out, out


def _records_intact(url: str, ids: list[str]) -> None:
    engine = make_engine(url)
    try:
        assert all(not audit.get(engine, i).images_retained for i in ids)
        assert all(retention.load(engine, retention.ImageCipher(KEY), i, "id") is None for i in ids)
        assert audit.verify_chain(engine).ok
    finally:
        engine.dispose()


def test_sqlite_files_hold_no_decryptable_image_after_purge(tmp_path, models, bundled_images, capsys):
    path = tmp_path / "audit.db"
    url = f"sqlite:///{path}"
    migrate(url)
    files = [path, tmp_path / "audit.db-wal"]
    with serving(url, models, bundled_images) as ids:
        before = scan(files, ids)
        assert before["images"] >= 6 and before["data_keys"] == 6, before   # the scan finds what is there
        _purge(url, capsys)                # while the service runs
        after = scan(files, ids)
    assert after["images"] == 0 and after["data_keys"] == 0, after
    _records_intact(url, ids)
    print(f"\nSQLite: before purge {before}; after {after}")


def test_postgresql_data_directory_holds_no_decryptable_image_after_purge(private_pg, models,  # noqa: F811
                                                                         bundled_images, capsys):
    url = private_pg.create_database("idv")
    migrate(url)
    with serving(url, models, bundled_images) as ids:
        pass
    private_pg.stop()                      # a clean stop writes every buffer, the unlogged key table's too
    before = scan(private_pg.files(), ids)
    assert before["images"] >= 6 and before["data_keys"] == 6, before
    private_pg.start()
    _purge(url, capsys)
    private_pg.stop()
    after = scan(private_pg.files(), ids)
    # ciphertext stays behind (dead tuples, TOAST, the WAL), but no key for it does
    assert after["images"] == 0 and after["data_keys"] == 0, after
    private_pg.start()
    _records_intact(url, ids)
    print(f"\nPostgreSQL: before purge {before}; after {after}")


def test_images_kept_before_per_record_keys_still_show(tmp_path):
    """IDV1 blobs (under IDV_IMAGE_KEY itself, no data key) stay readable."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        audit_id = "22222222-2222-2222-2222-222222222222"
        audit.append(engine, id=audit_id, decision="rejected", latency_ms=1.0)
        cipher = retention.ImageCipher(KEY)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO retained_images (audit_id, side, ciphertext, created_at) "
                              "VALUES (:a, 'id', :c, CURRENT_TIMESTAMP)"),
                         {"a": audit_id, "c": cipher.encrypt(b"old image", audit_id, "id")})
        assert retention.load(engine, cipher, audit_id, "id") == b"old image"
    finally:
        engine.dispose()
