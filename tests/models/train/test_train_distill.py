"""Chip-adapted id tower by frozen-teacher distillation: the chip store, the losses, the loop
(stage steps, decoupled pull, freeze, resume), the stop rule, the pack, the export and the unit
map. Real LFW images (12 training, 6 fold-8), the real dlib network, a few steps only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.train import data as D
from service.settings import get_settings

SETTINGS = get_settings()
DATA = Path(SETTINGS.data_dir)
needs_data = pytest.mark.skipif(not (DATA / "lfw" / "pairs.txt").exists(), reason="LFW not available (IDV_DATA_DIR)")
FAST = dict(epochs=1, steps_per_epoch=2, batch=4, warmup=1, eval_every=100, val_flip=False, hard_k=4, rand_k=4,
            threads=1, device="cpu", log_every=1)


def _pick(items, n_multi: int, n_single: int) -> list:
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(it.identity, []).append(it)
    multi = [v[:2] for v in by.values() if len(v) >= 2][:n_multi]
    return [x for m in multi for x in m] + [v[0] for v in by.values() if len(v) == 1][:n_single]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 training images (4 identities x 2 + 4 single), 2 chips each (rgb, ycc); 6 fold-8 images."""
    if not (DATA / "lfw" / "pairs.txt").exists():
        pytest.skip("LFW not available (IDV_DATA_DIR)")
    from models.train import distill_store as S
    lfw = D.lfw_split(DATA)
    root = tmp_path_factory.mktemp("chips")
    S.build_store("train", SETTINGS, root, items=_pick(lfw.train, 4, 4), variants=S.train_variants(2))
    S.build_store("val", SETTINGS, root, items=_pick(lfw.val, 3, 0))
    return root


def _data(root: Path, family_name: str = "dlib"):
    from models.train import distill_data as DD
    from models.train import distill_store as S
    from models.train.distill_family import get
    reserved = D.reserved_identities(DATA)
    out = []
    for split in ("train", "val"):
        st = S.load_store(root, split, reserved)
        out += DD.from_store(st, S.teacher_views(st, get(family_name), SETTINGS))
    return tuple(out)


def _cfg(**kw) -> dict:
    from models.train.distill_cli import DEFAULTS
    return {**DEFAULTS, **FAST, **kw}


def _train(root, run, until=None, resume=False, family="dlib", **kw):
    from models.train import distill
    from models.train.distill_family import get
    cfg = _cfg(**kw)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({**cfg, "data": {"store": str(root)}}))
    return distill.train(cfg, run, get(family), _data(root, family), resume=resume, until=until)


# ----------------------------------------------------------------------------- chips


@needs_data
def test_store_holds_decoded_chips_of_each_coder_and_no_reserved_identity(store):
    from PIL import Image
    import io
    from models.train import distill_store as S
    reserved = D.reserved_identities(DATA)
    tr, va = S.load_store(store, "train", reserved), S.load_store(store, "val", reserved)
    assert tr["chips"].shape == (12, 2, 126, 102, 3) and tr["chips"].dtype == np.uint8
    assert [S.codec_of(v) for v in tr["variants"]] == ["rgb", "ycc"]
    assert [S.codec_of(v) for v in va["variants"]] == ["rgb", "ycc", "webp"]      # the held-out coder: fold 8 only
    assert tr["chip_ok"].mean() > 0.9 and tr["live_ok"].all() and np.isfinite(tr["chip_lm"][tr["chip_ok"]]).all()
    assert not ({str(x) for x in tr["identity"]} | {str(x) for x in va["identity"]}) & reserved
    # training chips: 800-1,400 byte targets (+-15 %), fold-8 chips the evaluation's 1,000 bytes
    assert 680 <= tr["chip_len"][tr["chip_ok"]].min() and tr["chip_len"].max() <= 1610
    assert len({int(n) for n in tr["chip_len"].ravel()}) > 6
    # the stored pixels are the stored file, decoded
    i = int(np.flatnonzero(tr["chip_ok"][:, 1])[0])
    with Image.open(io.BytesIO(S.chip_file(tr, i, 1))) as im:
        assert im.format == "JPEG2000" and np.array_equal(np.asarray(im.convert("RGB")), tr["chips"][i, 1])
    with Image.open(io.BytesIO(S.chip_file(va, 0, 2))) as im:
        assert im.format == "WEBP"


