"""bench/load.py end to end, briefly: it starts `idverify serve` on loopback against a fresh
SQLite database, posts real pairs from 1 and 2 clients for a second each, and reports pairs/s,
percentiles, CPU per pair and the server's peak RSS; the server is gone afterwards. The
face_recognition reference (bench/reference.py) times that library on the same pair bytes."""
from __future__ import annotations

import importlib.util
import math
import re
import sys

import pytest

from service.settings import ROOT, Settings

LFW = Settings().data_dir / "lfw" / "images"


def _load_module(name: str = "load"):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW not mounted at {LFW}")
def test_load_bench_runs_bounded_on_loopback(capsys):
    load = _load_module()
    ref = load.reference.available()
    assert load.main(["--concurrency", "1,2", "--seconds", "1", "--warmup", "0.5",
                      "--reference-runs", "1", "--reference-warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| (\d+) \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    for _clients, pairs_s, p50, p99, n, errors in rows:
        assert float(pairs_s) > 0 and 0 < float(p50) <= float(p99) and int(n) > 0 and errors == "0"
    assert re.search(r"peak RSS per server process \(VmHWM; master first, then workers\): \d+ MB", out)
    assert "database sqlite" in out and "Command: `" in out
    assert re.search(r"served model \S+:\S+", out), out
    # the reference row, with a ratio against the 1-client p50, when the library is installed
    assert bool(re.search(r"^\| face_recognition defaults \(HOG, upsample 1\) \|.*\| [\d.]+x \| [\d.]+x \|$",
                          out, re.M)) == ref, out


@pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW not mounted at {LFW}")
@pytest.mark.skipif(importlib.util.find_spec("face_recognition") is None,
                    reason="face_recognition not importable (installed --no-deps by the Makefile's test setup)")
def test_reference_times_face_recognition_on_the_posted_pair():
    load, reference = _load_module(), _load_module("reference")
    _body, _ctype, _desc, chip, live = load.make_pair("lfw")
    r = reference.time_pairs(chip, live, runs=2, warmup=1)
    assert r["n"] == 2 and r["upsample"] == 1
    for key in ("p50", "p99", "pairs_s", "cpu_ms", "distance"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["p50"] <= r["p99"]
    # the chip and the LFW photo show the same person: the library's own threshold is 0.6
    assert r["no_face_id"] == 0 and r["no_face_live"] == 0 and r["distance"] < 0.6, r
    assert "upsample 1" in reference.table([r], {"p50": 10.0, "cpu_ms": 10.0}) and "dlib" in reference.describe(2, 1)
