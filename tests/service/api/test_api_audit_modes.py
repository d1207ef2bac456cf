"""GET /audit filters by scoring mode and by model version, and each item carries its
`scoring`, `model_version` and per-family `scores`. Records of every mode come from the real
audit writer; on SQLite and PostgreSQL."""
from __future__ import annotations

from console_support import FUSED_VERSION, seed_modes


def _ids(client, key, **params) -> set[str]:
    items, cursor = [], None
    while True:   # pages of 2: the filter holds across the keyset pages
        r = client.get("/audit", params={**params, "limit": 2, **({"cursor": cursor} if cursor else {})},
                       headers={"X-API-Key": key})
        assert r.status_code == 200, (params, r.text)
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return {i["id"] for i in items}


def test_audit_filters_by_scoring_and_model_version(make_client, engine, role_keys):
    seeded = seed_modes(engine)
    client, key = make_client(), role_keys["operator"]

    def by(*modes):
        return {r.id for m in modes for r in seeded[m]}

    assert _ids(client, key, scoring="fused") == by("fused")
    assert _ids(client, key, scoring="sface") == by("sface")
    assert _ids(client, key, scoring="fallback:towers") == by("fallback:towers")
    assert _ids(client, key, scoring="towers") == by("towers", "legacy")   # older records by their model version
    assert _ids(client, key, scoring="tower_") == set()
    assert _ids(client, key, model_version=FUSED_VERSION) == by("fused", "fallback:towers", "rejected")
    assert _ids(client, key, model_version="towers:dual-v1", scoring="towers") == by("legacy")
    assert _ids(client, key, model_version="sface:1", scoring="fused") == set()
    assert _ids(client, key, scoring="fused", min_score=0.9) == {seeded["fused"][0].id, seeded["fused"][2].id}

    item = client.get(f"/audit/{seeded['fused'][1].id}", headers={"X-API-Key": key}).json()
    assert (item["score"], item["scoring"], item["model_version"]) == (0.62, "fused", FUSED_VERSION)
    assert item["scores"] == {"towers": 0.80, "sface": 0.21} and item["threshold"] == 0.9812
    fallback = client.get("/audit", params={"scoring": "fallback:towers"}, headers={"X-API-Key": key}).json()
    assert fallback["items"][0]["scores"] == {"towers": 0.95, "sface": None}


def test_refused_mode_values_answer_400(make_client, engine, role_keys):
    seed_modes(engine)
    client = make_client()
    for params, field in (({"scoring": ""}, "scoring"), ({"scoring": "FUSED"}, "scoring"),
                          ({"scoring": "fallback:" + "t" * 24}, "scoring"),
                          ({"model_version": "v" * 65}, "model_version")):
        r = client.get("/audit", params=params, headers={"X-API-Key": role_keys["operator"]})
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["field"] == field
    ok = client.get("/audit", params={"model_version": "v" * 64}, headers={"X-API-Key": role_keys["operator"]})
    assert ok.status_code == 200 and ok.json()["items"] == []
