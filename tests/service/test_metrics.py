"""/metrics stays bounded whatever callers send: every label comes from a closed set (standard
methods else "other", the app's route templates else "unmatched", known outcomes else "other"),
so thousands of random 8 KB methods and random paths add no series. The served models show as
`idverify_model_info` and decided pairs' scores as `idverify_score` per family."""
from __future__ import annotations

import random
import re
import string

import pytest
from fastapi.testclient import TestClient

from conftest import UnusedModels
from service.app import create_app
from service.metrics import OUTCOMES, Metrics, method_label, outcome_label
from service.records.engine import migrate
from service.settings import Settings

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"   # RFC 9110 tchar


@pytest.fixture
def client(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url)
    with TestClient(create_app(Settings(database_url=url), models=UnusedModels())) as c:
        yield c


def _series(text: str) -> set[str]:
    """The exposition's series (name and labels), without their values."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_random_methods_and_paths_add_no_series(client):
    rng = random.Random(7)
    token = lambda n: "".join(rng.choice(TOKEN_CHARS) for _ in range(n))  # noqa: E731
    client.request(token(8192), "/healthz")
    client.request(token(8192), "/" + token(40))
    client.get("/" + token(40))
    client.get("/audit/" + token(30))
    client.get("/metrics")
    before = client.get("/metrics").text
    for i in range(2000):   # the acceptance: 2,000 random 8 KB methods
        path = "/healthz" if i % 2 else "/" + token(200).replace("?", "").replace("#", "")
        r = client.request(token(8192), path)
        assert r.status_code in (404, 405), r.status_code
    for _ in range(1000):   # and random paths with a normal method
        assert client.get("/audit/" + token(30).replace("?", "").replace("#", "")).status_code in (401, 404)
    after = client.get("/metrics").text
    assert len(after.encode()) - len(before.encode()) < 10 * 1024
    assert _series(after) == _series(before)
    assert 'method="other"' in after and 'route="unmatched"' in after
    assert all(len(s) < 200 for s in _series(after)), max(_series(after), key=len)[:300]


def test_label_values_are_closed():
    assert method_label("GET") == "GET" and method_label("get") == "other" and method_label("X" * 8192) == "other"
    assert outcome_label("match") == "match" and outcome_label("no_face") == "no_face" and outcome_label("404") == "404"
    assert outcome_label("x" * 100) == "other" and outcome_label("600") == "other"
    assert {"same_image", "live_photo_replayed", "device_mismatch", "request_timeout"} <= OUTCOMES


@pytest.mark.parametrize("scoring", ["fused", "towers"])
def test_model_info_and_scores_per_family(make_client, bundled_images, role_keys, scoring):
    """One info series per served family (and the fusion, when it decides), each family's own
    score counted once per decided pair, in the bucket at or above it."""
    from conftest import reencoded
    from service.face.loader import load_models
    from service.settings import Settings

    models = load_models(Settings(scoring=scoring))
    client = make_client(models)
    photo = (bundled_images / "Tom_Hanks_54745.png").read_bytes()
    r = client.post("/verify", headers={"X-API-Key": role_keys["kiosk"]},
                    files={"id_photo": ("a.png", photo), "live_photo": ("b.jpg", reencoded(photo))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scoring"] == scoring
    text = client.get("/metrics").text
    info = sorted(re.findall(r"^idverify_model_info\{(.*)\} (\S+)$", text, re.M))
    want = [(f'family="{f}",scoring="{scoring}",version="{t.manifest["version"]}"', "1.0")
            for f, t in models.pipeline.families.items()]
    if scoring == "fused":
        want.append((f'family="fused",scoring="fused",version="{models.pipeline.fusion.manifest["version"]}"', "1.0"))
    assert info == sorted(want), info
    for family, score in {**body["scores"], **({"fused": body["score"]} if scoring == "fused" else {})}.items():
        assert f'idverify_score_count{{family="{family}"}} 1.0' in text
        # the score fell in its bucket: counted at the first bound at or above it, not below
        below = [float(b) for b in re.findall(rf'idverify_score_bucket\{{family="{family}",le="([0-9.]+)"\}} 0\.0', text)]
        assert below and max(below) < score
    assert ('family="fused"' in text) is (scoring == "fused")


def test_metrics_without_models_register_no_family():
    m = Metrics()
    m.set_models(UnusedModels())
    m.observe_scores({"towers": 0.9}, "towers", 0.9)
    text = m.render()[0].decode()
    assert "idverify_score_count" not in text and "idverify_model_info{" not in text
