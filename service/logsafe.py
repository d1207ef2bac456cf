"""Log lines that cannot drive a terminal or forge other lines: control characters (ESC, CR,
LF, BEL, ...) and other unprintable ones (bidi overrides) from request data are written as
escapes (`\\x1b`, `\\u202e`).

- `printable(text)`: for the service's own log calls that carry request data (paths).
- `EscapeControl`: a logging filter applying it to every record's message and arguments, on
  the one log handler of `idverify serve` and its workers (service/logs.py), so that lines from
  uvicorn and libraries get it too; `install` puts it on another process's handlers.
"""
from __future__ import annotations

import logging


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _safe(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return printable(value if isinstance(value, str) else str(value))


class EscapeControl(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = printable(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_safe(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _safe(v) for k, v in record.args.items()}
        return True


def install(names=("", "uvicorn", "uvicorn.error", "uvicorn.access")) -> EscapeControl:
    """On every handler of these loggers (the root logger's and uvicorn's)."""
    escape = EscapeControl()
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(escape)
    return escape