def test_training_variants_mix_coders_and_never_use_the_held_out_one():
    from models.train import distill_store as S
    v = S.train_variants(8)
    assert len(v) == len(set(v)) == 8 and {S.codec_of(x) for x in v} == {"rgb", "ycc", "jpeg"}
    assert all(S.parse_variant(x)[2] == "800-1400" for x in v)
    with pytest.raises(ValueError):
        S.train_variants(4, codecs=("rgb", "webp"))
    drawn = [S.target_bytes(f"lfw/images/A/A_{i:04d}.jpg", 100, "800-1400") for i in range(50)]
    assert min(drawn) >= 800 and max(drawn) <= 1400 and len(set(drawn)) > 20
    assert S.target_bytes("k", 0, "1000") == 1000 and S.target_bytes("k", 3, "800-1400") == S.target_bytes("k", 3, "800-1400")


@needs_data
def test_store_refuses_a_reserved_identity_before_reading(tmp_path):
    from models.train import distill_store as S
    name = sorted(D.reserved_identities(DATA))[0]
    with pytest.raises(D.ReservedIdentityError):
        S.build_store("train", SETTINGS, tmp_path, items=[D.Item(f"lfw/images/{name}/{name}_0001.jpg", "lfw", name)])
    assert not (tmp_path / "train").exists()


# ----------------------------------------------------------------------------- losses and rules


def test_mined_negatives_skip_the_identity_and_probable_duplicates():
    from models.train.distill_loss import mine_negatives
    g = torch.Generator().manual_seed(0)
    ident = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.0]])         # student e' of one chip of identity 0
    tt = torch.tensor([[1.0, 0.6, 0.2, 0.95, 0.1, 0.1, 0.1]])         # entry 3: the teacher calls it the same face
    valid = torch.tensor([True] * 6 + [False])
    neg, ok = mine_negatives(sims, tt, ident[:1, None] == ident[None, :], valid, 0.9, 2, 50, g)
    assert neg[0, :2].tolist() == [2, 4]                              # the hardest allowed, in order
    assert set(neg[0][ok[0]].tolist()) == {2, 4, 5} and ok.all()      # never 0/1 (same), 3 (duplicate), 6 (not in run)


def test_losses_vanish_on_a_perfect_student_and_the_binary_term_sits_at_the_teacher_point():
    from models.train.distill_loss import LossConfig, losses
    bank = torch.nn.functional.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    ident, valid, own = torch.arange(40), torch.ones(40, dtype=torch.bool), torch.arange(8)
    cfg = LossConfig(relational=1.0, hard_k=5, rand_k=5)
    loss, parts = losses(bank[own].clone().requires_grad_(True), own, bank, ident, valid, 0.6, 0.9, cfg)
    assert parts["distill"] == pytest.approx(0.0, abs=1e-6) and parts["relational"] == pytest.approx(0.0, abs=1e-6)
    assert parts["own_cos"] == pytest.approx(1.0)
    # a student that maps every chip to the same point: distillation and the binary loss both grow
    bad = torch.nn.functional.normalize(torch.ones(8, 16), dim=1).requires_grad_(True)
    loss_bad, parts_bad = losses(bad, own, bank, ident, valid, 0.6, 0.9, cfg)
    assert loss_bad > loss and parts_bad["binary"] > parts["binary"]
    loss_bad.backward()
    assert bad.grad.abs().sum() > 0


def test_thresholds_are_the_bank_impostor_quantiles():
    from models.train.distill_loss import thresholds
    t = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    ops = thresholds(t, np.arange(3000), np.arange(3000), sample=3000)
    s = (t @ t.T)[np.triu_indices(3000, 1)]
    assert np.mean(s > ops["1e-03"]) == pytest.approx(1e-3, rel=0.02) and ops["1e-04"] > ops["1e-03"]


def test_stop_rule_fires_on_the_run_a_signature_only():
    from models.train.distill_loss import stop_reason

    def ev(t2, t3):
        return {"rgb": {"tar": {"1e-02": t2, "1e-03": t3}}}
    flat3 = [ev(0.60, 0.31), ev(0.64, 0.31), ev(0.67, 0.312), ev(0.70, 0.309)]
    both_rise = [ev(0.60, 0.31), ev(0.64, 0.33), ev(0.67, 0.35), ev(0.70, 0.36)]
    assert "TAR@1e-2 rose +0.1000" in stop_reason(flat3, 3)
    assert stop_reason(both_rise, 3) is None and stop_reason(flat3[:3], 3) is None and stop_reason(flat3, 0) is None


