"""An int8 copy of a towers version: ONNX Runtime static quantization (QDQ), then its own calibration.

    .venv/bin/python -m models.build.quantize_towers --source dual-v2 --version dual-v2-int8 [--current]

Each tower (id, live) is quantized with per-channel int8 weights and uint8 activations whose
ranges are calibrated (entropy method) on aligned chips of LFW people *outside* View-2 folds 8-10:
the id tower on simulated chips, the live tower on the LFW photos, each with its mirror image
(the towers are run flip-averaged). Weights use `reduce_range` (7 bits): on x86 CPUs without
AVX-512 VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits, which saturate
with full-range weights; measured on 400 held-out people, full-range weights kept only a mean
cosine of 0.988 to the fp32 embeddings (the first convolution sees raw pixel ranges), 7-bit
weights 0.9987 (docs/benchmarks.md, "int8 towers").

The new version folder gets the manifest of the source with its own version, file hashes and a
`quantization` record; then `models.build.calibrate` places its calibration table on fold 8
(with the default detector) and, with --measure, records LFW and LFW-IvS metrics. Folds 9-10
are never used for a choice here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from models.build import calibrate
from models.eval.embedder import FIELD, Embedder
from models.eval.pairs import fold_identities, read_pairs
from service.errors import ApiError
from service.face.artifacts import sha256_file
from service.face.loader import load_pipeline
from service.settings import get_settings

EXCLUDED_FOLDS = (8, 9, 10)   # validation and evaluation identities never calibrate the quantizer


def calibration_people(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    """`n` LFW people outside folds 8-10, shuffled with `seed`; each gives its first image."""
    reserved = fold_identities(read_pairs(data_dir / "lfw" / "pairs.txt"), EXCLUDED_FOLDS)
    people = sorted(p for p in os.listdir(data_dir / "lfw" / "images") if p not in reserved)
    random.Random(seed).shuffle(people)
    return people[:n]


def calibration_chips(pipeline, data_dir: Path, people: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Aligned tower inputs (N, 150, 150, 3) per side, through the service's own pipeline."""
    embedder = Embedder(pipeline, data_dir, seed=seed, progress=False)
    chips: dict[str, list[np.ndarray]] = {"id": [], "live": []}
    for person in people:
        rel = f"{person}/{sorted(os.listdir(data_dir / 'lfw' / 'images' / person))[0]}"
        for side in ("id", "live"):
            data = embedder.chip_for(rel) if side == "id" else (data_dir / "lfw" / "images" / rel).read_bytes()
            try:
                chip = embedder.prepare(data, FIELD[side])[pipeline.primary]
            except ApiError:
                continue   # no face: not a calibration sample
            if chip is not None:
                chips[side].append(chip.astype(np.float32))
    return {side: np.stack(v) for side, v in chips.items()}


def quantize(src: Path, dst: Path, chips: np.ndarray, input_name: str, flip: bool) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            batches = [c[None] for c in chips] + ([np.ascontiguousarray(c[None, :, ::-1]) for c in chips] if flip else [])
            self._it = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Entropy)


def build(source: str, version: str, n_people: int, seed: int = 0) -> Path:
    import onnxruntime

    settings = get_settings().model_copy(update={"tower_version": source})
    root = settings.models_dir / settings.towers
    src_dir, out = root / source, root / version
    if out.exists():
        raise SystemExit(f"{out} exists: choose another --version or remove it")
    manifest = json.loads((src_dir / "manifest.json").read_text())
    flip = bool((manifest.get("test_time") or {}).get("flip_average", False))
    pipeline = load_pipeline(settings)
    people = calibration_people(Path(settings.data_dir), n_people, seed)
    chips = calibration_chips(pipeline, Path(settings.data_dir), people, seed)
    out.mkdir(parents=True)
    try:
        for side, spec in manifest["towers"].items():
            quantize(src_dir / spec["file"], out / spec["file"], chips[side], manifest["input"]["name"], flip)
            spec["source_sha256"] = spec["sha256"]
            spec["sha256"] = sha256_file(out / spec["file"])
        unit_map = manifest.get("unit_map")
        if unit_map:   # the same units (int8 copies of the same weights)
            shutil.copy(src_dir / unit_map["file"], out / unit_map["file"])
        manifest["version"] = version
        manifest["description"] = (f"int8 (ONNX Runtime static QDQ) copy of towers:{source}: "
                                   + manifest.get("description", ""))
        manifest["quantization"] = {
            "source_version": source,
            "tool": "onnxruntime.quantization.quantize_static",
            "onnxruntime": onnxruntime.__version__,
            "format": "QDQ", "weights": "int8 per-channel, reduce_range (7 bit)", "activations": "uint8",
            "calibration": {"method": "entropy", "people": len(people), "images": {s: len(c) for s, c in chips.items()},
                            "flip_augmented": flip, "seed": seed,
                            "identities": f"LFW people outside View-2 folds {','.join(map(str, EXCLUDED_FOLDS))}"},
            "command": "python -m models.build.quantize_towers " + " ".join(sys.argv[1:]),
        }
        for key in ("calibration", "calibration_sha256"):
            manifest.pop(key, None)
        manifest["metrics"] = {}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="dual-v2")
    ap.add_argument("--version", default="dual-v2-int8")
    ap.add_argument("--people", type=int, default=256, help="calibration people (one image each, both sides)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="record LFW and LFW-IvS metrics after calibrating")
    ap.add_argument("--current", action="store_true", help="then name it in towers/CURRENT")
    args = ap.parse_args(argv)
    out = build(args.source, args.version, args.people, args.seed)
    print(f"wrote {out}", flush=True)
    calibrate.main(["--version", args.version, "--folds", "8"] + (["--measure"] if args.measure else []))
    if args.current:
        (out.parent / "CURRENT").write_text(args.version + "\n")
        print(f"towers/CURRENT -> {args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
