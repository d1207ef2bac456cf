"""Verification metrics on cached activations, with the metric code of `models.eval`.

The eval split of the cache holds, for every distinct image of LFW folds 9-10, the live-side
activation (file bytes -> decode -> detect -> align) and the id-side activation of its simulated
chip (chipsim seed 0, fixed LFW eye positions: `idverify eval --protocol lfw-ivs` defaults). The
protocols below then mirror `models.eval.protocols.evaluate` exactly (pairs.txt genuine pairs,
extended cross-identity impostors, FTA = -inf, 10-fold-style accuracy with the threshold from the
other fold), but run only the trained layers, so an ablation row costs seconds. The shipped model
is additionally measured end to end with `idverify eval` (ONNX, full pipeline).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from models.eval.metrics import TAR_FARS, ScoreSet, cross_scores, far_key, kfold_accuracy, tar_at_far
from models.eval.pairs import lfw_key, read_pairs, select_pairs
from models.train import data as D
from service.face.score import normalize as _norm, score_from_cosine


def verification(emb_id: np.ndarray, ok_id: np.ndarray, emb_live: np.ndarray, ok_live: np.ndarray,
                 keys: list[str], data_dir: Path, folds=D.EVAL_FOLDS) -> dict:
    """emb_id: id-tower embeddings of the chips of `keys`; emb_live: live-tower embeddings of the
    live images of `keys` (rows aligned with keys). Returns lfw-ivs TAR@FAR + accuracy and the
    plain lfw (live/live) accuracy on the same folds."""
    index = {k: i for i, k in enumerate(keys)}
    pairs = select_pairs(read_pairs(Path(data_dir) / "lfw" / "pairs.txt"), list(folds))
    ei, el = _norm(emb_id.astype(np.float32)), _norm(emb_live.astype(np.float32))

    def score(ea, oka, ia, eb, okb, ib):
        if not (oka[ia] and okb[ib]):
            return -math.inf
        return float(score_from_cosine(ea[ia] @ eb[ib]))

    labels = np.array([p.same for p in pairs])
    pf = np.array([p.fold for p in pairs])
    ia = [index[lfw_key(p.a)] for p in pairs]
    ib = [index[lfw_key(p.b)] for p in pairs]
    s_ivs = np.array([score(ei, ok_id, a, el, ok_live, b) for a, b in zip(ia, ib)])
    s_lfw = np.array([score(el, ok_live, a, el, ok_live, b) for a, b in zip(ia, ib)])

    rel_a = sorted({lfw_key(p.a) for p in pairs})
    rel_b = sorted({lfw_key(p.b) for p in pairs})
    ident: dict[str, int] = {}
    files: dict[str, int] = {}

    def ids(rels):
        return ([ident.setdefault(r.split("/")[2], len(ident)) for r in rels],
                [files.setdefault(r, len(files)) for r in rels])
    ida, fa = ids(rel_a)
    idb, fb = ids(rel_b)
    A = np.array([index[r] for r in rel_a])
    B = np.array([index[r] for r in rel_b])
    imp, gen_x = cross_scores(ei[A], ok_id[A], ida, fa, el[B], ok_live[B], idb, fb, symmetric=False)
    imp_set = ScoreSet(imp.astype(np.float32))
    tar = tar_at_far(s_ivs[labels], imp_set, TAR_FARS)
    return {
        "tar_at_far": {far_key(r["far_target"]): r["tar"] for r in tar},
        "thresholds": {far_key(r["far_target"]): r["threshold"] for r in tar},
        "n_impostors": imp_set.n,
        "n_genuine": int(labels.sum()),
        "ivs_accuracy": kfold_accuracy(s_ivs, labels, pf, list(folds))["mean"],
        "lfw_accuracy": kfold_accuracy(s_lfw, labels, pf, list(folds))["mean"],
        "fta": {"id": int((~ok_id[A]).sum()), "live": int((~ok_live[B]).sum())},
    }


def identity_verification(emb_id, ok_id, emb_live, ok_live, identities, fars=TAR_FARS) -> dict:
    """All chip x live pairs of different images among a set of identities (validation):
    genuine = same identity, impostors = different identity. Also live x live."""
    ident = np.asarray(identities)
    ei, el = _norm(emb_id), _norm(emb_live)
    okc, okl = np.asarray(ok_id), np.asarray(ok_live)
    s = score_from_cosine(ei @ el.T)
    s[~(okc[:, None] & okl[None, :])] = -np.inf
    same = ident[:, None] == ident[None, :]
    diff_file = ~np.eye(len(ident), dtype=bool)
    gen, imp = s[same & diff_file], s[~same]
    rows = tar_at_far(gen, ScoreSet(imp.astype(np.float32)), fars)
    sl = score_from_cosine(el @ el.T)
    sl[~(okl[:, None] & okl[None, :])] = -np.inf
    upper = np.triu(np.ones_like(same), 1)
    rows_l = tar_at_far(sl[same & upper], ScoreSet(sl[~same & upper].astype(np.float32)), fars)
    return {"ivs": {far_key(r["far_target"]): r["tar"] for r in rows},
            "live": {far_key(r["far_target"]): r["tar"] for r in rows_l},
            "n_genuine": int(gen.size), "n_impostors": int(imp.size)}


def impostor_scores(emb_id, ok_id, emb_live, ok_live, identities) -> np.ndarray:
    """Cross-identity chip x live scores (calibration)."""
    ident = np.asarray(identities)
    ei, el = _norm(emb_id), _norm(emb_live)
    s = score_from_cosine(ei @ el.T)
    s[~(np.asarray(ok_id)[:, None] & np.asarray(ok_live)[None, :])] = -np.inf
    return s[ident[:, None] != ident[None, :]].astype(np.float32)
