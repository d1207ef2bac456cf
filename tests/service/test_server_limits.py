"""Issue 12, item 3: server limits, measured on loopback with bounded socket counts. 500 idle
(and slowly-writing) connections do not stop /healthz from answering within 1 s and are closed
after IDV_HEADER_TIMEOUT_SECONDS; connections past IDV_MAX_CONNECTIONS get a 503 envelope and are
closed; idle keep-alive connections close; repeated log lines are throttled."""
from __future__ import annotations

import logging
import resource
import socket
import threading
import time

import httpx
import pytest

from conftest import UnusedModels
from service.app import create_app
from service.server import LogThrottle, uvicorn_config
from service.settings import Settings

IDLE = 500


@pytest.fixture
def serve(tmp_path):
    """serve(**settings) -> (host, port) of `idverify serve`'s server config in a thread."""
    import uvicorn

    from service.records.engine import migrate

    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    running = []

    def start(**overrides):
        settings = Settings(database_url=url, **overrides)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn_config(create_app(settings, models=UnusedModels()), settings,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        running.append((server, thread, sock))
        return sock.getsockname()

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1024) == b""
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_do_not_starve_healthz(serve):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * IDLE + 200:
        pytest.skip("descriptor limit too low for this test")
    host, port = serve(header_timeout_seconds=2.0)
    idle = []
    try:
        for i in range(IDLE):
            s = socket.create_connection((host, port))
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # headers never finished (slowloris)
            idle.append(s)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = httpx.get(f"http://{host}:{port}/healthz", timeout=5)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200
        assert max(times) < 1.0, times
        time.sleep(2.5)
        closed = sum(_closed_by_server(s, 1.0) for s in idle[:50]) + sum(_closed_by_server(s, 0.2) for s in idle[50:])
        assert closed == IDLE
        print(f"\n/healthz with {IDLE} idle connections: max {max(times) * 1000:.0f} ms; all closed after the "
              "header timeout")
    finally:
        for s in idle:
            s.close()


def test_connections_past_the_cap_get_503_and_are_closed(serve):
    host, port = serve(max_connections=20, header_timeout_seconds=30)
    held = [socket.create_connection((host, port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection((host, port))
        extra.settimeout(5)
        answer = b""
        while chunk := extra.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503") and b'"server_busy"' in answer and b"retry-after: 1" in answer
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200


def test_idle_keep_alive_connections_close(serve):
    host, port = serve(keep_alive_seconds=1, header_timeout_seconds=30)
    s = socket.create_connection((host, port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(5)
    answer = s.recv(4096)
    while not answer.endswith(b'{"status":"ok"}'):   # headers and body may come in two segments
        answer += s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    assert _closed_by_server(s, 3.0)
    s.close()


def test_oversized_headers_are_refused(serve):
    host, port = serve(max_header_bytes=4096)
    s = socket.create_connection((host, port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000)   # still unfinished
    s.settimeout(5)
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b'"invalid_request"' in answer, answer[:100]
    s.close()


def test_repeated_log_lines_are_throttled():
    clock = [0.0]
    throttle = LogThrottle(burst=3, window=10, clock=lambda: clock[0])
    record = lambda: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",  # noqa: E731
                                       None, None)
    passed = [throttle.filter(record()) for _ in range(1000)]
    assert sum(passed) == 3
    clock[0] = 11
    r = record()
    assert throttle.filter(r) and "997 similar messages suppressed" in r.msg


def test_malformed_requests_get_the_envelope(serve):
    host, port = serve()
    s = socket.create_connection((host, port))
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    s.settimeout(5)
    answer = b""
    while chunk := s.recv(4096):
        answer += chunk
    s.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer and b'"invalid_request"' in answer
