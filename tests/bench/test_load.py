"""bench/load.py end to end, briefly: it starts `idverify serve` on loopback against a fresh
SQLite database, posts real pairs from 1 and 2 clients for a second each, and reports pairs/s,
percentiles, CPU per pair and the server's peak RSS; the server is gone afterwards."""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from service.settings import ROOT, Settings

LFW = Settings().data_dir / "lfw" / "images"


def _load_module():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not LFW.is_dir(), reason=f"LFW not mounted at {LFW}")
def test_load_bench_runs_bounded_on_loopback(capsys):
    load = _load_module()
    assert load.main(["--concurrency", "1,2", "--seconds", "1", "--warmup", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| (\d+) \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    for _clients, pairs_s, p50, p99, n, errors in rows:
        assert float(pairs_s) > 0 and 0 < float(p50) <= float(p99) and int(n) > 0 and errors == "0"
    assert re.search(r"peak RSS per server process \(VmHWM; master first, then workers\): \d+ MB", out)
    assert "database sqlite" in out and "Command: `" in out
