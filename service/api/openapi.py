"""The OpenAPI document and its pages.

/docs (Swagger UI) and /redoc (ReDoc) are served from local files: the bundles shipped by the
`fastapi-offline` package, mounted at /docs/assets. No CDN, no Google Fonts, no online validator
badge, and ReDoc's bundle is served with its one remote URL (the footer's Redocly logo, fetched
from cdn.redoc.ly) replaced by an inline blank image. Each page's Content-Security-Policy
allows only this origin (and Swagger UI's one inline script, by its hash).
The document drops FastAPI's default 422 `HTTPValidationError`: the service answers validation
errors 400 in its own envelope, declared per route (`schemas.errors`).
"""
from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
ASSETS_URL = "/docs/assets"
REDOC_REMOTE_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
BLANK_IMAGE = "data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E"
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}  # the badge would fetch validator.swagger.io
CSP = ("default-src 'none'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; frame-ancestors 'none'")


def without_default_validation_error(schema: dict) -> dict:
    """`schema` without FastAPI's HTTPValidationError answers and component schemas."""
    ref = "#/components/schemas/HTTPValidationError"
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if any(media.get("schema", {}).get("$ref") == ref for media in content.values()):
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def _local_only(page: HTMLResponse) -> HTMLResponse:
    inline = re.findall(r"<script>(.*?)</script>", page.body.decode("utf-8"), flags=re.S)
    scripts = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    page.headers["Content-Security-Policy"] = CSP.format(scripts=scripts).replace("'self' ;", "'self';")
    return page


@lru_cache(maxsize=1)
def redoc_bundle() -> bytes:
    """ReDoc's standalone bundle with no remote URL left in it."""
    return (ASSETS / "redoc.standalone.js").read_text("utf-8").replace(REDOC_REMOTE_LOGO, BLANK_IMAGE).encode("utf-8")


def install(app: FastAPI) -> None:
    """/openapi.json cleaned (built once, on first use); /docs and /redoc from local assets."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = without_default_validation_error(build())
        return app.openapi_schema

    app.openapi = openapi

    @app.get(f"{ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
    def redoc_js() -> Response:  # before the mount, which would serve the file as shipped
        return Response(redoc_bundle(), media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "public, max-age=86400"})

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _local_only(get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI", oauth2_redirect_url=None,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png", swagger_ui_parameters=SWAGGER_UI_PARAMETERS))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _local_only(get_redoc_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc", with_google_fonts=False,
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png"))
