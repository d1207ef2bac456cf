"""The console in a real browser: headless Chromium from Debian's `chromium` package, driven by
Selenium through Debian's /usr/bin/chromedriver (nothing is downloaded). The real app is served by
uvicorn on a free port over a temporary SQLite database with image retention on; its records come
from real /verify calls through the real pipeline (LFW pairs when ../shared/data is there, else
insightface's bundled photos), or, only when the models cannot be loaded, from the audit writer.

Flow: sign in with an operator key, filter to no-matches, export the CSV, open a record (its
retained images render), look at the overview, sign out. Screenshots of the list, a record and
the overview go to reports/screenshots/. Skipped, with the reason, when /usr/bin/chromium is absent
(.ci/run installs it).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from conftest import reencoded
from console_support import NEEDS_CHROMIUM, headless_chromium, lfw_pairs, served_models, wait_for as _wait
from service.records import keys, retention
from service.app import create_app
from service.records.engine import make_engine, migrate
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
SHOTS = ROOT / "reports" / "screenshots"

pytestmark = NEEDS_CHROMIUM


def _photo_pairs(request) -> list[tuple[str, bytes, bytes]]:
    try:
        lfw = request.getfixturevalue("lfw")
        return [(kind, a.read_bytes(), b.read_bytes()) for kind, a, b in lfw_pairs(lfw, same=4, different=5)]
    except pytest.skip.Exception:
        images = request.getfixturevalue("bundled_images")
        chip = (images / "Tom_Hanks_54745.png").read_bytes()
        return [("bundled", chip, reencoded(chip))] + [("bundled", chip, (images / n).read_bytes())
                                                       for n in ("t1.jpg", "mask_white.jpg")]


def _blank_jpeg(shade: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (shade, 140, 150)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def console_site(request, tmp_path, live_server):
    """(base URL, operator key, how the records were made) of a served app with records."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    migrate(url)
    engine = make_engine(url)
    kiosk = keys.create_key(engine, "kiosk", "lobby-kiosk")[1]
    operator = keys.create_key(engine, "operator", "Dana (operator)")[1]
    app = create_app(Settings(database_url=url, retain_images=True, image_key=retention.generate_key()),
                     models=served_models(request))
    base = live_server(app)
    import httpx

    calls = _photo_pairs(request) + [("no face", _blank_jpeg(), _blank_jpeg(100))]
    with httpx.Client(base_url=base, timeout=120) as client:
        for i, (kind, id_photo, live_photo) in enumerate(calls):
            r = client.post("/verify", headers={"X-API-Key": kiosk},
                            files={"id_photo": ("chip.jpg", id_photo), "live_photo": ("live.jpg", live_photo)},
                            data={"device_id": f"kiosk-{1 + i % 3}", "reference": f"case-{1000 + i} ({kind})"})
            assert r.status_code in (200, 422), r.text
    made = "real /verify calls"
    engine.dispose()
    return base, operator, made


@pytest.fixture
def browser(tmp_path):
    yield from headless_chromium(tmp_path)


def _full_page_screenshot(d, path: Path) -> None:
    width, height = d.get_window_size()["width"], d.get_window_size()["height"]
    page_h = d.execute_script("return document.documentElement.scrollHeight")
    inner_h = d.execute_script("return window.innerHeight")
    d.set_window_size(width, min(page_h + (height - inner_h), 4000))
    try:
        d.save_screenshot(str(path))
    finally:
        d.set_window_size(width, height)


