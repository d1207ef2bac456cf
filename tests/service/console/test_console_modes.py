"""Records of different scoring modes stay readable side by side in the console: the list filters
by scoring mode and by model version, every score is shown with its mode beside it (list,
record page, overview, CSV), the record page and the CSV carry each family's own score, and the
overview draws one histogram per mode with its own threshold, labelled "<mode> <threshold>",
no label over another. Runs on SQLite and PostgreSQL; records come from the real audit writer."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from console_support import FUSED_VERSION, append_record, seed_modes, sign_in
from service.console import charts, stats


@pytest.fixture
def client(make_client, role_keys):
    c = make_client()
    sign_in(c, role_keys["operator"])
    return c


def _rows(html: str) -> list[dict]:
    """The list's rows as {id, score, mode, version} (the cells as shown)."""
    body = re.search(r'<tbody>(.*?)</tbody>', html, re.S).group(1)
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        rid = re.search(r'href="/console/records/([0-9a-f-]{36})"', row)
        if rid:
            out.append({"id": rid.group(1), "score": cells[3], "mode": cells[4], "version": cells[10]})
    return out


def _ids(client, **params) -> set[str]:
    r = client.get("/console", params=params)
    assert r.status_code == 200, (params, r.status_code, r.text[:300])
    return {row["id"] for row in _rows(r.text)}


def _by(seeded, *modes) -> set[str]:
    return {r.id for m in modes for r in seeded[m]}


# --- list: filters and the mode beside each score ---------------------------------------------

def test_list_filters_by_scoring_mode(client, engine):
    seeded = seed_modes(engine)
    assert _ids(client, scoring="fused") == _by(seeded, "fused")
    assert _ids(client, scoring="sface") == _by(seeded, "sface")
    assert _ids(client, scoring="fallback:towers") == _by(seeded, "fallback:towers")
    # a score written before `scoring` was stored is read, and filtered, as its model version's family
    assert _ids(client, scoring="towers") == _by(seeded, "towers", "legacy")
    # LIKE's wildcard is a plain character here: "tower_" is no family
    assert _ids(client, scoring="tower_") == set()
    assert _ids(client, scoring="fused", decision="match") == {seeded["fused"][0].id, seeded["fused"][2].id}
    r = client.get("/console", params={"scoring": "fused"})
    assert "<strong>3</strong> records" in r.text and "2 match" in r.text
    assert 'name="scoring" value="fused"' in r.text


def test_list_filters_by_model_version(client, engine):
    seeded = seed_modes(engine)
    assert _ids(client, model_version=FUSED_VERSION) == _by(seeded, "fused", "fallback:towers", "rejected")
    assert _ids(client, model_version="towers:dual-v1") == _by(seeded, "legacy")
    assert _ids(client, model_version="towers:dual-v2-int8", scoring="towers") == _by(seeded, "towers")
    assert _ids(client, model_version="towers") == set()                       # exact, not a prefix
    assert _ids(client, model_version=FUSED_VERSION, scoring="fallback:towers") == _by(seeded, "fallback:towers")


def test_list_shows_the_mode_beside_every_score_and_the_model_version(client, engine):
    seeded = seed_modes(engine)
    rows = {row["id"]: row for row in _rows(client.get("/console").text)}
    expected_mode = {"towers": "towers", "sface": "sface", "fused": "fused", "fallback:towers": "fallback:towers",
                     "legacy": "towers", "rejected": ""}
    for mode, records in seeded.items():
        for rec in records:
            row = rows[rec.id]
            assert row["mode"] == expected_mode[mode], (mode, row)
            assert row["version"] == rec.model_version
            assert (row["score"] == "") == (rec.score is None) and (row["mode"] == "") == (rec.score is None)


