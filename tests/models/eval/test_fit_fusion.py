"""models.build.fit_fusion: refuses the evaluation folds, fits on a handful of fold-8 pairs
into a repository copy; and `idverify eval` scores a fused pipeline exactly as the service does."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.face.artifacts import sha256_file
from service.face.fusion import load_fusion
from service.face.loader import load_models
from service.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[3] / "models" / "repository"


@pytest.mark.parametrize("folds", ["9", "8,10", "1-10"])
def test_fit_refuses_folds_9_and_10(folds, capsys):
    from models.build import fit_fusion

    with pytest.raises(SystemExit):
        fit_fusion.main(["--towers", "dual-v2", "--folds", folds])
    assert "reserved" in capsys.readouterr().err


def test_small_fit_writes_a_fusion_the_loader_accepts(tmp_path, monkeypatch, lfw):
    """A fit with s-norm on a handful of fold-8 pairs and cohort images: the fusion folder holds
    the cohort with its hash, the members' artifacts are untouched, the loader serves it, and
    the fit refuses to rewrite an existing version."""
    from models.build import fit_fusion

    repo = tmp_path / "repository"
    for name in ("mtcnn", "yunet", "sface/2", "towers/dual-v2-int8"):
        shutil.copytree(REPO / name, repo / name)
    before = {p.name: sha256_file(p) for p in (repo / "sface" / "2").iterdir()}
    monkeypatch.setenv("IDV_MODELS_DIR", str(repo))
    monkeypatch.setenv("IDV_ONNX_THREADS", "1")
    get_settings.cache_clear()
    args = ["--towers", "dual-v2-int8", "--sface", "2", "--folds", "8", "--limit", "8", "--snorm", "5",
            "--version", "t", "--no-measure", "--reports", str(tmp_path / "reports")]
    try:
        assert fit_fusion.main(args) == 0
        with pytest.raises(SystemExit):
            fit_fusion.main(args)
    finally:
        get_settings.cache_clear()
    fusion = load_fusion(repo, "t")
    m = fusion.manifest
    assert m["fit"]["folds"] == [8] and set(m["members"]) == {"towers", "sface"}
    assert m["calibration_sha256"] == sha256_file(fusion.folder / "calibration.json") and fusion.calibration
    assert m["snorm"]["k"] == 5 and m["snorm"]["sha256"] == sha256_file(fusion.folder / "cohort.npz")
    assert fusion.snorm is not None and all(len(c) == 8 for c in fusion.snorm.cohorts.values())
    assert {p.name: sha256_file(p) for p in (repo / "sface" / "2").iterdir()} == before
    models = load_models(Settings(models_dir=repo, tower_version="dual-v2-int8", scoring="fused", fusion_version="t",
                                  far_target=0.2))
    assert models.pipeline.fusion.version == "fusion:t"


def test_eval_scores_a_fused_pipeline_as_the_service_does(lfw):
    from models.eval.embedder import Embedder
    from models.eval.protocols import evaluate

    models = load_models(Settings(scoring="fused"))
    p = models.pipeline
    emb = Embedder(p, lfw.parent, progress=False)
    keep: dict = {}
    report = evaluate("lfw", [1], p, lfw.parent, limit=4, embedder=emb, scores_out=keep, progress=False)
    assert report["scoring"]["served"] == "fused" and set(report["families"]) == {"towers", "sface"}
    from models.eval.pairs import image_relpath, read_pairs, select_pairs
    from models.eval.protocols import served_scores

    pairs = select_pairs(read_pairs(lfw / "pairs.txt"), [1], 4)
    assert p.fusion.snorm is not None   # the served fusion s-normalises: eval must feed it the same statistics
    evaluated = served_scores(p, keep["per_family"], keep["grid"], keep["pairs"], keep["labels"])["pairs"]
    for i, pair in enumerate(pairs):
        sides = [p.analyse((lfw / "images" / image_relpath(x)).read_bytes(), "live_photo", {})
                 for x in (pair.a, pair.b)]
        assert evaluated[i] == pytest.approx(models.decide(*sides).score, abs=1e-5)