def test_console_in_headless_chromium(console_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, operator_key, made = console_site
    SHOTS.mkdir(parents=True, exist_ok=True)
    d = browser

    # not signed in: the console sends us to the sign-in page
    d.get(f"{base}/console")
    assert "/console/login" in d.current_url
    d.find_element(By.ID, "key").send_keys(operator_key)
    d.find_element(By.ID, "sign-in").click()
    _wait(lambda: d.current_url.rstrip("/").endswith("/console"), what="the records list")
    assert operator_key not in d.current_url and operator_key not in d.page_source
    assert "Dana (operator)" in d.find_element(By.CSS_SELECTOR, "header .who").text
    # the session cookie is HttpOnly: page scripts cannot read it
    assert "idv_console" not in d.execute_script("return document.cookie")
    all_rows = d.find_elements(By.CSS_SELECTOR, "#records tbody tr")
    assert len(all_rows) >= 8, made
    # the first list view starts a verification of the chain in the background; reload for it
    _wait(lambda: d.refresh() or "chain verified OK up to seq" in d.find_element(By.ID, "chain-state").text,
          what="the chain state on the list")
    d.save_screenshot(str(SHOTS / "console-list.png"))

    # filter to no-matches
    Select(d.find_element(By.ID, "f-decision")).select_by_value("no_match")
    d.find_element(By.ID, "apply-filters").click()
    _wait(lambda: "decision=no_match" in d.current_url, what="the filtered list")
    decisions = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#records tbody td .dec")]
    assert decisions and set(decisions) == {"no_match"}, decisions
    assert f"{len(decisions)} record" in d.find_element(By.ID, "counts").text

    # export the filtered list as CSV (a real download)
    d.find_element(By.ID, "export-csv").click()
    csv_file = _wait(lambda: next((p for p in d.downloads.glob("*.csv")), None), what="the CSV download")
    _wait(lambda: not list(d.downloads.glob("*.crdownload")) and csv_file.stat().st_size > 0, what="download end")
    rows = list(csv.DictReader(io.StringIO(csv_file.read_text(encoding="utf-8"))))
    assert len(rows) == len(decisions) and {r["decision"] for r in rows} == {"no_match"}
    assert all(len(r["record_hash"]) == 64 for r in rows)

    # open the newest no-match
    d.find_elements(By.CSS_SELECTOR, "#records a.open")[0].click()
    _wait(lambda: "/console/records/" in d.current_url, what="the record page")
    assert rows[0]["id"] in d.page_source
    assert d.find_element(By.ID, "record-chain").text == "chain links OK"
    images = d.find_elements(By.CSS_SELECTOR, "img.retained")
    if made == "real /verify calls":
        assert len(images) == 2
        _wait(lambda: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                          for i in images), what="the retained images")
    _full_page_screenshot(d, SHOTS / "console-detail.png")

    # overview
    d.find_element(By.LINK_TEXT, "Overview").click()
    _wait(lambda: "/console/overview" in d.current_url, what="the overview")
    assert len(d.find_elements(By.CSS_SELECTOR, "section.chart svg")) == 4
    assert "threshold" in d.page_source
    _full_page_screenshot(d, SHOTS / "console-overview.png")

    # chain state, then sign out
    d.find_element(By.LINK_TEXT, "Chain").click()
    _wait(lambda: "/console/chain" in d.current_url, what="the chain page")
    assert d.find_element(By.ID, "chain-state").text.startswith("Verified OK up to seq")
    d.find_element(By.ID, "sign-out").click()
    _wait(lambda: "/console/login" in d.current_url, what="the sign-in page after sign-out")
    d.get(f"{base}/console")
    assert "/console/login" in d.current_url
    assert not [c for c in d.get_cookies() if c["name"] == "idv_console"]


