"""Export and unit map of a distillation run.

export: a new version folder of the family's model (models/repository/<towers|sface>/<VERSION>):
        id.onnx   = the run's best id tower + the fixed centring (normalize(e) - mu),
        live.onnx = the pretrained network + the same centring,
        both with the tower contract of the family's served version (checked against torch),
        and a manifest: the base version's schema, the centring (mu, the space, the teacher's
        operating points), the training command and settings, the data terms of every image set
        the id tower saw (UTKFace: non-commercial research only). No calibration (run
        `python -m models.build.calibrate --version VERSION --folds 8`, with IDV_TOWERS=sface for
        that family); CURRENT is not touched (release gating is separate).
probe : unit_map.json + unit_map.png in the run (`probe.write_unit_map`): fold-8 chips of every
        coder through the id tower, live images through the teacher, in the served space; the
        same schema `idverify adapt` and the export read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.train.distill_family import REPOSITORY, Centred, Family

LFW_TERMS = "LFW (identities of View-2 folds 1-7; research use, see the LFW page)"
UTK_TERMS = "UTKFace train split (non-commercial research only)"


def _float16_check(path: Path, size: int) -> float:
    """Store `path`'s weights as float16 and return the least cosine between the two graphs'
    embeddings of random crops (refuses below 0.9999)."""
    from service.runtime import make_session

    x = np.random.default_rng(0).integers(0, 256, (16, size, size, 3)).astype(np.float32)
    before = make_session(path.read_bytes(), threads=1).run(None, {"image": x})[0]
    float16_weights(path)
    after = make_session(path, threads=1).run(None, {"image": x})[0]
    cos = np.sum(before * after, 1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1))
    if cos.min() < 0.9999:
        raise SystemExit(f"float16 weights moved the embeddings: least cosine {cos.min():.6f}")
    return float(cos.min())


def load_best(run: Path, family: Family, which: str = "best.pt"):
    """(student with the run's best weights, heads state or None, checkpoint dict)."""
    c = torch.load(Path(run) / which, map_location="cpu", weights_only=False)
    net = family.build().eval()
    net.load_state_dict(c["student"])
    for p in net.parameters():
        p.requires_grad_(False)
    return net, c.get("heads"), c


def data_terms(cfg: dict) -> list[str]:
    return [LFW_TERMS] + ([UTK_TERMS] if cfg.get("utk", True) else [])


def float16_weights(path: Path, min_size: int = 1024) -> None:
    """Store the graph's large float32 initializers as float16, each behind a Cast to float32:
    half the file; ONNX Runtime folds the casts when it opens the session (constant folding), so
    it runs as the float32 graph does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    casts, halves = [], []
    for init in list(g.initializer):
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size >= min_size:
            halves.append(numpy_helper.from_array(a.astype(np.float16), init.name + "_f16"))
            casts.append(helper.make_node("Cast", [init.name + "_f16"], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "_to_f32"))
            g.initializer.remove(init)
    g.initializer.extend(halves)
    for c in reversed(casts):
        g.node.insert(0, c)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export(run: Path, version: str, family: Family, models_dir: Path = REPOSITORY, weights: str = "best.pt",
           centring_in_graph: bool = True, float16: bool = False) -> dict:
    """`weights`: best.pt (the best fold-8 evaluation, the default) or checkpoint.pt (the last step).
    `centring_in_graph` False: `id.onnx` is the raw student, the live tower is the base version's
    own file (the pretrained network, byte for byte: no second copy in the repository), and the
    service applies the centring to both (the manifest's `centring.in_graph` false,
    service.face.embed.Tower `centre`); the scores are the same. The live tower then names the
    base version's file in place (`version` in its manifest entry): no second copy on disk.
    `float16`: the id tower's weights stored as float16 (`float16_weights`), checked against the
    float32 graph on the same inputs."""
    from models.build.export_towers import OPSET, sha256_file
    from models.train.export import Masked, write_onnx
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    space = json.loads((run / "space.json").read_text())
    mu = np.asarray(space["mu"], np.float32)
    base = family.manifest(models_dir)
    name = family.base[0]
    out = Path(models_dir) / name / version
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists: pick a new version")
    out.mkdir(parents=True)
    student, _, best = load_best(run, family, weights)
    teacher = family.build().eval()
    umap = json.loads((run / "unit_map.json").read_text()) if (run / "unit_map.json").exists() else None
    mask = np.asarray(umap["scoring"]["mask"], np.float32) if umap and umap["scoring"]["use_mask"] else None
    size, dim = int(base["template"]["size"]), int(base["output"]["dim"])
    towers, diffs = {}, {}
    for side, net in (("id", student), ("live", teacher)):
        if not centring_in_graph and side == "live" and mask is None:
            base_file = Path(models_dir) / name / family.base[1] / base["towers"]["live"]["file"]
            towers[side] = {"file": base_file.name, "version": family.base[1], "sha256": sha256_file(base_file)}
            continue
        m = Centred(net, mu).eval() if centring_in_graph else net.eval()
        diffs[side] = write_onnx(Masked(m, mask).eval() if mask is not None else m, out / f"{side}.onnx", size=size, dim=dim)
        if float16 and side == "id":
            diffs["id_float16_vs_float32_min_cos"] = _float16_check(out / "id.onnx", size)
        towers[side] = {"file": f"{side}.onnx", "sha256": sha256_file(out / f"{side}.onnx")}
    man = {k: v for k, v in base.items() if k not in ("export_check", "calibration_sha256", "metrics", "training")}
    man.update(version=version, towers=towers, metrics={}, calibration=None, test_time={"flip_average": True})
    man["description"] = (f"chip-adapted id tower distilled from the pretrained {family.name} network (frozen teacher = "
                          f"the live tower, pretrained {name}:{family.base[1]} + a fixed centring); see docs/training.md")
    man["output"] = {**base["output"], "normalised": False,
                     "note": ("normalize(raw embedding) - mu (the centring, in the graph of both towers); compare by cosine"
                              if centring_in_graph else "raw embeddings; the service makes them normalize(e) - mu "
                              "(`centring`) on both sides; compare by cosine")}
    if not centring_in_graph and mask is not None:
        raise SystemExit("a scoring mask needs the centring in the graph (centring_in_graph=True)")
    man["centring"] = {"in_graph": centring_in_graph, "mu": np.round(mu.astype(np.float64), 8).tolist(),
                       "space": "cos' = cos(normalize(normalize(e) - mu), ...); mu = mean teacher unit embedding of the bank",
                       "teacher_cos_thresholds": space["thresholds"]}
    man["source"] = {**base.get("source", {}), "converter": "models/train/distill.py + models/build/export_towers.export_onnx",
                     "exported_with": {"torch": torch.__version__, "opset": OPSET}, "onnx_vs_torch_max_abs": diffs,
                     "base_version": f"{name}:{family.base[1]}"}
    man["training"] = {"family": family.name, **{k: cfg.get(k) for k in sorted(cfg) if k not in ("command", "data")},
                       "data": cfg.get("data"), "weights": weights,
                       "step": best.get("step", best.get("state", {}).get("step")), "command": cfg.get("command"),
                       "reproduce": f"{cfg.get('command')} --export {version}"}
    man["data_terms"] = {"weights": base.get("licence"), "fine_tuned_on": data_terms(cfg),
                         "note": "the id tower carries the terms of every set above; the live tower is the "
                                 "pretrained network (its own terms only)"}
    if umap:
        for f in ("unit_map.json", "unit_map.png"):
            if (run / f).exists():
                (out / f).write_bytes((run / f).read_bytes())
        man["unit_map"] = {"file": "unit_map.json", "sha256": sha256_file(out / "unit_map.json"),
                           "scoring_mask": mask is not None}
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


def probe(run: Path, family: Family, vbank, vchips) -> dict:
    """The unit map of the run's best id tower on fold 8 (never trained on)."""
    from models.train.distill import embed_chips
    from models.train.distill_data import served
    from models.train.heads import ATTRIBUTES, build_heads
    from models.train.probe import mask_trials, write_unit_map
    net, heads_state, _ = load_best(run, family)
    mu = np.asarray(json.loads((Path(run) / "space.json").read_text())["mu"], np.float32)
    mu_t = torch.from_numpy(mu).view(1, -1)
    template, size = family.template()
    live = served(vbank.views, mu)[vchips.rows]
    live_ok, ident = vbank.ok[vchips.rows], vbank.ident[vchips.rows]
    Z, A = [], {a: [] for a in ATTRIBUTES}
    first = None
    for j, spec in enumerate(vchips.variants):
        idx = np.flatnonzero(vchips.ok[:, j])
        e = embed_chips(net, vchips, idx, j, mu_t, template, size, "cpu", True)
        if first is None:
            first = (e, idx)
        Z.append(e)
        A["domain"].append(np.ones(len(idx)))
        A["gender"].append(np.asarray(vchips.labels.get("gender", np.full(len(vchips.rows), np.nan)))[idx])
    Z.append(live[live_ok])
    A["domain"].append(np.zeros(int(live_ok.sum())))
    A["gender"].append(np.asarray(vchips.labels.get("gender", np.full(len(vchips.rows), np.nan)))[live_ok])
    n = sum(len(z) for z in Z)
    A = {a: (np.concatenate(v) if v else np.full(n, np.nan)).astype(np.float64) for a, v in A.items()}

    class Model:  # what write_unit_map reads: the heads (group norms), if the run trained them
        heads = None

    if heads_state is not None:
        from models.train.distill import HEAD_ATTRIBUTES
        Model.heads = build_heads(live.shape[1], HEAD_ATTRIBUTES)
        Model.heads.load_state_dict(heads_state)
    e0, idx0 = first
    emb = np.zeros_like(live)
    emb[idx0] = e0
    ok0 = np.zeros(len(live), bool)
    ok0[idx0] = True
    return write_unit_map(Model, np.concatenate(Z), A, Path(run),
                          lambda ties: mask_trials(emb, ok0, live, live_ok, ident, ties),
                          f"unit selectivity - {Path(run).name} (fold 8, served space)")
