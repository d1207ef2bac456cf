"""The operator console at /console: server-rendered pages over the audit trail.

Sign-in exchanges an operator or admin key (form POST) for a server-side session
(`sessions.py`); every POST form carries the session's CSRF token (`csrf.py`). Pages: the
record list (filters, keyset paging, counts, CSV export), a record's detail (with the retained
images when retention is on), an overview with server-rendered SVG charts (`charts.py`), the
state of the hash chain (`routes.py`, one record in `record_page.py`), and, for admins, the API keys (`keys_page.py`). No JavaScript build, no
client-side framework.
"""
from __future__ import annotations


def install(app) -> None:
    """Mount the console's routes and static files on the service app."""
    from starlette.staticfiles import StaticFiles

    from service.console import keys_page, record_page, routes

    app.include_router(routes.router)
    app.include_router(record_page.router)
    app.include_router(keys_page.router)
    app.mount("/console/static", StaticFiles(directory=routes.STATIC_DIR), name="console-static")
