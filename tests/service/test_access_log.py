"""Logs an operator can grep: every request leaves one access line (request id, method, path,
status, ms, key prefix, client address), in text or JSON (IDV_LOG_FORMAT); only repeated
warnings and errors are throttled, and the throttle says how many it dropped. Every answer
carries an X-Request-ID, the 401 and 405 answers of /verify included."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import reencoded

from console_support import sign_in
from service import logs
from service.records import keys
from service.server import LogThrottle

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 500
MS = r"\d+\.\dms"


@pytest.fixture
def access_lines():
    """(stream, detach): the production handler (format, throttle) on the access logger."""
    def attach(log_format: str):
        stream = io.StringIO()
        handler = logs.make_handler(log_format, stream)
        logger = logging.getLogger(logs.ACCESS_LOGGER)
        logger.addHandler(handler)
        attached.append((logger, handler, logger.level))
        logger.setLevel(logging.INFO)
        return stream

    attached: list = []
    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """`idverify serve` of this checkout in a subprocess (JSON logs on stderr, one worker, the
    real models) over a migrated SQLite database with a key per role: (base URL, keys, stop)
    where stop() ends the server and returns its stderr lines."""
    from service.records.engine import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    engine = make_engine(url)
    made = {role: keys.create_key(engine, role, f"access-{role}") for role in keys.ROLES}
    engine.dispose()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IDV_")}
    env.update(IDV_DATABASE_URL=url, IDV_PORT=str(port), IDV_WORKERS="1", IDV_LOG_FORMAT="json")
    err = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "idverify serve did not answer /readyz"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)

    def stop() -> list[str]:
        proc.send_signal(signal.SIGTERM)   # what docker stop and Kubernetes send
        proc.wait(timeout=60)
        err.close()
        return (tmp_path / "stderr.log").read_text().splitlines()

    yield base, made, stop
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.close()


def test_500_mixed_requests_leave_500_access_lines(served, bundled_images):
    base, made, stop = served
    kiosk, operator, admin = (made[r][1] for r in ("kiosk", "operator", "admin"))
    chip = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    calls = [  # (method, path, key, body): what a kiosk, an operator's tools and probes send
        ("GET", "/healthz", None, None),
        ("POST", "/verify", None, None),                     # 401, before the body is read
        ("GET", "/verify", kiosk, None),                     # 405
        ("POST", "/verify", kiosk, {"id_photo": ("chip.png", chip)}),   # 400 missing_field, audited
        ("GET", "/audit?limit=2", operator, None),
        ("GET", "/audit", kiosk, None),                      # 403
        ("GET", "/console", None, None),                     # 303 to the sign-in page
        ("GET", "/admin/keys", admin, None),
        ("GET", "/metrics", None, None),
        ("GET", "/no/such/page", None, None),                # 404
    ]
    plan = [calls[i % len(calls)] for i in range(REQUESTS - 10)]
    live = reencoded(chip)   # the same face in other bytes: the ID photo itself is refused (same_image)
    plan += [("POST", "/verify", kiosk, {"id_photo": ("chip.png", chip), "live_photo": ("live.jpg", live)})] * 10

    def call(item):
        method, path, key, files = item
        headers = {"X-API-Key": key} if key else {}
        with httpx.Client(base_url=base, timeout=120) as client:
            r = client.request(method, path, headers=headers, files=files, data={"device_id": "kiosk-9"} if files else None)
        return r.headers.get("x-request-id"), r.status_code, method, path.split("?")[0], key

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, plan))
    lines = stop()

    access = [json.loads(line) for line in lines if '"idverify.access"' in line]
    probes = [a for a in access if a["path"] == "/readyz"]   # the fixture's wait for the server
    access = [a for a in access if a["path"] != "/readyz"]
    assert probes and {p["status"] for p in probes} <= {200, 503}
    assert len(access) == REQUESTS, f"{len(access)} access lines for {REQUESTS} requests"
    by_id = {a["request_id"]: a for a in access}
    assert len(by_id) == REQUESTS and all(rid for rid, *_ in answers)
    prefixes = {plaintext: key.prefix for key, plaintext in made.values()}
    ids = {plaintext: key.id for key, plaintext in made.values()}
    for rid, status, method, path, key in answers:
        line = by_id[rid]   # each answer's X-Request-ID is on exactly one line
        assert (line["status"], line["method"], line["path"]) == (status, method, path)
        assert line["client"] == "127.0.0.1" and line["ms"] >= 0
        # the key once it is authenticated (a 405 is answered before: no key was looked at)
        assert line["key"] == (prefixes[key] if key and status not in (401, 405) else "-")
        assert line["key_id"] == (ids[key] if key and status not in (401, 405) else None)
    statuses = sorted({a["status"] for a in access})
    assert statuses == [200, 303, 400, 401, 403, 404, 405], statuses
    assert sum(a["path"] == "/verify" and a["status"] == 200 for a in access) == 10
    # every stderr line is JSON, and uvicorn's own access line is off (ours replaces it)
    assert all(json.loads(line) for line in lines)
    assert not [line for line in lines if '"uvicorn.access"' in line]


def test_text_lines_and_request_ids_on_401_and_405(make_client, role_keys, engine, access_lines):
    stream = access_lines("text")
    client = make_client()
    r401 = client.post("/verify")
    r405 = client.get("/verify", headers={"X-API-Key": role_keys["kiosk"]})
    assert (r401.status_code, r405.status_code) == (401, 405)
    for r in (r401, r405):
        assert str(uuid.UUID(r.headers["x-request-id"])) == r.headers["x-request-id"]
    r403 = client.get("/audit", headers={"X-API-Key": role_keys["kiosk"]})
    assert r403.json()["error"]["message"] == "a kiosk key may not read the audit trail"
    r = client.get("/admin/keys", headers={"X-API-Key": role_keys["operator"]})
    assert r.json()["error"]["message"] == "an operator key may not manage API keys"
    sign_in(client, role_keys["operator"])
    page = client.get("/console")
    operator = keys.lookup(engine, role_keys["operator"])
    kiosk = keys.lookup(engine, role_keys["kiosk"])

    lines = stream.getvalue().splitlines()
    assert len(lines) == 7   # 401, 405, 403, 403, the sign-in page, the sign-in, the list
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO idverify.access: "
    expected = [
        f"POST /verify 401 {MS} request_id={r401.headers['x-request-id']} key=- client=testclient",
        f"GET /verify 405 {MS} request_id={r405.headers['x-request-id']} key=- client=testclient",
        f"GET /audit 403 {MS} request_id={r403.headers['x-request-id']} key={re.escape(kiosk.prefix)} client=testclient",
        f"GET /admin/keys 403 {MS} request_id={r.headers['x-request-id']} key={re.escape(operator.prefix)} "
        "client=testclient",
        f"GET /console/login 200 {MS} request_id=[-0-9a-f]{{36}} key=- client=testclient",
        f"POST /console/login 303 {MS} request_id=[-0-9a-f]{{36}} key={re.escape(operator.prefix)} client=testclient",
        f"GET /console 200 {MS} request_id={page.headers['x-request-id']} key={re.escape(operator.prefix)} "
        "client=testclient",
    ]
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(stamp + pattern, line), (line, pattern)
    assert all(role_keys["operator"] not in line for line in lines)


def test_a_hostile_path_stays_on_one_line(make_client, access_lines):
    stream = access_lines("json")
    make_client().get("/a%0Aforged%20INFO%20line%1b[0m")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["path"] == "/a%0Aforged%20INFO%20line%1B%5B0m"


def test_throttle_passes_every_access_line_and_counts_repeated_errors():
    clock = [0.0]
    throttle = LogThrottle(burst=3, window=10, clock=lambda: clock[0])
    access = lambda i: logging.LogRecord(logs.ACCESS_LOGGER, logging.INFO, __file__, 1,  # noqa: E731
                                         "%s %s request_id=%s", ("GET", "/healthz", i), None)
    assert all(throttle.filter(access(i)) for i in range(1000))
    error = lambda: logging.LogRecord("asyncio", logging.ERROR, __file__, 1,  # noqa: E731
                                      "socket.accept() out of system resource", None, None)
    records = [error() for _ in range(1000)]
    passed = [r for r in records if throttle.filter(r)]
    assert len(passed) == 3 and "more are counted, not logged" in passed[-1].getMessage()
    clock[0] = 11
    r = error()
    assert throttle.filter(r) and "997 similar messages suppressed" in r.getMessage()


def test_json_lines_carry_an_exception_on_one_line():
    stream = io.StringIO()
    logger = logging.getLogger("idverify.test-json")
    handler = logs.make_handler("json", stream)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.error("failed %s", "here", exc_info=True)
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["message"] == "failed here" and record["logger"] == "idverify.test-json"
    assert "ValueError: boom" in record["exception"] and record["time"].endswith("+00:00")
