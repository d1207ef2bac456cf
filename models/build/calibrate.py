"""Ship a calibration table (score -> false-accept rate) beside a towers version.

The table is measured on LFW-IvS impostors (simulated chip vs live) of identities outside the
reserved folds 9-10, and written as <version>/calibration.json with its SHA-256 in the manifest;
the service places its threshold from it (IDV_FAR_TARGET). Folds 9-10 are never used here.

    .venv/bin/python -m models.build.calibrate --version baseline [--folds 1-8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.artifacts import sha256_file
from service.evaluate import evaluate, load_pipeline, parse_folds
from service.settings import get_settings

RESERVED = {9, 10}


def write_calibration(folder: Path, report: dict, source: str) -> dict:
    """calibration.json beside the manifest, and the manifest pointing at it with its hash."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="baseline")
    ap.add_argument("--folds", default="1-8")
    ap.add_argument("--seed", type=int, default=0)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
