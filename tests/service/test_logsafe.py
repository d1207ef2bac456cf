"""Terminal escape codes and line breaks from a URL never reach the log as such: the service's
own lines carry the path with its control characters escaped, and `idverify serve`'s handlers
escape every record (uvicorn's and libraries' too)."""
from __future__ import annotations

import io
import logging

from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from conftest import UnusedModels
from service import logsafe
from service.app import create_app
from service.records import keys
from service.records.engine import make_engine, migrate
from service.settings import Settings

# clear the screen, set the terminal title, ring the bell, reverse the text that follows
EVIL = "/audit/%1b%5b2J%1b%5d0;owned%07x%e2%80%aey"


def test_a_path_with_escape_codes_is_logged_escaped(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    engine = make_engine(url)
    operator = keys.create_key(engine, "operator", "o")[1]
    engine.dispose()
    app = create_app(Settings(database_url=url), models=UnusedModels())
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="idverify.app"):
        app.state.engine = create_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}")   # an outage: logs the path
        r = client.get(EVIL, headers={"X-API-Key": operator})
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    lines = [rec.getMessage() for rec in caplog.records if "database unavailable" in rec.getMessage()]
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert all(ch.isprintable() for ch in line), repr(line)
    assert "/audit/\\x1b[2J\\x1b]0;owned\\x07x\\u202ey" in line


def test_served_log_handlers_escape_every_record():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("idverify.test_logsafe")
    logger.addHandler(handler)
    logger.propagate = False
    handler.addFilter(logsafe.EscapeControl())
    try:
        logger.warning('%s - "%s %s HTTP/1.1" %d', "127.0.0.1:1", "GET", "/x\x1b[31mred\r\nforged", 404)
        logger.warning("from %(who)s", {"who": "a\x1bb"})
        logger.warning("preformatted \x07 %s", ValueError("bad\x1b"))
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert text.splitlines() == ['127.0.0.1:1 - "GET /x\\x1b[31mred\\x0d\\x0aforged HTTP/1.1" 404',
                                 "from a\\x1bb", "preformatted \\x07 bad\\x1b"]
    assert logsafe.printable("plain /audit/{id} é") == "plain /audit/{id} é"
