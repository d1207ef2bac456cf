"""Score fusion in the service: the fused score, the setting that picks a family or the fusion,
the fallback rule, and the member check (real models, real LFW images)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.errors import ApiError
from service.face.artifacts import ArtifactError, flip_average
from service.face.fusion import load_fusion
from service.face.loader import load_models, load_pipeline
from service.settings import Settings

REPO = Path(__file__).resolve().parents[3] / "models" / "repository"


@pytest.fixture(scope="module")
def fused():
    return load_models(Settings(scoring="fused"))


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    dst = tmp_path / "repository"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns("facenet*", "baseline"))
    return dst


def _pair(lfw_pairs, which="same"):
    return [p.read_bytes() for p in lfw_pairs[which]]


def _edit(path: Path, fn) -> None:
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_fused_score_is_in_0_1_monotone_and_rejects_missing():
    fusion = load_fusion(REPO, "current")
    grid = np.linspace(0.0, 1.0, 21)
    s = fusion.score({f: grid for f in fusion.families})
    assert np.all((s >= 0) & (s <= 1)) and np.all(np.diff(s) >= 0)
    assert all(w > 0 for w in fusion.manifest["weights"].values())
    one = fusion.score({fusion.families[0]: np.array([0.9, -np.inf]), fusion.families[1]: np.array([0.9, 0.9])})
    assert np.isfinite(one[0]) and one[1] == -np.inf   # evaluation: a family without a score = reject


def test_fused_pair_decides_on_the_fused_score(fused, lfw_pairs):
    p = fused.pipeline
    for which in ("same", "different"):
        a, b = _pair(lfw_pairs, which)
        sa, sb = p.analyse(a, "id_photo", {}), p.analyse(b, "live_photo", {})
        scores = p.scores(sa, sb)
        assert set(scores) == {"towers", "sface"} and all(0 <= v <= 1 for v in scores.values())
        d = fused.decide(sa, sb)
        assert d.scoring == "fused" and 0 <= d.score <= 1 and d.threshold == fused.threshold
        assert d.scores == scores
        assert d.score == pytest.approx(p.fusion.score_pair(scores, sa.embeddings, sb.embeddings))
        assert d.decision == ("match" if which == "same" else "no_match")


@pytest.mark.parametrize("rejecting", ["sface", "towers"])
def test_a_family_rejecting_the_face_falls_back_to_the_other(fused, lfw_pairs, monkeypatch, rejecting):
    p = fused.pipeline
    other = ({"towers", "sface"} - {rejecting}).pop()
    tpl = dict(p.families[rejecting].manifest["template"], min_face_px=10_000)
    monkeypatch.setitem(p.families[rejecting].manifest, "template", tpl)
    a, b = _pair(lfw_pairs)
    timings: dict = {}
    sa, sb = p.analyse(a, "id_photo", timings), p.analyse(b, "live_photo", {})
    assert sa.embeddings[rejecting] is None and sa.family_rejects == {rejecting: "face_too_small"}
    assert f"align:{rejecting}" not in timings and f"embed:{other}" in timings
    scores = p.scores(sa, sb)
    assert scores[rejecting] is None and 0 <= scores[other] <= 1
    d = fused.decide(sa, sb)
    assert d.scoring == f"fallback:{other}" and d.score == scores[other]
    assert d.threshold == fused.scoring.fallback[other] and d.threshold.far <= fused.threshold.far
    assert d.decision == ("match" if d.score >= fused.scoring.fallback[other].score else "no_match")


def test_a_face_no_family_takes_is_face_too_small(fused, lfw_pairs, monkeypatch):
    p = fused.pipeline
    for f in p.families:
        monkeypatch.setitem(p.families[f].manifest, "template", dict(p.families[f].manifest["template"],
                                                                     min_face_px=10_000))
    with pytest.raises(ApiError) as e:
        p.analyse(_pair(lfw_pairs)[0], "id_photo", {})
    assert e.value.code == "face_too_small"


def test_the_setting_picks_a_family_or_the_fusion(fused, lfw_pairs):
    a, b = _pair(lfw_pairs)
    assert fused.model_version.startswith("fusion:") and "towers:" in fused.model_version
    for scoring, version in (("towers", "towers:"), ("sface", f"sface:{Settings().sface_version}")):
        models = load_models(Settings(scoring=scoring))
        p = models.pipeline
        assert models.model_version.startswith(version) and p.fusion is None and list(p.families) == [scoring]
        scores = p.scores(p.analyse(a, "id_photo", {}), p.analyse(b, "live_photo", {}))
        assert list(scores) == [scoring]
        d = models.scoring.decide(scores)
        assert d.scoring == scoring and d.score == scores[scoring] and d.threshold == models.threshold
    with pytest.raises(ValueError, match="scoring"):   # refused by the settings, before any model loads
        load_pipeline(Settings(scoring="both"))


def test_refuses_a_fusion_whose_members_are_not_the_loaded_ones(repo_copy):
    folder = load_fusion(repo_copy, "current").folder
    # another towers version served than the one the fusion was fit on
    (repo_copy / "towers" / "dual-v9").mkdir()
    shutil.copytree(repo_copy / "towers" / "dual-v2", repo_copy / "towers" / "dual-v9", dirs_exist_ok=True)
    _edit(repo_copy / "towers" / "dual-v9" / "manifest.json", lambda m: m.update(version="dual-v9"))
    with pytest.raises(ArtifactError, match="was fit on towers:"):
        load_pipeline(Settings(models_dir=repo_copy, scoring="fused", tower_version="dual-v9"))
    # a member's flip-averaging changed after the fit (one side)
    sface = fusion_member_version(folder, "sface")
    _edit(repo_copy / "sface" / sface / "manifest.json",
          lambda m: m["test_time"].update(flip_average={"id": flip_average(m, "id"), "live": not flip_average(m, "live")}))
    with pytest.raises(ArtifactError, match=f"was fit on sface:{sface}"):
        load_pipeline(Settings(models_dir=repo_copy, scoring="fused"))
    shutil.copy(REPO / "sface" / sface / "manifest.json", repo_copy / "sface" / sface / "manifest.json")
    # and a calibration that does not match its hash
    (folder / "calibration.json").write_text("{}")
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_pipeline(Settings(models_dir=repo_copy, scoring="fused"))


def fusion_member_version(folder: Path, family: str) -> str:
    return json.loads((folder / "manifest.json").read_text())["members"][family]["version"]


def test_current_towers_under_fusion_are_the_fusions_own(repo_copy):
    """IDV_TOWER_VERSION=current with IDV_SCORING=fused loads the towers the fusion was fit on,
    whatever towers/CURRENT names; naming another version explicitly is refused."""
    fusion = load_fusion(repo_copy, "current")
    fit_on = fusion.manifest["members"]["towers"]["version"]
    (repo_copy / "towers" / "CURRENT").write_text("dual-v2\n")
    assert fit_on != "dual-v2"
    p = load_pipeline(Settings(models_dir=repo_copy, scoring="fused"))
    assert p.towers.version == f"towers:{fit_on}"
    assert load_pipeline(Settings(models_dir=repo_copy, scoring="towers")).towers.version == "towers:dual-v2"
    with pytest.raises(ArtifactError, match="was fit on towers:"):
        load_pipeline(Settings(models_dir=repo_copy, scoring="fused", tower_version="dual-v2"))
