"""Helpers shared by the console, retention, audit-chain and browser tests (not a test module)."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from service.records import audit

def served_models(request):
    """The served models (conftest's session fixture): they ship in the repository."""
    return request.getfixturevalue("models")


def lfw_pairs(lfw: Path, same: int, different: int) -> list[tuple[str, Path, Path]]:
    """(kind, id image, live image) from pairs.txt fold 1: `same` matched, `different` mismatched."""
    def image(name: str, n: str) -> Path:
        return lfw / "images" / name / f"{name}_{int(n):04d}.jpg"

    out: list[tuple[str, Path, Path]] = []
    s = d = 0
    for line in (lfw / "pairs.txt").read_text().splitlines()[1:601]:
        parts = line.split()
        if len(parts) == 3 and s < same:
            out.append(("same", image(parts[0], parts[1]), image(parts[0], parts[2])))
            s += 1
        elif len(parts) == 4 and d < different:
            out.append(("different", image(parts[0], parts[1]), image(parts[2], parts[3])))
            d += 1
    return out


def append_record(engine, **columns):
    """An audit record through the real audit writer, with realistic defaults."""
    base = dict(id=str(uuid.uuid4()), key_id=None, decision="no_match", score=0.42, threshold=0.91,
                far_target=1e-3, model_version="towers:test", latency_ms=180.5, id_faces=1, live_faces=1,
                id_box=[52.0, 61.5, 190.2, 201.0], live_box=[80.0, 70.0, 170.0, 180.0],
                id_quality={"sharpness": 81.2, "brightness": 120.4, "blurry": False, "small_face": False},
                live_quality={"sharpness": 40.1, "brightness": 99.0, "blurry": False, "small_face": False},
                id_sha256="a" * 64, live_sha256="b" * 64,
                timings_ms={"decode": 2.5, "detect": 60.0, "align": 1.0, "embed": 30.0, "compare": 0.1})
    base.update(columns)
    return audit.append(engine, **base)


def seed(engine, key_id=None) -> list:
    """18 records: 6 match (dev-a), 6 no_match (dev-b), 6 rejected (no_face / image_undecodable)."""
    out = []
    for i in range(6):
        out.append(append_record(engine, key_id=key_id, decision="match", score=0.95 + i / 200, device_id="dev-a",
                                 reference=f"case-m{i}", latency_ms=150 + 10 * i))
    for i in range(6):
        out.append(append_record(engine, key_id=key_id, decision="no_match", score=0.5 + i / 20, device_id="dev-b",
                                 reference=f"case-n{i}", latency_ms=200 + 10 * i))
    for i in range(6):
        code = "no_face" if i % 2 == 0 else "image_undecodable"
        out.append(append_record(engine, key_id=key_id, decision="rejected", score=None, device_id="dev-a",
                                 reference=f"case-r{i}", error_code=code, error_field="live_photo",
                                 live_faces=0 if code == "no_face" else None, live_box=None, live_quality=None,
                                 latency_ms=40 + i))
    return out


FUSED_VERSION = "fusion:dual-v2-sface1(towers:dual-v2,sface:1)"


def seed_modes(engine) -> dict[str, list]:
    """Records of every scoring mode, each on its own scale with its own threshold, by the real
    audit writer: towers (int8), sface, fused, a fused call that fell back to the towers, a
    record written before `scoring` and `scores` were stored (read as towers by its
    model_version), and a rejected fused-mode call. mode -> records, oldest first."""
    out: dict[str, list] = {m: [] for m in ("towers", "sface", "fused", "fallback:towers", "legacy", "rejected")}
    for i, (d, s) in enumerate((("match", 0.93), ("no_match", 0.71), ("match", 0.90))):
        out["towers"].append(append_record(engine, decision=d, score=s, threshold=0.8831, scoring="towers",
                                           scores={"towers": s}, model_version="towers:dual-v2-int8",
                                           device_id="gate-1", reference=f"t{i}"))
    for i, (d, s) in enumerate((("match", 0.52), ("no_match", 0.18))):
        out["sface"].append(append_record(engine, decision=d, score=s, threshold=0.4125, scoring="sface",
                                          scores={"sface": s}, model_version="sface:1", device_id="gate-2",
                                          reference=f"s{i}"))
    for i, (d, s, t, f) in enumerate((("match", 0.991, 0.96, 0.63), ("no_match", 0.62, 0.80, 0.21),
                                       ("match", 0.985, 0.93, 0.55))):
        out["fused"].append(append_record(engine, decision=d, score=s, threshold=0.9812, scoring="fused",
                                          scores={"towers": t, "sface": f}, model_version=FUSED_VERSION,
                                          device_id="gate-1", reference=f"f{i}"))
    out["fallback:towers"].append(append_record(
        engine, decision="match", score=0.95, threshold=0.8831, scoring="fallback:towers",
        scores={"towers": 0.95, "sface": None}, model_version=FUSED_VERSION, device_id="gate-2", reference="fb0"))
    out["legacy"].append(append_record(engine, decision="match", score=0.93, threshold=0.91,
                                       model_version="towers:dual-v1", device_id="gate-1", reference="old0"))
    out["rejected"].append(append_record(engine, decision="rejected", score=None, threshold=0.9812,
                                         model_version=FUSED_VERSION, error_code="no_face", error_field="live_photo",
                                         device_id="gate-1", reference="r0"))
    return out


CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def sign_in(client, key: str, expect: int = 303):
    """Sign in through the form (GET for the login token, POST the key)."""
    page = client.get("/console/login")
    r = client.post("/console/login", data={"key": key, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == expect, (r.status_code, r.text[:500])
    return r


# --- headless Chromium (Debian's chromium + chromium-driver; nothing is downloaded) ----------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NEEDS_CHROMIUM = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed "
                       "(apt-get install -y chromium chromium-driver); .ci/run installs it"),
    pytest.mark.skipif(not CHROMEDRIVER.exists(), reason="/usr/bin/chromedriver is missing "
                       "(apt-get install -y chromium-driver)"),
]


def headless_chromium(tmp_path: Path, *flags: str):
    """Generator for a fixture: a Selenium driver of headless Chromium (downloads go to
    `driver.downloads`), quit afterwards. `flags`: more command-line switches."""
    from selenium import webdriver  # in the `test` extra: a missing selenium is an error, not a skip
    from selenium.webdriver.chrome.service import Service  # a driver path given: Selenium Manager never runs

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,860",
                 "--lang=en-GB", *flags):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "safebrowsing.enabled": False})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.implicitly_wait(0)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout=20.0, what="condition"):
    """Poll `condition` until it is truthy. While a page is being replaced (a form was just
    submitted), an element found a moment ago goes stale or is not there yet: poll again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
