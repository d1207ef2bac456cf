"""service/face/decide.py: the threshold from a target FAR or a fixed score, and the decision."""
from __future__ import annotations

import pytest

from service.face.decide import Threshold
from service.settings import Settings

TABLE = [  # as calibration.json holds it: score ascending, FAR descending
    {"score": 0.80, "far": 0.1}, {"score": 0.86, "far": 0.01}, {"score": 0.88, "far": 0.00098},
    {"score": 0.89, "far": 0.0001},
]


def test_target_far_takes_the_lowest_score_that_meets_it():
    t = Threshold.from_calibration(TABLE, score=None, far_target=1e-3)
    assert t == Threshold(score=0.88, far=0.00098)
    assert Threshold.from_calibration(list(reversed(TABLE)), score=None, far_target=1e-2).score == 0.86


def test_fixed_score_reports_the_far_at_or_below_it():
    assert Threshold.from_calibration(TABLE, score=0.87, far_target=1e-3) == Threshold(0.87, 0.01)
    assert Threshold.from_calibration(TABLE, score=0.5, far_target=1e-3).far is None   # below the table
    assert Threshold.from_calibration([], score=0.7, far_target=1e-3) == Threshold(0.7, None)


def test_refuses_what_the_table_cannot_place():
    with pytest.raises(ValueError, match="IDV_THRESHOLD"):
        Threshold.from_calibration([], score=None, far_target=1e-3)
    with pytest.raises(ValueError, match="cannot resolve"):
        Threshold.from_calibration(TABLE, score=None, far_target=1e-6)


def test_decide_accepts_at_and_above_the_threshold():
    t = Threshold(score=0.9, far=1e-3)
    assert t.decide(0.9) == "match" and t.decide(0.95) == "match"
    assert t.decide(0.8999) == "no_match"


def test_from_settings():
    assert Threshold.from_settings(Settings(far_target=1e-2), TABLE).score == 0.86
    assert Threshold.from_settings(Settings(threshold=0.95), TABLE) == Threshold(0.95, 0.0001)
