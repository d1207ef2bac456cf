"""Evaluation: metric functions on synthetic scores with known answers, pairs.txt parsing, and a
small real run through the pipeline (skipped with the reason when data or models are absent)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.eval import cli as eval_cli
from models.eval import docs, embedder, metrics, protocols
from models.eval import pairs as lfw_pairs

# --------------------------------------------------------------------------- metrics


def test_best_threshold_separable():
    scores = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 1, 1, 1]
    thr, acc = metrics.best_threshold(scores, labels)
    assert acc == 1.0
    assert 0.3 < thr < 0.7


def test_best_threshold_known_error_and_inf():
    # one mismatched pair scores above every matched one; FTA (-inf) matched pair is a miss
    scores = [0.1, 0.2, 0.95, 0.6, 0.7, -math.inf]
    labels = [0, 0, 0, 1, 1, 1]
    thr, acc = metrics.best_threshold(scores, labels)
    assert acc == pytest.approx(4 / 6)
    assert 0.2 < thr <= 0.6
    assert metrics.accuracy_at(scores, labels, thr) == pytest.approx(4 / 6)


def test_kfold_accuracy_known_answer():
    # 10 folds, 10 pairs each: genuine score 0.8, impostor 0.2, except fold 3 whose genuine
    # pairs all score 0.4 (below the threshold the other folds agree on, 0.5) -> fold 3 gets 50 %.
    scores, labels, folds = [], [], []
    for f in range(1, 11):
        for k in range(10):
            same = k < 5
            s = (0.4 if f == 3 else 0.8) if same else 0.2
            scores.append(s)
            labels.append(same)
            folds.append(f)
    r = metrics.kfold_accuracy(scores, labels, folds)
    per = {p["fold"]: p for p in r["per_fold"]}
    assert per[3]["accuracy"] == pytest.approx(0.5)
    assert all(per[f]["accuracy"] == 1.0 for f in per if f != 3)
    assert r["mean"] == pytest.approx(0.95)
    assert r["std"] == pytest.approx(np.std([1] * 9 + [0.5], ddof=1))
    assert r["standard_error"] == pytest.approx(r["std"] / math.sqrt(10))
    assert per[3]["threshold_from_folds"] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert r["threshold_selection"] == "other selected folds"
    # fold 3 is tested at the others' threshold (0.5, midway 0.2..0.8), not at its own
    assert per[3]["threshold"] == pytest.approx(0.5)
    # the other folds train with fold 3 in, which pulls their threshold below 0.4
    assert 0.2 < per[1]["threshold"] <= 0.4


def test_kfold_two_folds_cross_and_single_fold_self():
    scores = [0.9, 0.8, 0.1, 0.2, 0.6, 0.7, 0.65, 0.3]
    labels = [1, 1, 0, 0, 1, 1, 0, 0]
    folds = [9, 9, 9, 9, 10, 10, 10, 10]
    r = metrics.kfold_accuracy(scores, labels, folds, [9, 10])
    per = {p["fold"]: p for p in r["per_fold"]}
    assert per[9]["threshold_from_folds"] == [10] and per[10]["threshold_from_folds"] == [9]
    # fold 10 separates at (0.65, 0.7] -> fold 9 perfect; fold 9's threshold is in (0.2, 0.8]
    assert per[9]["accuracy"] == 1.0
    r1 = metrics.kfold_accuracy(scores[:4], labels[:4], folds[:4], [9])
    assert r1["threshold_selection"] == "self" and r1["note"]
    assert r1["mean"] == 1.0


def test_tar_at_far_known_answer():
    imp = np.arange(1000) / 1000.0          # 0.000 .. 0.999
    gen = [0.5, 0.9895, 0.995, 0.9991, -math.inf]
    rows = {r["far_target"]: r for r in metrics.tar_at_far(gen, imp, (1e-2, 1e-3, 1e-4))}
    r = rows[1e-2]                           # 10 false accepts allowed: 0.990 .. 0.999
    assert r["false_accepts"] == 10 and r["far"] == pytest.approx(0.01)
    assert 0.989 < r["threshold"] <= 0.990
    assert r["tar"] == pytest.approx(3 / 5)  # 0.9895, 0.995, 0.9991
    assert r["resolvable"] and r["n_impostors"] == 1000 and r["n_genuine"] == 5
    r = rows[1e-3]                           # 1 allowed: only 0.999
    assert r["false_accepts"] == 1 and 0.998 < r["threshold"] <= 0.999
    assert r["tar"] == pytest.approx(1 / 5)
    r = rows[1e-4]                           # 0.1 allowed -> 0: reject all, not resolvable
    assert not r["resolvable"] and r["false_accepts"] == 0 and r["note"]
    assert r["threshold"] > 0.999 and r["tar"] == pytest.approx(1 / 5)


def test_tar_at_far_ties_are_conservative():
    imp = np.array([0.5] * 10 + [0.1] * 90)
    r = metrics.tar_at_far([0.5, 0.6], imp, (0.05,))[0]
    # 5 allowed, but the 10 tied at 0.5 cannot be split: all rejected
    assert r["false_accepts"] == 0 and r["threshold"] > 0.5 and r["tar"] == 0.5


def test_fta_never_accepted():
    imp = np.array([-np.inf] * 50 + [0.3] * 50)
    rows = metrics.tar_at_far([-math.inf, 0.9], imp, (1.0, 0.6))
    for r in rows:
        assert r["false_accepts"] == 50   # the -inf half is never accepted, even at FAR 1
        assert r["tar"] == 0.5


def test_calibration_table_format_and_monotone():
    rng = np.random.default_rng(0)
    imp = rng.normal(0.5, 0.05, 200_000)
    table = metrics.calibration_table(imp)
    fars = [r["far_target"] for r in table]
    assert max(fars) == pytest.approx(0.1) and min(fars) == pytest.approx(1e-5)
    scores = [r["score"] for r in table]
    assert scores == sorted(scores)
    assert [r["far"] for r in table] == sorted((r["far"] for r in table), reverse=True)
    for r in table:
        assert r["far"] <= r["far_target"] + 1e-12
        assert set(r) >= {"score", "far"}
        assert (imp >= r["score"]).mean() == pytest.approx(r["far"])
    # unresolvable targets are left out
    small = metrics.calibration_table(rng.normal(size=5000))
    assert min(r["far_target"] for r in small) == pytest.approx(2e-4)
    # the decision module can read it
    from service.face.decide import Threshold
    t = Threshold.from_calibration(table, score=None, far_target=1e-3)
    assert t.far <= 1e-3
    assert t.score == pytest.approx(next(r["score"] for r in table if r["far_target"] == 1e-3))


def test_roc_points_monotone():
    rng = np.random.default_rng(1)
    gen, imp = rng.normal(0.8, 0.05, 500), rng.normal(0.5, 0.05, 20000)
    roc = metrics.roc_points(gen, imp)
    assert roc["far"][0] <= 1 / 20000 + 1e-12 and roc["far"][-1] == 1.0
    assert all(np.diff(roc["tar"]) >= 0)


def test_plots_mark_the_served_threshold():
    from models.eval import plots

    genuine = np.linspace(0.80, 0.99, 50)
    imp = metrics.ScoreSet(np.linspace(0.30, 0.90, 2000))
    curve = metrics.roc_points(genuine, imp)
    curve["served"] = point = protocols.operating_point(genuine, imp, 0.88)
    assert point["far"] == imp.accepted(0.88) / 2000 and point["tar"] == pytest.approx(np.mean(genuine >= 0.88))
    served = {"score": 0.88, "far_calibrated": 1e-3, "setting": "IDV_FAR_TARGET=0.001"}
    label = "served threshold 0.8800 (IDV_FAR_TARGET=0.001)"
    from scipy.stats import norm

    for make, where in ((plots.roc_figure, (point["far"], point["tar"])),
                        (plots.det_figure, (norm.ppf(point["far"]), norm.ppf(1 - point["tar"])))):
        ax = make({"genuine (50)": curve}, "test", served).axes[0]
        (mark,) = [line for line in ax.get_lines() if line.get_label() == label]
        assert label in [t.get_text() for t in ax.get_legend().get_texts()]
        assert tuple(np.ravel(mark.get_data())) == pytest.approx(where)
        unmarked = make({"genuine (50)": curve}, "test", None).axes[0]
        assert not [t for t in unmarked.get_legend().get_texts() if "served" in t.get_text()]


def test_cross_scores_masks():
    e = np.eye(4, dtype=np.float32)
    e[1] = e[0]                                   # images 0 and 1: same person, same face
    ok = np.array([True, True, True, False])     # image 3 failed to acquire
    ident, files = [0, 0, 1, 2], [0, 1, 2, 3]
    imp, gen = metrics.cross_scores(e, ok, ident, files, e, ok, ident, files, symmetric=True)
    assert sorted(gen.tolist()) == [1.0]          # (0,1)
    assert imp.size == 5                          # (0,2) (0,3) (1,2) (1,3) (2,3)
    assert np.isneginf(imp).sum() == 3
    imp, gen = metrics.cross_scores(e, ok, ident, files, e, ok, ident, files, symmetric=False)
    assert gen.size == 2 and imp.size == 10       # same file excluded from genuine


# --------------------------------------------------------------------------- pairs


def _pairs_file(tmp_path: Path) -> Path:
    lines = ["2\t2", "A\t1\t2", "B\t1\t3", "A\t1\tC\t1", "B\t2\tD\t1",
             "E\t1\t2", "F\t2\t3", "E\t1\tG\t4", "H\t1\tF\t2"]
    p = tmp_path / "pairs.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_and_select_pairs(tmp_path):
    pairs = lfw_pairs.read_pairs(_pairs_file(tmp_path))
    assert len(pairs) == 8
    assert pairs[0] == lfw_pairs.Pair(1, ("A", 1), ("A", 2), True)
    assert pairs[7] == lfw_pairs.Pair(2, ("H", 1), ("F", 2), False)
    assert lfw_pairs.image_relpath(("Abel_Pacheco", 4)) == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    sel = lfw_pairs.select_pairs(pairs, [2], limit=2)
    assert [p.same for p in sel] == [True, False] and all(p.fold == 2 for p in sel)
    assert lfw_pairs.parse_folds("1-10") == list(range(1, 11))
    assert lfw_pairs.parse_folds("9,10") == [9, 10]
    assert lfw_pairs.parse_folds("1,3-4") == [1, 3, 4]
    with pytest.raises(ValueError):
        lfw_pairs.parse_folds("0-3")


def test_cli_registers_eval():
    from service.cli import build_parser
    args = build_parser().parse_args(["eval", "--protocol", "lfw-ivs", "--folds", "9,10", "--no-extended", "--limit", "4"])
    assert args.protocol == "lfw-ivs" and args.folds == "9,10" and args.extended_impostors is False
    assert args.limit == 4 and args.func is eval_cli.run_cli


# --------------------------------------------------------------------------- real run


def _data_dir() -> Path:
    from service.settings import get_settings
    return Path(get_settings().data_dir)


@pytest.fixture(scope="module")
def pipeline(models):
    """The served pipeline (the models ship in the repository); LFW is needed for these tests."""
    if not (_data_dir() / "lfw" / "pairs.txt").exists():
        pytest.skip(f"LFW not found under {_data_dir()} (set IDV_DATA_DIR)")
    return models.pipeline


def test_embedder_matches_pipeline_analyse(pipeline):
    """The batched path used by eval gives the same embeddings as Pipeline.analyse."""
    data_dir = _data_dir()
    rels = ["Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg"]
    emb = embedder.Embedder(pipeline, data_dir, seed=0, batch_size=8, progress=False)
    emb.run([(r, "live") for r in rels] + [(rels[0], "id")])
    for r in rels:
        side = pipeline.analyse((data_dir / "lfw" / "images" / r).read_bytes(), "live_photo", {})
        np.testing.assert_allclose(emb.emb[(r, "live")], side.embedding, rtol=1e-4, atol=1e-4)
    chip = emb.chip_for(rels[0])
    side = pipeline.analyse(chip, "id_photo", {})
    np.testing.assert_allclose(emb.emb[(rels[0], "id")], side.embedding, rtol=1e-4, atol=1e-4)
    # the vectorised score is the pipeline's score
    a = pipeline.analyse((data_dir / "lfw" / "images" / rels[1]).read_bytes(), "live_photo", {})
    s = pipeline.compare(side, a)
    from service.face.score import similarity_matrix
    assert float(similarity_matrix(side.embedding[None], a.embedding[None])[0, 0]) == pytest.approx(s, abs=1e-6)


@pytest.mark.parametrize("protocol", ["lfw", "lfw-ivs"])
def test_small_real_run_writes_report(pipeline, models, tmp_path, protocol):
    out = tmp_path / protocol
    report = protocols.evaluate(protocol, [1], pipeline, _data_dir(), limit=6, out=out, progress=False)
    # the threshold the service serves, and where it falls on this run's scores
    served = report["served_threshold"]
    assert served["score"] == models.threshold.score and served["setting"] == "IDV_FAR_TARGET=0.001"
    assert 0 <= served["far"] <= 1 and 0 <= served["tar"] <= 1
    files = {p.name for p in out.iterdir()}
    assert {"report.json", "roc.png", "det.png", "pair_scores.csv"} <= files
    for png in ("roc.png", "det.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["protocol"] == protocol and data["folds"] == [1]
    assert data["counts"]["pairs"] == 6 and data["counts"]["matched"] == 3
    assert data["model_version"] == pipeline.model_version
    assert len(data["manifest_sha256"]) == 64
    assert data["accuracy"]["threshold_selection"] == "self"
    assert {r["far_target"] for r in data["tar_at_far"]} == {1e-2, 1e-3, 1e-4}
    assert data["counts"]["impostor"] > data["counts"]["mismatched"]  # extended set
    assert "commit" in data["git"] and data["timestamp"]
    # on easy, clean pairs the towers should get most of them right
    assert report["accuracy"]["mean"] >= 0.5
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother text\n")
    docs.write_docs_section(report, out, doc=doc)
    docs.write_docs_section(report, out, doc=doc)           # replaces its own section, once
    text = doc.read_text()
    assert text.count(f"idverify eval {protocol} folds 1:start") == 1 and "other text" in text
    assert "| 0.001 |" in text
    if protocol == "lfw-ivs":
        assert data["sides"] == {"first_column": "id", "second_column": "live"}
        assert 850 <= data["chipsim"]["bytes"]["mean"] <= 1150
        assert "id" in data["fta"]
