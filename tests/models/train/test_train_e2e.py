"""End-to-end dual towers on aligned crops: the crop store, every layer training, the coupling,
resuming from a checkpoint, the probe. Real LFW/UTKFace images, a handful only (CI budget)."""
from pathlib import Path

import numpy as np
import pytest

from models.eval.pairs import lfw_key
from models.train import data as D
from service.settings import get_settings

SETTINGS = get_settings()
DATA = Path(SETTINGS.data_dir)
needs_data = pytest.mark.skipif(not (DATA / "lfw" / "pairs.txt").exists(), reason="LFW not available")


@pytest.fixture(scope="module")
def tiny_crops(tmp_path_factory):
    """A crop store of 8 fold 1-8 images, used as train, val and utk_test."""
    from models.train import crops as C
    root = tmp_path_factory.mktemp("crops")
    out = C.build("tiny", SETTINGS, root)
    for split in ("train", "val", "utk_test"):
        (root / split).symlink_to(out, target_is_directory=True)
    return root


@needs_data
def test_crop_store_holds_aligned_uint8_crops_and_no_reserved_identity(tiny_crops):
    from models.train import crops as C
    reserved = D.reserved_identities(DATA)
    d = C.load(tiny_crops, "train", reserved)
    n, k = d["chip_ok"].shape
    assert d["live"].shape == (n, 150, 150, 3) and d["live"].dtype == np.uint8
    assert d["chips"].shape == (n, k, 150, 150, 3) and k >= 2
    assert {str(v).split(":")[1] for v in d["variants"]} == {"rgb", "ycc"}  # both chip encodings
    assert d["live_ok"].all() and d["chip_ok"].mean() > 0.8
    # a chip is not its live crop: the simulator degraded it
    i = int(np.flatnonzero(d["chip_ok"][:, 0])[0])
    assert np.abs(d["chips"][i, 0].astype(int) - d["live"][i].astype(int)).mean() > 5
    assert not ({str(x) for x in d["identity"]} & reserved)


@needs_data
def test_split_items_refuse_reserved_identities():
    from models.train import crops as C
    reserved = D.reserved_identities(DATA)
    for split in ("train", "val", "utk_test"):
        items = C.split_items(DATA, split)
        assert items and not ({it.identity for it in items} & reserved)
    with pytest.raises(D.ReservedIdentityError):
        D.assert_no_reserved([lfw_key((sorted(reserved)[0], 1))], reserved)


@needs_data
def test_every_layer_trains_coupled_and_resumes(tiny_crops, tmp_path):
    import torch
    from models.train import e2e
    run = tmp_path / "run"
    args = ["--run", str(run), "--crops", str(tiny_crops), "--epochs", "1", "--steps-per-epoch", "2",
            "--batch", "6", "--threads", "1", "--lam", "1"]
    assert e2e.main(args) == 0
    pre = e2e.pretrained()
    state = torch.load(run / "best.pt", weights_only=False)["model"]
    # the stem of the id tower moved: no layer is frozen
    assert not torch.equal(state["id.stem_conv.weight"], pre.stem_conv.weight)
    assert not torch.equal(state["live.stem_conv.weight"], pre.stem_conv.weight)
    assert not torch.equal(state["id.stem_conv.weight"], state["live.stem_conv.weight"])
    log = (run / "log.json").read_text()
    assert '"coupling"' in log and (run / "curves.png").exists()
    # resume: a second call with more epochs continues from the checkpoint (epoch 2 only)
    args[args.index("--epochs") + 1] = "2"
    assert e2e.main(args) == 0
    import json
    hist = json.loads((run / "log.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]


@needs_data
def test_frozen_early_ablation_keeps_the_stem(tiny_crops, tmp_path):
    import torch
    from models.train import e2e
    run = tmp_path / "frozen"
    assert e2e.main(["--run", str(run), "--crops", str(tiny_crops), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch", "6", "--threads", "1", "--freeze-upto", "level3", "--heads", "false"]) == 0
    pre = e2e.pretrained()
    state = torch.load(run / "best.pt", weights_only=False)["model"]
    assert torch.equal(state["id.stem_conv.weight"], pre.stem_conv.weight)
    assert not torch.equal(state["id.fc.weight"], pre.fc.weight)


@needs_data
def test_probe_writes_a_unit_map(tiny_crops, tmp_path):
    from models.train import e2e, e2e_export
    run = tmp_path / "probe"
    assert e2e.main(["--run", str(run), "--crops", str(tiny_crops), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch", "6", "--threads", "1"]) == 0
    assert e2e_export.main(["--run", str(run), "--crops", str(tiny_crops), "--probe-only"]) == 0
    import json
    m = json.loads((run / "unit_map.json").read_text())
    assert set(m["ties"]) >= {"domain", "blur", "gender", "age"}
    assert all(0 < len(u) <= 16 for u in m["ties"].values())
    assert (run / "unit_map.png").stat().st_size > 1000


@needs_data
def test_export_writes_towers_with_the_contract_and_a_manifest(tiny_crops, tmp_path):
    import json

    import onnxruntime as ort

    from models.build.export_towers import sha256_file
    from models.train import e2e, e2e_export
    run = tmp_path / "exp"
    assert e2e.main(["--run", str(run), "--crops", str(tiny_crops), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch", "6", "--threads", "1", "--utk", "false"]) == 0
    assert e2e_export.main(["--run", str(run), "--crops", str(tiny_crops), "--probe-only"]) == 0
    model, cfg, state = e2e_export.load_e2e(run)
    out = tmp_path / "repo" / "v-test"
    man = e2e_export.export(model, cfg, state, run, out, "v-test")
    assert json.loads((out / "manifest.json").read_text()) == man
    assert man["towers"]["id"]["sha256"] == sha256_file(out / "id.onnx") != man["towers"]["live"]["sha256"]
    assert man["training"]["utk"] is False and "UTKFace" not in man["training"]["data_terms"]
    assert man["test_time"]["flip_average"] is True and man["calibration"] is None
    sess = ort.InferenceSession(str(out / "id.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 150, 150, 3), np.float32)
    (emb,) = sess.run(["embedding"], {"image": x})
    assert emb.shape == (2, 128)