def test_list_counts_scores_per_mode_and_records_per_version_with_links(client, engine):
    seeded = seed_modes(engine)
    html = client.get("/console", params={"scoring": "sface"}).text
    mix = re.search(r'<p class="mix" id="mix">(.*?)</p>', html, re.S).group(1)
    modes = dict(re.findall(r'class="mode">([^<]+)</a> (\d+)', mix))
    assert modes == {"fused": "3", "towers": "4", "sface": "2", "fallback:towers": "1"}  # all modes, to switch to
    versions = dict(re.findall(r'class="version">([^<]+)</a> (\d+)', mix))
    assert versions == {FUSED_VERSION: "5", "towers:dual-v2-int8": "3", "sface:1": "2", "towers:dual-v1": "1"}
    link = re.search(r'<a href="([^"]+)" class="mode">fused</a>', mix).group(1).replace("&amp;", "&")
    assert link.startswith("?") and "scoring=fused" in link and "scoring=sface" not in link
    assert _ids(client, **dict(parse_qsl(link[1:]))) == _by(seeded, "fused")
    # the filter form offers the modes and versions seen
    for name, offered in (("f-scoring-modes", modes), ("f-model-versions", versions)):
        options = re.search(rf'<datalist id="{name}">(.*?)</datalist>', html).group(1)
        assert re.findall(r'<option value="([^"]+)">', options) == list(offered)    # most first


@pytest.mark.parametrize("name,value,why", [
    ("scoring", "Fused", "a scoring mode"), ("scoring", "fused; drop table", "a scoring mode"),
    ("scoring", "fallback:" + "x" * 30, "a scoring mode"), ("scoring", "a\x00b", "NUL"),
    ("model_version", "x" * 65, "at most 64 characters"), ("model_version", "towers:\x00", "NUL")])
def test_refused_mode_filters_answer_400(client, engine, make_client, role_keys, name, value, why):
    seed_modes(engine)
    for page in ("/console", "/console/overview", "/console/export.csv"):
        r = client.get(page, params={name: value})
        assert r.status_code == 400, (page, r.status_code)
        assert f'data-field="{name}"' in r.text and why in r.text
        assert 'id="records"' not in r.text                  # nothing was queried
        j = client.get(page, params={name: value}, headers={"Accept": "application/json"})
        assert j.status_code == 400 and j.json()["error"]["code"] == "invalid_request"
        assert j.json()["error"]["field"] == name
    api = make_client().get("/audit", params={name: value}, headers={"X-API-Key": role_keys["operator"]})
    assert api.status_code == 400 and api.json()["error"]["field"] == name and why in api.json()["error"]["message"]


# --- record page --------------------------------------------------------------------------------

def _family_rows(html: str) -> dict[str, tuple[str, str]]:
    table = re.search(r'<table class="family-scores" id="family-scores">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r'<tr data-family="([^"]+)"><td class="mode">[^<]*</td><td class="num">([^<]*)</td>\s*'
                      r'<td>([^<]*)</td></tr>', table)
    return {family: (score, role) for family, score, role in rows}


def test_record_page_shows_the_mode_and_each_familys_score(client, engine):
    seeded = seed_modes(engine)
    fused = seeded["fused"][1]
    html = client.get(f"/console/records/{fused.id}").text
    assert '<dd id="score">0.6200 <span class="mode">fused</span></dd>' in html
    assert '<dd id="threshold">0.9812 <span class="mode">fused</span></dd>' in html
    assert '<dd id="scoring">fused</dd>' in html and FUSED_VERSION in html
    assert _family_rows(html) == {"towers": ("0.8000", "fused"), "sface": ("0.2100", "fused")}

    html = client.get(f"/console/records/{seeded['fallback:towers'][0].id}").text
    assert '<dd id="score">0.9500 <span class="mode">fallback:towers</span></dd>' in html
    assert _family_rows(html) == {"towers": ("0.9500", "decided"), "sface": ("–", "no score")}

    html = client.get(f"/console/records/{seeded['sface'][0].id}").text
    assert '<dd id="score">0.5200 <span class="mode">sface</span></dd>' in html
    assert _family_rows(html) == {"sface": ("0.5200", "decided")}

    html = client.get(f"/console/records/{seeded['legacy'][0].id}").text   # read as its version's family
    assert '<dd id="score">0.9300 <span class="mode">towers</span></dd>' in html
    assert '<dd id="scoring">–</dd>' in html and 'id="family-scores"' not in html


