"""Reserved identities (LFW folds 9-10) never reach training, validation or calibration."""
from pathlib import Path

import pytest

from models.eval.pairs import fold_identities, lfw_key, read_pairs
from models.train import data as D
from service.settings import get_settings

DATA = Path(get_settings().data_dir)
needs_data = pytest.mark.skipif(not (DATA / "lfw" / "pairs.txt").exists(), reason="LFW not available")


@needs_data
def test_reserved_set_is_folds_9_10():
    lines = (DATA / "lfw" / "pairs.txt").read_text().splitlines()
    names = set()
    for ln in lines[4801:6001]:            # pairs.txt lines 4802-6001 (1-based)
        parts = ln.split()
        names.add(parts[0])
        if len(parts) == 4:
            names.add(parts[2])
    reserved = D.reserved_identities(DATA)
    assert reserved == names
    assert len(reserved) == 890


@needs_data
def test_training_splits_exclude_reserved():
    from models.train.recipe import split_items
    reserved = D.reserved_identities(DATA)
    split = D.lfw_split(DATA)
    train_names = {it.identity for it in split.train}
    val_names = {it.identity for it in split.val}
    assert not (train_names & reserved) and not (val_names & reserved)
    assert not (train_names & val_names)
    assert len(split.train) + len(split.val) == 13233 - 2671  # README: 2,671 reserved images
    for name in ("lfw_train", "lfw_val", "utk_train", "utk_adapt", "utk_test"):
        items = split_items(DATA, name)
        assert items
        D.assert_no_reserved(items, reserved)
        assert all(not it.key.startswith("holdout") for it in items)


@needs_data
def test_assert_no_reserved_raises():
    reserved = D.reserved_identities(DATA)
    name = sorted(reserved)[0]
    with pytest.raises(D.ReservedIdentityError):
        D.assert_no_reserved([lfw_key((name, 1))], reserved)
    with pytest.raises(D.ReservedIdentityError):
        D.assert_no_reserved(["holdout/frmdb/mugshots/001/Img_11.jpg"], reserved)


@needs_data
def test_cached_training_rows_exclude_reserved(tmp_path):
    """A tiny activation cache built here (six training images of folds 1-8 identities): its
    rows hold no reserved identity, a reserved key is refused on load, the eval split is
    evaluation only."""
    pytest.importorskip("torch")
    import numpy as np

    from models.train.cache import CacheConfig, build_split, load_split, split_path
    reserved = D.reserved_identities(DATA)
    items = D.lfw_split(DATA).train[:6]
    cfg = CacheConfig(data_dir=DATA, root=tmp_path, threads=1)
    build_split("lfw_train", items, cfg, reserved=reserved, with_occ=False)
    d = load_split(tmp_path, "lfw_train", reserved=reserved)
    assert list(d["key"]) == [it.key for it in items] and d["live_feat"].shape[0] == 6
    assert d["live_ok"].all()
    names = {str(k).split("/")[2] for k in d["key"]}
    assert names and not names & reserved
    # a row of a reserved identity in a training split is refused when it is loaded
    with np.load(split_path(tmp_path, "lfw_train")) as z:
        arrays = {k: z[k] for k in z.files}
    name = sorted(reserved)[0]
    arrays["key"] = np.array([f"lfw/images/{name}/{name}_0001.jpg"] + list(arrays["key"][1:]))
    np.savez(split_path(tmp_path, "lfw_val"), **arrays)
    with pytest.raises(D.ReservedIdentityError):
        load_split(tmp_path, "lfw_val", reserved=reserved)
    with pytest.raises(PermissionError):
        load_split(tmp_path, "eval")


def test_utk_labels_and_split_are_deterministic():
    assert D.parse_utk_name("26_1_2_20170116174525125.jpg.chip.jpg") == {"age": 26, "gender": 1, "race": 2}
    assert D.parse_utk_name("26_1_7_20170116174525125.jpg.chip.jpg") is None
    assert D.parse_utk_name("readme.txt") is None
    assert D._bucket("x") == D._bucket("x") and D._bucket("x") != D._bucket("y")
    assert D.age_group(5) == 0 and D.age_group(25) == 2 and D.age_group(99) == 6


def test_parse_pairs(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("2\t1\nA\t1\t2\nA\t1\tB\t1\nC\t1\t3\nD\t2\tE\t1\n")
    pairs = read_pairs(p)   # the one pairs.txt reader, shared with evaluation
    assert [q.fold for q in pairs] == [1, 1, 2, 2]
    assert fold_identities(pairs, [2]) == {"C", "D", "E"}
