"""/docs and /redoc in headless Chromium with every host but 127.0.0.1 unreachable (no DNS, a
dead proxy): the pages render the /verify operation, and every resource they requested was
served by this service. Skipped, with the reason, when Debian's chromium is absent."""
from __future__ import annotations

import pytest

from console_support import NEEDS_CHROMIUM, headless_chromium, wait_for
from service.app import create_app
from service.records.engine import migrate
from service.settings import Settings

pytestmark = NEEDS_CHROMIUM
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           "--proxy-server=http://127.0.0.1:9")  # loopback is never proxied


@pytest.fixture
def browser(tmp_path):
    yield from headless_chromium(tmp_path, *OFFLINE)


@pytest.fixture
def base(tmp_path, live_server, unused_models):
    url = f"sqlite:///{tmp_path / 'docs.db'}"
    migrate(url)
    return live_server(create_app(Settings(database_url=url), models=unused_models))


def _resources(d) -> list[str]:
    return d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")


def _text(d) -> str:
    return d.execute_script("return document.body ? document.body.innerText : ''")


def test_swagger_ui_renders_offline(browser, base):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(f"{base}/docs")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '.opblock-summary-path[data-path="/verify"]'),
             what="the /verify operation in Swagger UI")
    assert d.find_elements(By.CSS_SELECTOR, ".btn.authorize"), "the X-API-Key scheme is offered"
    resources = _resources(d)
    assert any(r.endswith("/openapi.json") for r in resources) and any("swagger-ui-bundle.js" in r for r in resources)
    assert all(r.startswith(base + "/") for r in resources), resources


def test_redoc_renders_offline(browser, base):
    d = browser
    d.get(f"{base}/redoc")
    wait_for(lambda: "/verify" in _text(d) and "X-API-Key" in _text(d), what="the /verify operation in ReDoc")
    resources = _resources(d)
    assert any("redoc.standalone.js" in r for r in resources)
    assert all(r.startswith(base + "/") for r in resources), resources