# --- CSV --------------------------------------------------------------------------------------

def test_csv_has_the_mode_beside_the_score_and_a_column_per_family(client, engine):
    seeded = seed_modes(engine)
    evil = append_record(engine, decision="no_match", score=0.3, scoring="towers", model_version="towers:dual-v2",
                         scores={"towers": "=1+1"}, device_id="@SUM(A1)")   # a row someone wrote by hand
    r = client.get("/console/export.csv")
    assert r.status_code == 200
    header = r.text.splitlines()[0].split(",")
    assert header[:9] == ["id", "seq", "time", "decision", "score", "scoring", "threshold", "far_target",
                          "model_version"]
    assert header[9:11] == ["score_sface", "score_towers"] and header[11] == "key_id"
    rows = {row["id"]: row for row in csv.DictReader(io.StringIO(r.text))}
    fused = rows[seeded["fused"][0].id]
    assert (fused["score"], fused["scoring"], fused["score_towers"], fused["score_sface"]) == (
        "0.991", "fused", "0.96", "0.63")
    assert fused["model_version"] == FUSED_VERSION
    fb = rows[seeded["fallback:towers"][0].id]
    assert (fb["scoring"], fb["score_towers"], fb["score_sface"]) == ("fallback:towers", "0.95", "")
    legacy = rows[seeded["legacy"][0].id]
    assert (legacy["scoring"], legacy["score_towers"], legacy["score_sface"]) == ("towers", "", "")
    rejected = rows[seeded["rejected"][0].id]
    assert (rejected["score"], rejected["scoring"]) == ("", "")
    assert rows[evil.id]["score_towers"] == "'=1+1" and rows[evil.id]["device_id"] == "'@SUM(A1)"

    # filtered: only the families seen in the exported records get a column
    r = client.get("/console/export.csv", params={"scoring": "sface"})
    header = r.text.splitlines()[0].split(",")
    assert [c for c in header if c.startswith("score_")] == ["score_sface"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["id"] for row in rows} == _by(seeded, "sface") and {row["scoring"] for row in rows} == {"sface"}
    r = client.get("/console/export.csv", params={"model_version": "towers:dual-v1"})
    assert [c for c in r.text.splitlines()[0].split(",") if c.startswith("score_")] == []
    assert len(list(csv.DictReader(io.StringIO(r.text)))) == 1


# --- overview ---------------------------------------------------------------------------------

def _font():
    from PIL import ImageFont

    dejavu = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return ImageFont.truetype(str(dejavu), 11) if dejavu.exists() else ImageFont.load_default(size=11)


def _labels(svg: str) -> list[tuple[float, float, str, str]]:
    """(x, y, mode, text) of each threshold label (they start at x: no text-anchor)."""
    return [(float(x), float(y), mode, text) for x, y, mode, text in re.findall(
        r'<text x="([\d.]+)" y="([\d.]+)" fill="[^"]+" class="threshold" data-mode="([^"]+)">([^<]+)</text>', svg)]


def _assert_legible(svg: str) -> None:
    """No two threshold labels overlap and each lies inside the chart, measured with a real font
    (DejaVu Sans, wider than most sans-serif fonts a browser picks)."""
    width = float(re.search(r'<svg [^>]*width="(\d+)"', svg).group(1))
    font = _font()
    ascent = font.getmetrics()[0]
    boxes = []
    for x, y, _mode, text in _labels(svg):
        _left, top, _right, bottom = font.getbbox(text)   # from the top of the ascent
        boxes.append((x, y - ascent + top, x + font.getlength(text), y - ascent + bottom, text))
        assert x >= 0 and x + font.getlength(text) <= width, text
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, (a, b)


