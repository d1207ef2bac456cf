"""The OpenAPI document: the X-API-Key scheme with each route's roles, an answer schema for
every route, the error envelope under every error status a route declares, no FastAPI default
HTTPValidationError, /metrics as text/plain; /docs and /redoc reference only local assets."""
from __future__ import annotations

import re

import pytest

from service.records import keys

ROUTES = {  # (method, path) -> roles that may call it (None: no key)
    ("post", "/verify"): ["kiosk", "admin"],
    ("get", "/audit"): ["operator", "admin"],
    ("get", "/audit/{record_id}"): ["operator", "admin"],
    ("get", "/admin/keys"): ["admin"],
    ("post", "/admin/keys"): ["admin"],
    ("delete", "/admin/keys/{key_id}"): ["admin"],
    ("get", "/healthz"): None,
    ("get", "/readyz"): None,
    ("get", "/metrics"): None,
}


@pytest.fixture
def spec(make_client):
    r = make_client().get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_every_route_is_documented_with_its_roles(spec):
    found = {(m, p) for p, item in spec["paths"].items() for m in item}
    assert found == set(ROUTES)
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"]}
    for (method, path), roles in ROUTES.items():
        op = spec["paths"][path][method]
        if roles is None:
            assert "security" not in op, path
        else:
            assert op["security"] == [{"ApiKey": roles}], path
            assert roles == [r for r in keys.ROLES if r in roles]


def test_answers_and_errors_have_schemas(spec):
    envelope = "#/components/schemas/ErrorAnswer"
    for (method, path), roles in ROUTES.items():
        responses = spec["paths"][path][method]["responses"]
        ok = [s for s in responses if s.startswith("2")]
        assert len(ok) == 1, path
        content = responses[ok[0]]["content"]
        if path == "/metrics":
            assert list(content) == ["text/plain"]
        else:
            assert content["application/json"]["schema"].get("$ref", "").startswith("#/components/schemas/"), path
        errors = [s for s in responses if s[0] in "45"]
        if roles is not None:
            assert {"401", "403", "500"} <= set(errors), path
        for status in errors:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            expected = "#/components/schemas/ReadyAnswer" if path == "/readyz" else envelope
            assert ref == expected, (path, status)
    assert set(spec["paths"]["/verify"]["post"]["responses"]) == {
        "200", "400", "401", "403", "409", "413", "415", "422", "429", "500", "503"}
    assert "404" in spec["paths"]["/audit/{record_id}"]["get"]["responses"]
    assert spec["components"]["schemas"]["ErrorAnswer"]["properties"]["error"]["$ref"].endswith("/ErrorDetail")


def test_no_default_validation_error_schema(spec):
    assert "HTTPValidationError" not in str(spec) and "ValidationError" not in spec["components"]["schemas"]


def test_validation_errors_answer_the_declared_envelope(make_client, admin_key):
    """What the document says instead of FastAPI's 422: 400 in the envelope."""
    r = make_client().get("/audit", params={"limit": "many"}, headers={"X-API-Key": admin_key})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_reference_only_local_assets(make_client, page):
    client = make_client()
    r = client.get(page)
    assert r.status_code == 200
    urls = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', r.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert b"https://cdn." not in asset.content, url  # ReDoc's footer logo is replaced
    if page == "/docs":
        assert '"validatorUrl": null' in r.text