def test_admin_manages_keys_in_headless_chromium(tmp_path, live_server, unused_models, browser):
    """Sign in as admin, create a kiosk key (its plaintext shown once), revoke it (the console asks
    first; Cancel keeps it); the chain page carries its meta refresh and the list its error-code select."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    SHOTS.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    migrate(url)
    engine = make_engine(url)
    admin = keys.create_key(engine, "admin", "Ada (admin)")[1]
    base = live_server(create_app(Settings(database_url=url), models=unused_models))
    d = browser
    d.get(f"{base}/console/login")
    d.find_element(By.ID, "key").send_keys(admin)
    d.find_element(By.ID, "sign-in").click()
    _wait(lambda: d.current_url.rstrip("/").endswith("/console"), what="the records list")
    assert "no_face" in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "f-error-code")).options]
    d.find_element(By.LINK_TEXT, "Keys").click()
    _wait(lambda: "/console/keys" in d.current_url, what="the keys page")
    Select(d.find_element(By.ID, "new-role")).select_by_value("kiosk")
    d.find_element(By.ID, "new-name").send_keys("lobby kiosk 12")
    d.find_element(By.ID, "create").click()
    plaintext = _wait(lambda: d.find_elements(By.ID, "new-key"), what="the new key")[0].text
    made = keys.lookup(engine, plaintext)
    assert made is not None and made.role == "kiosk" and made.name == "lobby kiosk 12"
    d.get(f"{base}/console/keys")
    assert plaintext not in d.page_source
    # revoke asks first: Cancel leaves the key as it was
    d.find_element(By.CSS_SELECTOR, f"#key-{made.id} a.revoke").click()
    _wait(lambda: d.current_url.endswith(f"/console/keys/{made.id}/revoke"), what="the confirmation page")
    assert "lobby kiosk 12" in d.find_element(By.ID, "confirm-name").text
    assert keys.lookup(engine, plaintext) is not None
    d.find_element(By.ID, "cancel-revoke").click()
    _wait(lambda: d.current_url.endswith("/console/keys"), what="the keys page after Cancel")
    assert "no" == d.find_element(By.ID, f"key-{made.id}").find_elements(By.TAG_NAME, "td")[5].text
    assert keys.lookup(engine, plaintext) is not None
    # ... and revokes once confirmed
    d.find_element(By.CSS_SELECTOR, f"#key-{made.id} a.revoke").click()
    _wait(lambda: d.find_elements(By.ID, "confirm-revoke-button"), what="the confirmation page")
    d.save_screenshot(str(SHOTS / "console-revoke-confirm.png"))
    d.find_element(By.ID, "confirm-revoke-button").click()
    _wait(lambda: d.current_url.endswith("/console/keys") and "yes, " in d.find_element(By.ID, f"key-{made.id}").text,
          what="the revoked row")
    assert keys.lookup(engine, plaintext) is None
    d.get(f"{base}/console/chain")
    assert d.find_elements(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')
    engine.dispose()


def test_record_page_shows_the_chip_photo_enlarged_beside_the_live_photo(request, tmp_path, live_server, lfw, browser):
    """A real /verify of a simulated chip photo (102 x 126, ~1 KB JPEG 2000) against a live LFW
    photo, with retention on: the record page shows the chip at the live photo's height, its
    pixels kept sharp, and states its native size. Screenshot: reports/screenshots/console-record-chip.png
    (docs/img/console-record-chip.png is a copy)."""
    import httpx
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    from models.eval.chipsim import CHIP_H, CHIP_W, chip_rng, simulate_chip

    name = "Aaron_Peirsol"
    img = np.asarray(Image.open(lfw / "images" / name / f"{name}_0001.jpg").convert("RGB"))
    chip = simulate_chip(img, None, chip_rng("console-chip", 0))
    url = f"sqlite:///{tmp_path / 'chip.db'}"
    migrate(url)
    engine = make_engine(url)
    kiosk = keys.create_key(engine, "kiosk", "lobby-kiosk")[1]
    operator = keys.create_key(engine, "operator", "Dana (operator)")[1]
    engine.dispose()
    base = live_server(create_app(Settings(database_url=url, retain_images=True, image_key=retention.generate_key()),
                                  models=served_models(request)))
    r = httpx.post(f"{base}/verify", headers={"X-API-Key": kiosk}, timeout=120,
                   files={"id_photo": ("chip.jp2", chip),
                          "live_photo": ("live.jpg", (lfw / "images" / name / f"{name}_0002.jpg").read_bytes())},
                   data={"device_id": "kiosk-1", "reference": "case-chip"})
    assert r.status_code == 200, r.text
    d = browser
    d.get(f"{base}/console/login")
    d.find_element(By.ID, "key").send_keys(operator)
    d.find_element(By.ID, "sign-in").click()
    _wait(lambda: d.current_url.rstrip("/").endswith("/console"), what="the records list")
    d.get(f"{base}/console/records/{r.headers['x-request-id']}")
    chip_img = d.find_element(By.CSS_SELECTOR, "#side-id img.retained")
    live_img = d.find_element(By.CSS_SELECTOR, "#side-live img.retained")
    _wait(lambda: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                      for i in (chip_img, live_img)), what="both photos")
    natural = d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", chip_img)
    assert natural == [CHIP_W, CHIP_H]   # served at its own size ...
    chip_box, live_box = chip_img.rect, live_img.rect
    assert chip_box["height"] == pytest.approx(live_box["height"], abs=1)   # ... shown at the live photo's height
    assert chip_box["height"] >= 2 * CHIP_H - 1 and chip_box["width"] == pytest.approx(
        chip_box["height"] * CHIP_W / CHIP_H, abs=2)
    assert chip_box["y"] == pytest.approx(live_box["y"], abs=1) and chip_box["x"] < live_box["x"]   # side by side
    assert d.execute_script("return getComputedStyle(arguments[0]).imageRendering", chip_img) == "pixelated"
    assert d.find_element(By.ID, "native-id").text == f"native {CHIP_W} × {CHIP_H} px, shown at the live photo's height"
    assert d.find_element(By.ID, "native-live").text == "native 250 × 250 px"
    SHOTS.mkdir(parents=True, exist_ok=True)
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "side-id"))
    d.save_screenshot(str(SHOTS / "console-record-chip.png"))
