"""Ship a calibration table (score -> false-accept rate) beside a towers version.

The table is measured on LFW-IvS impostors (simulated chip vs live) of identities outside the
reserved folds 9-10, and written as <version>/calibration.json with its SHA-256 in the manifest;
the service places its threshold from it (IDV_FAR_TARGET). Folds 9-10 are never used here.

    .venv/bin/python -m models.build.calibrate --version baseline [--folds 1-8] [--measure]

With --measure it then runs the evaluation protocols (LFW 10-fold; LFW-IvS folds 9-10 with
both chip encodings) and records their figures in the manifest's `metrics`. Nothing is chosen
on folds 9-10: they are only measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.face.artifacts import sha256_file
from models.eval.pairs import parse_folds
from models.eval.protocols import evaluate
from models.eval.report import summarise
from service.face.loader import load_pipeline
from service.settings import get_settings

RESERVED = {9, 10}


def write_calibration(folder: Path, report: dict, source: str) -> dict:
    """The one calibration writer (this CLI and `models.train.export` both call it):
    calibration.json beside the manifest, and the manifest pointing at it with its hash."""
    (folder / "calibration.json").write_text(json.dumps({
        "table": report["calibration"],
        "source": source,
        "n_impostors": report["counts"]["impostor"],
        "command": report.get("command"),
    }, indent=2) + "\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"] = "calibration.json"
    manifest["calibration_sha256"] = sha256_file(folder / "calibration.json")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def record_metrics(folder: Path, pipeline, data_dir: Path, embedder_for=None) -> dict:
    """`embedder_for(encoding)`: an Embedder to reuse (None: a fresh one per run)."""
    runs = {
        "lfw_10fold": ("lfw", list(range(1, 11)), "rgb"),
        "lfw_ivs_folds9-10": ("lfw-ivs", [9, 10], "rgb"),
        "lfw_ivs_folds9-10_ycc": ("lfw-ivs", [9, 10], "ycc"),
    }
    metrics = {}
    for key, (protocol, folds, encoding) in runs.items():
        tag = "1-10" if len(folds) == 10 else "9,10"
        command = f"idverify eval --protocol {protocol} --folds {tag}" + (" --chip-encoding ycc" if encoding == "ycc" else "")
        report = evaluate(protocol, folds, pipeline, data_dir, chip_encoding=encoding, command=command,
                          out=Path("reports") / f"{folder.name}-{key}",
                          embedder=embedder_for(encoding) if embedder_for else None)
        metrics[key] = summarise(report)
        print(key, json.dumps(metrics[key]), flush=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["metrics"] = metrics
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="baseline")
    ap.add_argument("--folds", default="1-8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="then record LFW and LFW-IvS metrics in the manifest")
    args = ap.parse_args(argv)
    folds = parse_folds(args.folds)
    if RESERVED & set(folds):
        ap.error("folds 9 and 10 are reserved for evaluation: never calibrate on them")
    settings = get_settings().model_copy(update={"tower_version": args.version})
    folder = settings.models_dir / settings.towers / args.version
    pipeline = load_pipeline(settings)
    command = "python -m models.build.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    report = evaluate("lfw-ivs", folds, pipeline, settings.data_dir, seed=args.seed,
                      out=Path("reports") / f"calibration-{args.version}", command=command)
    write_calibration(folder, report, f"LFW-IvS (chipsim seed {args.seed}) extended impostors of LFW "
                      f"View-2 folds {args.folds} identities; never folds 9-10")
    for row in report["calibration"]:
        print(f"FAR {row['far']:.1e}  score >= {row['score']:.5f}")
    if args.measure:
        record_metrics(folder, pipeline, settings.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
