"""How the console shows values: scores and thresholds to 4 decimals, latencies to 0.1 ms,
yes/no for quality flags, the error-code filter as a list of the known codes, and a chain page
that reloads itself (a meta refresh, no script)."""
from __future__ import annotations

import re

import pytest

from console_support import append_record, seed, sign_in
from service import errors
from service.console import routes, stats


@pytest.fixture
def client(make_client, role_keys):
    c = make_client()
    sign_in(c, role_keys["operator"])
    return c


def test_list_rounds_scores_and_latencies(client, engine):
    append_record(engine, decision="match", score=0.987654321, latency_ms=71.26)
    r = client.get("/console")
    assert ">0.9877<" in r.text and "0.987654" not in r.text
    assert ">71.3 ms<" in r.text


def test_detail_rounds_and_says_yes_or_no(client, engine):
    rec = append_record(engine, score=0.123456789, threshold=0.9412345, latency_ms=180.54,
                        id_quality={"sharpness": 81.2, "blurry": False, "small_face": True})
    r = client.get(f"/console/records/{rec.id}")
    assert '<dd id="score">0.1235 <span class="mode">towers</span></dd>' in r.text and "0.123456" not in r.text
    assert '<dd id="threshold">0.9412 <span class="mode">towers</span></dd>' in r.text
    assert "180.5 ms" in r.text
    side = re.search(r'id="side-id">(.*?)</section>', r.text, re.S).group(1)
    cells = dict(re.findall(r"<tr><td>(\w+)</td><td class=\"[^\"]*\">([^<]*)</td></tr>", side))
    assert cells["blurry"] == "no" and cells["small_face"] == "yes" and cells["sharpness"] == "81.2"
    assert ">False<" not in r.text and ">True<" not in r.text


def test_error_code_filter_lists_the_known_codes(client, engine):
    seed(engine)
    r = client.get("/console")
    select = re.search(r'<select name="error_code" id="f-error-code">(.*?)</select>', r.text, re.S).group(1)
    options = re.findall(r'<option value="([^"]*)"', select)
    assert options[0] == "" and options[1:] == sorted(options[1:])
    for code in (errors.NO_FACE, errors.IMAGE_UNDECODABLE, errors.FACE_TOO_SMALL, errors.UNAUTHORIZED,
                 errors.FORBIDDEN, errors.RATE_LIMITED, errors.INTERNAL_ERROR, errors.NOT_READY):
        assert code in options
    assert set(options[1:]) == set(stats.ERROR_CODES)
    # the chosen one stays selected, and filters
    r = client.get("/console", params={"error_code": "no_face"})
    assert '<option value="no_face" selected>' in r.text
    assert "<strong>3</strong> records" in r.text
    # a code the list does not know (an older release's) is kept as a choice, not dropped
    r = client.get("/console", params={"error_code": "legacy_code"})
    assert '<option value="legacy_code" selected>' in r.text


def test_chain_page_refreshes_itself(client, engine):
    seed(engine)
    r = client.get("/console/chain")
    assert f'<meta http-equiv="refresh" content="{routes.CHAIN_REFRESH_SECONDS}">' in r.text
    assert "<script" not in r.text
    assert 'http-equiv="refresh"' not in client.get("/console/overview").text
