"""What an evaluation leaves behind: report.json, pair_scores.csv, plots, the console summary,
and `summarise`, the one metrics summary a manifest records."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
from pathlib import Path

import numpy as np

from models.eval.metrics import far_key
from models.eval.pairs import Pair

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - report what we can
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def pipeline_info(pipeline) -> dict:
    info = {"model_version": getattr(pipeline, "model_version", None)}
    towers = getattr(pipeline, "towers", None)
    folder = getattr(towers, "folder", None)
    if folder is not None and (Path(folder) / "manifest.json").exists():
        info["manifest_path"] = str(folder / "manifest.json")
        info["manifest_sha256"] = hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()
    s = getattr(pipeline, "settings", None)
    if s is not None:
        info["settings"] = {k: getattr(s, k, None) for k in (
            "providers", "onnx_threads", "min_face_px", "detect_max_side", "detect_min_side",
            "towers", "tower_version", "scoring", "sface_version", "fusion_version")}
    return info


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(o):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_outputs(report: dict, pairs: list[Pair], scores, codes, curves, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report['protocol']} folds {','.join(map(str, report['folds']))} - {report.get('model_version')}"
    from models.eval.plots import plot_curves

    report["plots"] = plot_curves(curves, out, title, served=report.get("served_threshold"))
    with open(out / "pair_scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "name1", "n1", "name2", "n2", "same", "score", "fta1", "fta2"])
        for p, s, c in zip(pairs, scores, codes):
            w.writerow([p.fold, p.a[0], p.a[1], p.b[0], p.b[1], int(p.same),
                        f"{s:.6f}" if math.isfinite(s) else "-inf", c[0] or "", c[1] or ""])
    report["files"] = {"report": "report.json", "pair_scores": "pair_scores.csv", **report["plots"]}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")


def summary_lines(report: dict) -> list[str]:
    acc = report["accuracy"]
    c = report["counts"]
    lines = [
        f"protocol {report['protocol']}  folds {','.join(map(str, report['folds']))}  model {report.get('model_version')}",
        f"accuracy {acc['mean'] * 100:.2f}% +- {acc['standard_error'] * 100:.2f}% (s.e.; std {acc['std'] * 100:.2f}%; threshold from {acc['threshold_selection']})",
        f"genuine {c['genuine']}  impostor {c['impostor']} ({report['impostors']})",
    ]
    for r in report["tar_at_far"]:
        note = "" if r["resolvable"] else "  (not resolvable)"
        lines.append(f"TAR@FAR={r['far_target']:g}: {r['tar'] * 100:.2f}%  threshold {r['threshold']:.4f}  observed FAR {r['far']:.2e}{note}")
    if report.get("tar_at_far_extended_genuine"):
        ext = ", ".join(f"{r['tar'] * 100:.2f}%@{r['far_target']:g}" for r in report["tar_at_far_extended_genuine"])
        lines.append(f"TAR, all {c['extended_genuine']} same-identity pairs: {ext}")
    if report.get("served_threshold"):
        st = report["served_threshold"]
        lines.append(f"served threshold {st['score']:.4f} ({st['setting']}, calibrated FAR {st['far_calibrated']}): "
                     f"here FAR {st['far']:.2e}, TAR {st['tar'] * 100:.2f}%")
    for family, f in (report.get("families") or {}).items():
        tars = ", ".join(f"{r['tar'] * 100:.2f}%@{r['far_target']:g}" for r in f["tar_at_far"])
        lines.append(f"  {family} ({f['model_version']}) alone: accuracy {f['accuracy']['mean'] * 100:.2f}%, TAR {tars}")
    for side, b in report["fta"].items():
        if side != "pairs_with_fta":
            lines.append(f"FTA {side}: {b['failed']}/{b['images']} ({b['rate'] * 100:.2f}%) {b['by_code']}")
    lines.append(f"pairs with an FTA side: {report['fta']['pairs_with_fta']}")
    tp = report["throughput"]
    lines.append(f"throughput {tp['images_per_s']} images/s over {tp['items']} (image, side) items; "
                 f"ms/image {tp['stage_ms_per_image']}")
    return lines


def summarise(report: dict) -> dict:
    """The figures of one report a manifest (or a run folder) keeps: TAR keyed by `far_key`."""
    return {
        "accuracy": report["accuracy"]["mean"],
        "tar_at_far": {far_key(r["far_target"]): r["tar"] for r in report["tar_at_far"]},
        "pairs": report["counts"]["pairs"],
        "genuine": report["counts"]["genuine"],
        "impostors": report["counts"]["impostor"],
        "fta": {side: v["failed"] for side, v in report["fta"].items() if side != "pairs_with_fta"},
        "chipsim": (report.get("chipsim") or {}).get("version"),
        **({"families": {f: {"accuracy": v["accuracy"]["mean"],
                             "tar_at_far": {far_key(r["far_target"]): r["tar"] for r in v["tar_at_far"]}}
                         for f, v in report["families"].items()}} if report.get("families") else {}),
        "command": report.get("command"),
    }