def test_pull_is_decoupled_from_adam():
    from models.train.distill import pull
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    pre = {"w": torch.tensor([0.0, 0.0])}
    opt = torch.optim.Adam([{"params": [w], "names": ["w"], "lr": 0.1}])
    w.grad = torch.tensor([1e-3, -1e3])                  # Adam's first step: -lr * sign(g), whatever |g|
    opt.step()
    after_adam = w.detach().clone()
    pull(opt, pre, lam=2.0)
    assert torch.allclose(after_adam, torch.tensor([0.9, -1.9]))
    assert torch.allclose(w.detach(), after_adam - 0.1 * 2.0 * after_adam)   # W -= lr * lam * (W - W_pre)


def test_stage_multipliers_parse_and_flatten():
    from models.train.distill_family import DEFAULT_MULT, parse_mult
    assert parse_mult("") == DEFAULT_MULT and parse_mult("level1=0.3")["level1"] == 0.3
    assert set(parse_mult(None, flat=True).values()) == {1.0}
    with pytest.raises(ValueError):
        parse_mult("level9=1")


# ----------------------------------------------------------------------------- the loop


@needs_data
def test_every_layer_trains_with_steps_that_shrink_towards_the_stem(store, tmp_path):
    from models.train.distill_family import get
    pre = get("dlib").build()
    _train(store, tmp_path / "r", epochs=1, steps_per_epoch=1, lam=0.0)
    st = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["student"]
    # one Adam step moves each weight by ~lr x its stage's multiplier x its tensor's RMS:
    # stem 0.06, level2 0.25 of fc's relative step; every weight tensor moved
    step = {n: float((st[n] - p.detach()).abs().mean() / p.detach().pow(2).mean().sqrt())
            for n, p in pre.named_parameters() if n.endswith("weight")}
    assert all(v > 0 for v in step.values())
    assert step["fc.weight"] == pytest.approx(1e-3, rel=0.25)
    assert step["stem_conv.weight"] / step["fc.weight"] == pytest.approx(0.06, rel=0.25)
    assert step["stages.level2.0.conv1.weight"] / step["fc.weight"] == pytest.approx(0.25, rel=0.25)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert {"distill", "binary", "own_cos", "neg_accepted"} <= set(log[2]) and log[0]["event"] == "start"
    assert [r["step"] for r in log if r.get("event") == "eval"] == [0, 1]
    assert {"rgb", "ycc", "webp"} == set(log[-1]["val"]) and 0 < log[-1]["val"]["rgb"]["own_cos"] < 1
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000 and (tmp_path / "r" / "best.pt").exists()


@needs_data
def test_the_loop_stops_on_the_stop_rule_and_logs_why(store, tmp_path, monkeypatch):
    from models.train import distill
    seq = iter([(0.60, 0.31), (0.63, 0.31), (0.66, 0.312), (0.70, 0.33), (0.72, 0.34)])

    def fake_validate(*_a, **_k):
        t2, t3 = next(seq)
        return {"rgb": {"tar": {"1e-02": t2, "1e-03": t3}, "far_1e-03_cos": 0.4, "own_cos": 0.6}}
    monkeypatch.setattr(distill, "validate", fake_validate)
    state = _train(store, tmp_path / "s", steps_per_epoch=4, eval_every=1, stop_m=2)
    assert state["step"] == 2 and state["stopped"]["step"] == 2 and "TAR@1e-2 rose" in state["stopped"]["reason"]
    stops = [json.loads(x) for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines() if '"stop"' in x]
    assert len(stops) == 1 and stops[0]["reason"] == state["stopped"]["reason"]
    # resuming a stopped run trains no further
    assert _train(store, tmp_path / "s", steps_per_epoch=4, eval_every=1, stop_m=2, resume=True)["step"] == 2


@needs_data
def test_early_freeze_keeps_the_early_stages(store, tmp_path):
    from models.train.distill_family import get
    pre = dict(get("dlib").build().named_parameters())
    _train(store, tmp_path / "f", epochs=1, steps_per_epoch=1, freeze_epochs=1)
    st = torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=False)["student"]
    assert torch.equal(st["stem_conv.weight"], pre["stem_conv.weight"])
    assert torch.equal(st["stages.level3.0.conv1.weight"], pre["stages.level3.0.conv1.weight"])
    assert not torch.equal(st["stages.level2.0.conv1.weight"], pre["stages.level2.0.conv1.weight"])