def test_overview_draws_a_histogram_per_mode_with_its_own_labelled_threshold(client, engine):
    seeded = seed_modes(engine)
    r = client.get("/console/overview")
    assert r.status_code == 200 and r.text.count("<svg") == 4
    svg = re.search(r'<section class="chart" id="scores">.*?(<svg.*?</svg>)', r.text, re.S).group(1)
    labels = _labels(svg)
    assert sorted((mode, text) for _x, _y, mode, text in labels) == sorted([
        ("fused", "fused 0.9812"), ("towers", "towers 0.8831"), ("towers", "towers 0.9100"),
        ("sface", "sface 0.4125"), ("fallback:towers", "fallback:towers 0.8831")])
    heads = re.findall(r'class="mode">([^<]+)</text>', svg)
    assert heads == ["towers: 4 scores (3 match, 1 no_match)", "fused: 3 scores (2 match, 1 no_match)",
                     "sface: 2 scores (1 match, 1 no_match)", "fallback:towers: 1 score (1 match, 0 no_match)"]
    # each score is a bar in its own mode's panel (bars are titled with their mode); each axis is named
    assert "sface score" in svg and "fused score (axis from 0.60)" in svg
    bars = [(m, d, float(a), float(b), int(n)) for m, d, a, b, n in
            re.findall(r"<title>(\S+) (match|no_match) ([\d.]+)-([\d.]+): (\d+)</title>", svg)]
    assert sum(n for *_, n in bars) == 10
    for mode, records in seeded.items():
        for rec in records:
            if rec.score is not None:
                shown = "towers" if mode == "legacy" else mode
                assert any(m == shown and d == rec.decision and a <= rec.score <= b for m, d, a, b, _n in bars), rec
    _assert_legible(svg)
    # the mode filter narrows the overview to one panel
    one = client.get("/console/overview", params={"scoring": "sface"}).text
    assert [t for *_, t in _labels(one)] == ["sface 0.4125"]


class _Scores:
    def __init__(self, match, no_match, thresholds):
        self.match, self.no_match, self.thresholds = match, no_match, set(thresholds)


def test_threshold_labels_never_overlap():
    """Close thresholds in one mode (re-calibrations, a second version) and one at the right edge:
    every label drawn, none over another, none outside the chart."""
    modes = {
        "towers": _Scores([0.9, 0.95], [0.5, 0.7], [0.8828, 0.8831, 0.8835, 0.89, 0.91]),
        "fallback:towers": _Scores([0.999], [], [0.9991, 0.9995]),
        "fused": _Scores([0.99], [0.2], [0.05, 0.0501, 0.9812]),
    }
    svg = str(charts.mode_histograms(modes, "t"))
    assert len(_labels(svg)) == 10
    assert {t for *_, t in _labels(svg)} >= {"towers 0.8828", "towers 0.8831", "fused 0.0500", "fused 0.9812",
                                             "fallback:towers 0.9995"}
    _assert_legible(svg)
    # the estimate the layout uses is never narrower than the real font
    font = _font()
    for *_, text in _labels(svg):
        assert charts.text_width(text) >= font.getlength(text), text


def test_overview_modes_are_grouped_by_the_mode_of_the_score(engine):
    seed_modes(engine)
    ov = stats.overview(engine, stats.AuditFilter())
    assert list(ov.modes) == ["towers", "fused", "sface", "fallback:towers"]
    assert sorted(ov.modes["towers"].match) == [0.9, 0.93, 0.93] and ov.modes["towers"].no_match == [0.71]
    assert ov.modes["towers"].thresholds == {0.8831, 0.91} and ov.modes["fused"].thresholds == {0.9812}
