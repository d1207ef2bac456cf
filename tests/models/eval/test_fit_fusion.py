"""models.build.fit_fusion: refuses the evaluation folds; fits, with adaptive s-norm, on a
handful of fold-8 pairs and cohort images into a repository copy, which the loader serves; and
`idverify eval` scores a fused pipeline exactly as the service does, with and without s-norm."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.face.artifacts import ArtifactError, sha256_file
from service.face.fusion import load_fusion
from service.face.loader import load_models, load_pipeline
from service.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[3] / "models" / "repository"
SMALL = ["--towers", "dual-v2-int8", "--sface", "2", "--folds", "8", "--limit", "8", "--snorm", "5",
         "--version", "t", "--no-measure"]


@pytest.mark.parametrize("folds", ["9", "8,10", "1-10"])
def test_fit_refuses_folds_9_and_10(folds, capsys):
    from models.build import fit_fusion

    with pytest.raises(SystemExit):
        fit_fusion.main(["--towers", "dual-v2", "--folds", folds])
    assert "reserved" in capsys.readouterr().err


@pytest.fixture(scope="module")
def snorm_repo(tmp_path_factory, lfw) -> Path:
    """A repository copy holding fusion `t`: the served members, s-norm with K=5, fit on 8 fold-8
    pairs and 8 cohort images."""
    from models.build import fit_fusion

    tmp = tmp_path_factory.mktemp("fit")
    repo = tmp / "repository"
    for name in ("mtcnn", "yunet", "sface/2", "towers/dual-v2-int8"):
        shutil.copytree(REPO / name, repo / name)
    before = {p.name: sha256_file(p) for p in (repo / "sface" / "2").iterdir()}
    mp = pytest.MonkeyPatch()
    mp.setenv("IDV_MODELS_DIR", str(repo))
    mp.setenv("IDV_ONNX_THREADS", "1")
    get_settings.cache_clear()
    try:
        assert fit_fusion.main(SMALL + ["--reports", str(tmp / "reports")]) == 0
        with pytest.raises(SystemExit):   # a version is written once
            fit_fusion.main(SMALL + ["--reports", str(tmp / "reports")])
    finally:
        mp.undo()
        get_settings.cache_clear()
    assert {p.name: sha256_file(p) for p in (repo / "sface" / "2").iterdir()} == before   # members untouched
    return repo


def test_small_fit_writes_a_fusion_the_loader_accepts(snorm_repo):
    fusion = load_fusion(snorm_repo, "t")
    m = fusion.manifest
    assert m["fit"]["folds"] == [8] and set(m["members"]) == {"towers", "sface"}
    assert m["calibration_sha256"] == sha256_file(fusion.folder / "calibration.json") and fusion.calibration
    assert m["snorm"]["k"] == 5 and m["snorm"]["sha256"] == sha256_file(fusion.folder / "cohort.npz")
    assert m["fit"]["snorm_chosen"] == "5" and set(m["fit"]["snorm_candidates"]) == {"5"}
    assert fusion.snorm is not None and all(len(c) == 8 for c in fusion.snorm.cohorts.values())
    models = load_models(Settings(models_dir=snorm_repo, tower_version="dual-v2-int8", scoring="fused",
                                  fusion_version="t", far_target=0.2))
    assert models.pipeline.fusion.version == "fusion:t"


def test_snorm_normalises_each_family_by_both_photos_cohort_statistics(snorm_repo):
    """s' = ((s - mu_a)/sd_a + (s - mu_b)/sd_b)/2 over each side's K best cohort scores: checked
    against a direct computation; a photo that resembles many cohort faces (a higher mu) lowers
    its pair's normalised score; a fusion with s-norm refuses scores without statistics."""
    fusion = load_fusion(snorm_repo, "t")
    sn = fusion.snorm
    rng = np.random.default_rng(0)
    for f, cohort in sn.cohorts.items():
        assert cohort.dtype == np.float32 and np.allclose(np.linalg.norm(cohort, axis=1), 1, atol=1e-2)
        e = rng.normal(size=(2, cohort.shape[1]))
        mu, sd = sn.stats(f, e)
        direct = (1 + (e / np.linalg.norm(e, axis=1, keepdims=True)) @ cohort.T) / 2
        top = np.sort(direct, axis=1)[:, -sn.k:]
        np.testing.assert_allclose(mu, top.mean(1), atol=1e-6)
        np.testing.assert_allclose(sd, top.std(1), atol=1e-6)
        assert sn.apply(0.8, (mu[0], sd[0]), (mu[1], sd[1])) > sn.apply(0.8, (mu[0] + 0.05, sd[0]), (mu[1], sd[1]))
    with pytest.raises(ValueError, match="s-normalises"):
        fusion.score({f: 0.8 for f in fusion.families})


def test_the_cohort_is_checked_by_its_sha256(snorm_repo, tmp_path):
    repo = tmp_path / "repository"
    shutil.copytree(snorm_repo, repo)
    settings = Settings(models_dir=repo, tower_version="dual-v2-int8", scoring="fused", fusion_version="t")
    load_pipeline(settings)
    cohort = repo / "fusion" / "t" / "cohort.npz"
    np.savez(cohort, **{f: np.zeros((3, 128), np.float16) for f in ("towers", "sface")})
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_pipeline(settings)
    manifest = json.loads((repo / "fusion" / "t" / "manifest.json").read_text())
    assert manifest["snorm"]["file"] == "cohort.npz"


@pytest.mark.parametrize("fusion", ["served", "snorm"])
def test_eval_scores_a_fused_pipeline_as_the_service_does(lfw, snorm_repo, fusion):
    """The score `idverify eval` gives a pairs.txt line is the score /verify's decision gives
    the same two photos (the one fused-score function, fed the same s-norm statistics)."""
    from models.eval.embedder import Embedder
    from models.eval.pairs import image_relpath, read_pairs, select_pairs
    from models.eval.protocols import evaluate, served_scores

    settings = Settings(scoring="fused") if fusion == "served" else Settings(
        models_dir=snorm_repo, tower_version="dual-v2-int8", scoring="fused", fusion_version="t", far_target=0.2)
    models = load_models(settings)
    p = models.pipeline
    assert (p.fusion.snorm is not None) == (fusion == "snorm")
    emb = Embedder(p, lfw.parent, progress=False)
    keep: dict = {}
    report = evaluate("lfw", [1], p, lfw.parent, limit=4, embedder=emb, scores_out=keep, progress=False)
    assert report["scoring"]["served"] == "fused" and set(report["families"]) == {"towers", "sface"}
    evaluated = served_scores(p, keep["per_family"], keep["grid"], keep["pairs"], keep["labels"])["pairs"]
    for i, pair in enumerate(select_pairs(read_pairs(lfw / "pairs.txt"), [1], 4)):
        sides = [p.analyse((lfw / "images" / image_relpath(x)).read_bytes(), "live_photo", {})
                 for x in (pair.a, pair.b)]
        assert evaluated[i] == pytest.approx(models.decide(*sides).score, abs=1e-5)
