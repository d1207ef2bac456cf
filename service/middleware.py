"""ASGI middleware every answer passes through (limits in docs/security.md):

- `SecurityHeaders`: `Cache-Control: no-store` and `X-Content-Type-Options: nosniff` on every
  answer that does not set its own (console static files keep their caching, get nosniff).
- `BodyDeadline`: the request body must arrive within `settings.body_timeout_seconds` of the
  request's start, or the route reading it gets 408 `request_timeout` (a slow-drip body can no
  longer hold a worker). Only while the body is incomplete: later receives (a streaming answer
  listening for the client going away) are passed through.
- `CatchAll`: an exception no handler took becomes the 500 `internal_error` envelope with an
  `X-Request-ID` (logged with it), and the connection stays usable: Starlette's own last-resort
  handler re-raises, which makes the server drop the connection.
- `AccessLog`: one access line per request (logger `idverify.access`, service/logs.py), and an
  `X-Request-ID` on every answer that has none of its own (/verify's is its audit record's id).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from urllib.parse import quote

from service.errors import REQUEST_TIMEOUT, ApiError
from service.logsafe import printable

log = logging.getLogger("idverify.app")
access_log = logging.getLogger("idverify.access")
CALLER = "caller"   # request.state key: who made the call, for the access line (remember_caller)


class SecurityHeaders:
    def __init__(self, app, static_prefix: str = "/console/static") -> None:
        self.app = app
        self.static_prefix = static_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith(self.static_prefix)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if b"cache-control" not in names and not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyDeadline:
    def __init__(self, app, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.seconds or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        body_done = False

        async def receive_by_deadline():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(REQUEST_TIMEOUT, f"the request body did not arrive within {self.seconds:g} s",
                               None, status=408) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_by_deadline, send)


def error_body(code: str, message: str) -> bytes:
    return json.dumps(ApiError(code, message).to_dict()).encode()


class HttpOnly:
    """An ASGI middleware whose `http(scope, receive, send)` sees HTTP requests only; lifespan
    and other scopes pass straight through."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope, receive, send) -> None:
        raise NotImplementedError


class CatchAll(HttpOnly):
    async def http(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last resort: an envelope, not a dropped connection
            request_id = str(uuid.uuid4())
            log.error("unhandled error on %s %s (request %s)", printable(str(scope.get("method"))),
                      printable(str(scope.get("path"))), request_id, exc_info=exc)
            if started:  # too late for an answer of our own: the server ends the connection
                raise
            body = error_body("internal_error", "internal error; quote the request id to support")
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})


def remember_caller(request, key) -> None:
    """The authenticated key (an ApiKey or a console Principal: `prefix`, `name`), for the access line."""
    setattr(request.state, CALLER, {"key": key.prefix, "key_name": key.name,
                                    "key_id": getattr(key, "key_id", None) or getattr(key, "id", None)})


def _request_id(headers: list) -> str | None:
    return next((value.decode("latin-1") for name, value in headers if name.lower() == b"x-request-id"), None)


class AccessLog(HttpOnly):
    """Outermost: sees every answer, the 500s of CatchAll and the answers of every route included."""

    async def http(self, scope, receive, send) -> None:
        started = time.perf_counter()
        answer: dict = {"status": 500, "request_id": None}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                request_id = _request_id(headers)
                if request_id is None:
                    request_id = str(uuid.uuid4())
                    headers.append((b"x-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
                answer.update(status=message["status"], request_id=request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, answer, (time.perf_counter() - started) * 1000.0)

    @staticmethod
    def _log(scope, answer: dict, ms: float) -> None:
        caller = (scope.get("state") or {}).get(CALLER) or {}
        client = scope.get("client")
        fields = {
            "request_id": answer["request_id"] or "-",
            "method": scope.get("method", ""),
            # as sent, percent-encoded again: no spaces or control characters reach the line
            "path": quote(scope.get("path", ""), safe="/:@!$&'()*+,;=-._~")[:300],
            "route": getattr(scope.get("route"), "path", None),
            "status": answer["status"],
            "ms": round(ms, 1),
            "key": caller.get("key") or "-",
            "key_name": caller.get("key_name"),
            "key_id": caller.get("key_id"),
            "client": client[0] if client else "-",
        }
        access_log.info("%s %s %s %.1fms request_id=%s key=%s client=%s", fields["method"], fields["path"],
                        fields["status"], fields["ms"], fields["request_id"], fields["key"], fields["client"],
                        extra={"access": fields})