@needs_data
def test_an_interrupted_run_resumes_exactly(store, tmp_path):
    _train(store, tmp_path / "a", steps_per_epoch=3, relational=0.5)
    _train(store, tmp_path / "b", steps_per_epoch=3, relational=0.5, until=1)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["state"]["step"] == 1
    _train(store, tmp_path / "b", steps_per_epoch=3, relational=0.5, resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert b["state"]["step"] == 3 and all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"]
    assert '"event": "resume"' in (tmp_path / "b" / "log.jsonl").read_text()


@needs_data
def test_pack_carries_the_bank_and_chips_and_trains(store, tmp_path):
    from models.train import distill_data as DD
    from models.train import distill_store as S
    from models.train.distill_family import get
    reserved = D.reserved_identities(DATA)
    parts = []
    for split in ("train", "val"):
        st = S.load_store(store, split, reserved)
        parts.append((st, S.teacher_views(st, get("dlib"), SETTINGS)))
    info = S.write_pack(tmp_path / "p.npz", "dlib", parts[0], parts[1], n_images=6, k_chips=2)
    assert info["images"] == 6 and 1300 < info["chip_bytes_per_image"] < 3300 and info["bytes"] < 200_000
    bank, chips, vbank, vchips, meta = DD.load_pack(tmp_path / "p.npz")
    st = parts[0][0]
    assert meta["family"] == "dlib" and len(bank.ok) == 12 and len(chips.rows) == 6
    assert np.array_equal(chips.chips, st["chips"][chips.rows]) and np.array_equal(vchips.chips, parts[1][0]["chips"])
    assert np.abs(bank.views - parts[0][1]["v"]).max() < 2e-3
    from service.cli import main
    run = tmp_path / "from-pack"
    assert main(["distill", "dlib", "--from-pack", str(tmp_path / "p.npz"), "--run", str(run), "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch", "4", "--threads", "1", "--no-val-flip", "--hard-k", "4"]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == {"pack": str((tmp_path / "p.npz").resolve())}


@needs_data
@pytest.mark.parametrize("in_graph", [True, False], ids=["centring-in-graph", "centring-by-the-service"])
def test_export_serves_the_centring_on_both_towers(store, tmp_path, in_graph, baseline_folder):
    """Both export forms serve the training space: the centring in both graphs, or applied by
    the service (Tower `centre`) with the base version's own live file, byte for byte."""
    import shutil

    from models.train import distill_store as S
    from models.train.cache import decode_bytes
    from models.train.distill import embed_chips
    from models.train.distill_data import served
    from models.train.distill_export import export, load_best
    from models.train.distill_family import get
    from service.face.align import align
    from service.face.artifacts import load_towers
    run = tmp_path / "run"
    _train(store, run, utk=False)
    repo = tmp_path / "repository"
    shutil.copytree(baseline_folder, repo / "towers" / "baseline",
                    ignore=shutil.ignore_patterns("*.onnx") if in_graph else None)
    fam = get("dlib")
    man = export(run, "distill-test", fam, models_dir=repo, weights="checkpoint.pt",   # the trained weights
                 centring_in_graph=in_graph)
    assert not (repo / "towers" / "CURRENT").exists()
    towers = load_towers(repo, "towers", "distill-test", ["CPUExecutionProvider"], threads=1)   # the service's loader
    assert towers.manifest["centring"]["in_graph"] is in_graph and len(man["centring"]["mu"]) == 128
    if not in_graph:   # the live tower is the base version's own file, named in place
        base = json.loads((repo / "towers" / "baseline" / "manifest.json").read_text())
        assert man["towers"]["live"] == {"file": "backbone.onnx", "version": "baseline",
                                         "sha256": base["towers"]["live"]["sha256"]}
        assert not (repo / "towers" / "distill-test" / "backbone.onnx").exists()
    assert man["training"]["utk"] is False and not any("UTKFace" in t for t in man["data_terms"]["fine_tuned_on"])
    assert man["towers"]["id"]["sha256"] != man["towers"]["live"]["sha256"] and man["calibration"] is None
    mu = np.asarray(json.loads((run / "space.json").read_text())["mu"], np.float32)
    va = S.load_store(store, "val", D.reserved_identities(DATA))
    tpl, size = fam.template()
    # live: the served, flip-averaged embedding is the training target
    live = np.stack([align(decode_bytes((DATA / str(k)).read_bytes(), SETTINGS, "live_photo"), lm, tpl, size)
                     for k, lm in zip(va["key"], va["live_lm"])])
    want = served(S.teacher_views(va, fam, SETTINGS)["v"], mu)
    got = towers.live.embed(live)
    assert np.min(np.sum(got * want, 1)) > 0.9999
    # id: the served chip embedding is the student's e', flip-averaged
    from models.train.distill_data import from_store
    _, vchips = from_store(va, S.teacher_views(va, fam, SETTINGS))
    net, _, _ = load_best(run, fam, "checkpoint.pt")
    want = embed_chips(net, vchips, np.arange(3), 0, torch.from_numpy(mu).view(1, -1), tpl, size, "cpu", True)
    got = towers.id.embed(vchips.crops(np.arange(3), [0] * 3, tpl, size))
    assert np.min(np.sum(got * want, 1)) > 0.9999


@needs_data
def test_heads_train_and_the_probe_writes_the_unit_map_schema(store, tmp_path):
    from models.train.distill_export import probe
    from models.train.distill_family import REPOSITORY, get
    run = tmp_path / "heads"
    _train(store, run, heads=True)
    log = (run / "log.jsonl").read_text()
    assert '"sparsity"' in log and '"h_yaw"' in log and '"h_blur"' in log
    data = _data(store)
    umap = probe(run, get("dlib"), data[2], data[3])
    shipped = json.loads((REPOSITORY / "towers" / "dual-v2" / "unit_map.json").read_text())
    assert set(umap) == set(shipped) and set(umap["scoring"]) >= {"use_mask", "mask", "trials"}
    assert all(0 < len(u) <= 16 for u in umap["ties"].values()) and (run / "unit_map.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- families


@needs_data
def test_a_family_plugs_in_through_the_interface(store, tmp_path, monkeypatch):
    """Any network with the tower contract trains once registered: here a small convnet with
    the generic depth stage map (what SFace gets until its stages are named)."""
    from torch import nn

    from models.train.distill_family import FAMILIES, Family, depth_stages

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 8, 7, 4), nn.Conv2d(8, 16, 3, 2)
            self.fc = nn.Linear(16, 128)

        def forward(self, x):
            x = torch.relu(self.a(x.permute(0, 3, 1, 2) / 128.0 - 1.0))
            return self.fc(torch.relu(self.b(x)).mean(dim=(2, 3)))

    monkeypatch.setitem(FAMILIES, "small", Family("small", lambda: Small().eval(), ("towers", "baseline"), depth_stages))
    stages = depth_stages(Small())
    assert stages["a.weight"] == "stem" and stages["fc.bias"] == "fc"
    state = _train(store, tmp_path / "small", family="small")
    assert state["step"] == 2 and set(state["evals"][-1]) == {"rgb", "ycc", "webp"}


def test_sface_family_is_the_served_sface_behind_the_tower_contract():
    """The sface family builds sface:2 in torch: 0..255 NHWC in, the served embedding out (as
    onnxruntime computes it), every parameter in a named stage of the step schedule."""
    import torch

    from models.train.distill_family import DEFAULT_MULT, get
    from service.face.artifacts import load_towers
    fam = get("sface")
    assert fam.template()[1] == 112 and fam.dim() == 128
    net = fam.build()
    stages = fam.stages(net)
    assert set(stages) == {n for n, _ in net.named_parameters()} and set(stages.values()) <= set(DEFAULT_MULT)
    assert stages["net.body.head.fc.weight"] == "fc" and stages["net.body.stem.conv_1.conv.weight"] == "stem"
    x = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    from models.train.distill_family import REPOSITORY
    served = load_towers(REPOSITORY, *fam.base, ["CPUExecutionProvider"], 1).live._run(x)
    np.testing.assert_allclose(got, served, atol=1e-4 * np.abs(served).max())


def test_idverify_offers_one_distill_command_per_family():
    from service.cli import build_parser
    p = build_parser()
    args = p.parse_args(["distill", "sface", "--no-utk", "--relational", "0.5"])
    assert args.family == "sface" and args.utk is False and args.relational == 0.5
    with pytest.raises(SystemExit):
        p.parse_args(["distill", "facenet"])
