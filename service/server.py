"""`idverify serve`'s HTTP server: uvicorn with the limits of docs/security.md.

- header timeout (`settings.header_timeout_seconds`): a connection must deliver a complete
  request line and headers within this of opening, or of its previous answer; else it is closed
  (slowloris). uvicorn has no such timeout of its own: `GuardedH11Protocol` adds it.
- keep-alive timeout (`settings.keep_alive_seconds`, uvicorn's `timeout_keep_alive`).
- body deadline: service/middleware.py's `BodyDeadline` (`settings.body_timeout_seconds`).
- connection cap (`settings.max_connections`, at most the descriptor limit less a reserve): a
  connection beyond it is answered 503 `server_busy` (JSON, Retry-After) and closed at once, so
  the process never runs out of descriptors (where /healthz stopped answering and asyncio logged
  every failed accept).
- header size cap (`settings.max_header_bytes`, uvicorn's `h11_max_incomplete_event_size`).
- rate-limited error logging (`LogThrottle`): the same warning or error at most `burst` times
  per `window` seconds, then one line saying how many were suppressed. Info lines (the access
  log among them: service/logs.py) are never throttled.
"""
from __future__ import annotations

import json
import logging
import resource
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol, h11

FD_RESERVE = 64   # descriptors kept for the database pool, model files, logs


def _raw_answer(status: bytes, code: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with the error envelope, for errors before the app is reached."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra +
            b"cache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _busy_answer() -> bytes:
    return _raw_answer(b"503 Service Unavailable", "server_busy", "too many open connections; retry shortly",
                       b"retry-after: 1\r\n")


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 2048

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(_busy_answer())
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        # still waiting for a request's headers (not inside a request or its answer)
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed request, as the error envelope instead of plain text."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.write(_raw_answer(b"400 Bad Request", "invalid_request", msg))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()   # the next request's headers are due in time too

    def connection_lost(self, exc) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def raise_descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def protocol_for(settings, descriptors: int | None = None) -> type[GuardedH11Protocol]:
    descriptors = descriptors or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = max(1, min(int(settings.max_connections), descriptors - FD_RESERVE))
    return type("IdvH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(settings.header_timeout_seconds), "max_connections": cap})


def __getattr__(name: str):
    """`WorkerH11Protocol`: the guarded protocol built in each uvicorn worker process from its
    own settings (IDV_ environment) and descriptor limit. Several workers are spawned processes
    that receive the config pickled, and a class made at run time does not pickle: they get
    this import path instead (PEP 562 module attribute, built once per process)."""
    if name == "WorkerH11Protocol":
        from service.settings import get_settings

        cls = protocol_for(get_settings(), raise_descriptor_limit())
        cls.__name__ = cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def uvicorn_config(app, settings, **kw):
    """uvicorn's config for `idverify serve`; our access line replaces uvicorn's (service/logs.py)."""
    import uvicorn

    several = int(kw.get("workers") or 1) > 1
    http = "service.server:WorkerH11Protocol" if several else protocol_for(settings, raise_descriptor_limit())
    kw.setdefault("access_log", False)
    # proxy_headers off: X-Forwarded-For is believed only from IDV_TRUSTED_PROXIES (service/proxies.py),
    # not from any local process as uvicorn's default would
    return uvicorn.Config(
        app, http=http, timeout_keep_alive=settings.keep_alive_seconds,
        h11_max_incomplete_event_size=settings.max_header_bytes, backlog=1024, proxy_headers=False, **kw)


class LogThrottle(logging.Filter):
    """At most `burst` warnings or errors with the same logger, level and message template per
    `window` seconds (a flood of one failure, e.g. asyncio's accept errors, whatever their
    arguments); the first such record after a suppressed stretch says how many were dropped.
    Records below WARNING always pass: each access line is a different event, not a repeat."""

    level = logging.WARNING

    def __init__(self, burst: int = 10, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen.clear()
            entry = self._seen.setdefault(key, [now, 0, 0])   # window start, count, suppressed
            if now - entry[0] >= self.window:
                suppressed = entry[2]
                entry[:] = [now, 0, 0]
                if suppressed:
                    record.msg = f"{record.msg} [{suppressed} similar messages suppressed]"
            entry[1] += 1
            if entry[1] > self.burst:
                entry[2] += 1
                return False
            if entry[1] == self.burst:
                record.msg = (f"{record.msg} [{self.burst} like this within {self.window:g} s: "
                              "more are counted, not logged]")
        return True
