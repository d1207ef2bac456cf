"""POST /verify with the real pipeline and real faces (insightface's bundled photos; LFW pairs
when ../shared/data is there): the answer's contract, the audit record it leaves, parallel calls
through a real uvicorn server, metrics and readiness. Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import hashlib
import io
import threading

import httpx
from sqlalchemy import select

from conftest import reencoded
from service.records import audit, keys
from service.records.tables import AuditRecord

ANSWER_KEYS = {"request_id", "decision", "score", "threshold", "far_target", "scores", "scoring", "rule", "model_version",
               "faces", "timings_ms", "live_photo_seen_before"}
STAGES = ("decode", "detect", "align", "embed")
FACE_KEYS = {"box", "landmarks", "detection_score", "face_px", "faces_seen", "quality"}


def check_answer(body: dict, models) -> None:
    assert set(body) == ANSWER_KEYS, body
    assert body["decision"] in ("match", "no_match")
    assert 0.0 <= body["score"] <= 1.0
    assert body["decision"] == ("match" if body["score"] >= body["threshold"] else "no_match")
    assert body["threshold"] == models.threshold.score and body["far_target"] == models.threshold.far
    assert body["model_version"] == models.model_version
    assert set(body["faces"]) == {"id_photo", "live_photo"}
    for face in body["faces"].values():
        assert FACE_KEYS <= set(face), face
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and face["faces_seen"] >= 1
        assert face["face_px"] > 0 and 0 < face["detection_score"] <= 1 and isinstance(face["quality"], dict)
    assert body["rule"] == "score_threshold"
    assert {f"{side}.{stage}" for side in ("id_photo", "live_photo") for stage in STAGES} | {"compare", "total"} \
        <= set(body["timings_ms"])


def test_verify_multipart_answer_audit_and_metrics(make_client, models, bundled_images, engine, role_keys):
    client = make_client(models)
    from PIL import Image

    id_bytes = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    frame = io.BytesIO()  # the same face as a smaller JPEG camera frame
    face = Image.open(bundled_images / "Tom_Hanks_54745.png").convert("RGB")
    face.resize((face.width * 4 // 5, face.height * 4 // 5)).save(frame, "JPEG", quality=90)
    live_bytes = frame.getvalue()
    r = client.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                    files={"id_photo": ("chip.png", id_bytes, "image/png"),
                           "live_photo": ("frame.jpg", live_bytes, "image/jpeg")},
                    data={"device_id": "kiosk-12", "reference": "case 4711"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_answer(body, models)
    assert r.headers["X-Request-ID"] == body["request_id"]
    assert body["faces"]["id_photo"]["faces_seen"] == 1 and body["faces"]["live_photo"]["faces_seen"] == 1
    assert body["faces"]["live_photo"]["quality"]["multiple_faces"] is False

    # the record was committed before the answer: read it back through another connection
    rec = client.get(f"/audit/{body['request_id']}", headers={"X-API-Key": role_keys["operator"]}).json()
    assert rec["decision"] == body["decision"] and rec["score"] == body["score"]
    assert rec["threshold"] == body["threshold"] and rec["model_version"] == body["model_version"]
    assert rec["device_id"] == "kiosk-12" and rec["reference"] == "case 4711"
    assert rec["rule"] == "score_threshold" and rec["liveness"] is None
    assert rec["key_id"] == keys.lookup(engine, role_keys["kiosk"]).id and rec["error_code"] is None
    assert rec["faces"]["id_photo"]["sha256"] == hashlib.sha256(id_bytes).hexdigest()
    assert rec["faces"]["live_photo"]["sha256"] == hashlib.sha256(live_bytes).hexdigest()
    assert rec["faces"]["live_photo"]["faces_seen"] == body["faces"]["live_photo"]["faces_seen"]
    assert rec["faces"]["id_photo"]["box"] == body["faces"]["id_photo"]["box"]
    assert rec["faces"]["live_photo"]["quality"] == body["faces"]["live_photo"]["quality"]
    assert audit.verify_chain(engine).ok

    metrics = client.get("/metrics").text
    assert f'idverify_requests_total{{method="POST",outcome="{body["decision"]}",route="/verify"}} 1.0' in metrics
    for stage in ("decode", "detect", "align", "embed", "compare"):
        assert f'idverify_stage_duration_seconds_count{{stage="{stage}"}}' in metrics
    assert 'idverify_request_duration_seconds_bucket{le="0.005",method="POST",route="/verify"}' in metrics \
        or 'idverify_request_duration_seconds_bucket{method="POST",route="/verify",le="0.005"}' in metrics


def test_timings_per_photo_add_up_within_the_total(make_client, models, bundled_images, engine, role_keys):
    """Both photos are analysed at once: each photo's stages are kept under its own name, and
    each photo's stages plus the comparison fit in `total`, the request's wall time."""
    photo = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    r = make_client(models).post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                                 files={"id_photo": ("a.png", photo), "live_photo": ("b.jpg", reencoded(photo))})
    assert r.status_code == 200, r.text
    timings = r.json()["timings_ms"]
    rounding = 0.005 * len(timings)   # the answer rounds each to 0.01 ms
    for side in ("id_photo", "live_photo"):
        own = {k.split(".", 1)[1]: ms for k, ms in timings.items() if k.startswith(side + ".") and ":" not in k}
        assert set(own) == set(STAGES), timings
        assert sum(own.values()) + timings["compare"] <= timings["total"] + rounding, timings
    per_family = ({f"{side}.{stage}:{f}" for side in ("id_photo", "live_photo") for stage in ("align", "embed")
                   for f in models.pipeline.families} if len(models.pipeline.families) > 1 else set())
    assert set(timings) == {f"{side}.{stage}" for side in ("id_photo", "live_photo") for stage in STAGES} \
        | {"compare", "total"} | per_family
    record = audit.get(engine, r.json()["request_id"])
    assert set(record.timings_ms) == set(timings) - {"total"}
    assert record.latency_ms <= timings["total"] + rounding


def test_verify_json_lfw_pairs(make_client, models, lfw_pairs, role_keys):
    client = make_client(models)
    scores = {}
    for kind, (a, b) in lfw_pairs.items():
        r = client.post("/verify", headers={"X-API-Key": role_keys["admin"]}, json={
            "id_photo": base64.b64encode(a.read_bytes()).decode(),
            "live_photo": "data:image/jpeg;base64," + base64.b64encode(b.read_bytes()).decode(),
            "device_id": "lfw", "reference": kind})
        assert r.status_code == 200, r.text
        check_answer(r.json(), models)
        scores[kind] = r.json()["score"]
    assert scores["same"] > scores["different"], scores


def test_verify_accepts_other_formats(make_client, models, bundled_images, role_keys):
    from PIL import Image

    face = Image.open(bundled_images / "Tom_Hanks_54745.png").convert("RGB")

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        face.save(buf, fmt)
        return buf.getvalue()

    client = make_client(models)
    for id_fmt, live_fmt in (("WEBP", "JPEG2000"), ("BMP", "JPEG")):
        r = client.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                        files={"id_photo": ("a", encoded(id_fmt)), "live_photo": ("b", encoded(live_fmt))})
        assert r.status_code == 200, (id_fmt, live_fmt, r.text)
        check_answer(r.json(), models)


def test_parallel_verifies_through_uvicorn(models, bundled_images, db_url, engine, role_keys, live_server):
    from service.app import create_app
    from service.settings import Settings

    base = live_server(create_app(Settings(database_url=db_url), models=models))
    photo = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    n = 6
    answers: list = [None] * n

    def call(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            answers[i] = http.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                                   files={"id_photo": ("a.png", photo), "live_photo": ("b.jpg", reencoded(photo))},
                                   data={"reference": f"parallel-{i}"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.status_code == 200 for r in answers), [getattr(r, "text", r) for r in answers]
    ids = {r.json()["request_id"] for r in answers}
    assert len(ids) == n
    with engine.connect() as conn:
        rows = conn.execute(select(AuditRecord.id, AuditRecord.seq, AuditRecord.reference)).all()
    assert {row.id for row in rows} == ids
    assert sorted(row.seq for row in rows) == list(range(1, n + 1))
    assert {row.reference for row in rows} == {f"parallel-{i}" for i in range(n)}
    report = audit.verify_chain(engine)
    assert report.ok and report.checked == n

    with httpx.Client(base_url=base) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200


def test_readiness(make_client, models, db_url):
    from sqlalchemy import create_engine

    client = make_client(models)
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": True, "models": True, "warm": True}

    client.app.state.engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none")  # port 9: closed
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"] is False
    assert client.get("/healthz").status_code == 200  # the process is still up

    class Cold:
        warm = False
        model_version = "cold"

    cold = make_client(Cold())
    r = cold.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"database": True, "models": True, "warm": False}
