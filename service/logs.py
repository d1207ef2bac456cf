"""Log lines an operator can grep, on stderr, as text or JSON lines (`IDV_LOG_FORMAT`).

- Every HTTP request leaves one access line (service/middleware.py's `AccessLog`, logger
  `idverify.access`): method, path, status, milliseconds, request id (the `X-Request-ID` of the
  answer; on /verify the audit record's id), the caller's key prefix and name, client address.
- Repeated warnings and errors are throttled (service/server.py's `LogThrottle`), and the line
  after a suppressed stretch says how many were dropped; access and other info lines never are.
- `logging_config(settings)` is a `logging.config.dictConfig` dictionary. `idverify serve` hands
  it to uvicorn as its `log_config`, so every worker process logs the same way, and uvicorn's own
  access log is off (ours replaces it).
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

ACCESS_LOGGER = "idverify.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the access
    fields of an access line, and the traceback of an exception as one string."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "access", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def make_handler(log_format: str = "text", stream=None, burst: int = 10, window: float = 10.0) -> logging.Handler:
    """The one handler: stderr (or `stream`), the format asked for, repeated errors throttled."""
    from service.logsafe import EscapeControl
    from service.server import LogThrottle

    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(EscapeControl())   # request data cannot drive a terminal or forge lines
    handler.addFilter(LogThrottle(burst, window))
    return handler


def logging_config(settings) -> dict:
    """dictConfig for `idverify serve` (and its workers): everything through the root logger's
    one handler; uvicorn's loggers propagate to it; uvicorn's access log is silenced."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"()": "service.logs.make_handler", "log_format": settings.log_format}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            ACCESS_LOGGER: {"level": "INFO"},
            "alembic": {"level": "WARNING"},   # the start-up's schema check: no plugin chatter
            "uvicorn": {"handlers": [], "propagate": True, "level": "INFO"},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": "INFO"},
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
        },
    }


def configure(settings) -> None:
    """Apply `logging_config` in this process (the CLI, before uvicorn applies it again)."""
    import logging.config

    logging.config.dictConfig(logging_config(settings))
