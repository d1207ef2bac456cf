"""`idverify eval --write-docs`: one section per protocol and folds in docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
            f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (shared machine)")


def write_docs_section(report: dict, out: Path, doc: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace (or append) this protocol+folds section of docs/benchmarks.md."""
    enc = (report.get("chipsim") or {}).get("encoding")
    variant = f", {enc} chips" if enc and enc != "rgb" else ""
    tag = f"idverify eval {report['protocol']} folds {','.join(map(str, report['folds']))}{variant}"
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    c, acc = report["counts"], report["accuracy"]
    rows = ["| FAR | TAR (pairs.txt genuine) | TAR (all same-identity pairs) | threshold | observed FAR | note |",
            "| ---: | ---: | ---: | ---: | ---: | --- |"]
    ext = {r["far_target"]: r for r in (report.get("tar_at_far_extended_genuine") or [])}
    for r in report["tar_at_far"]:
        e = ext.get(r["far_target"])
        rows.append(f"| {r['far_target']:g} | {r['tar'] * 100:.2f}% | {e['tar'] * 100:.2f}% | " if e else
                    f"| {r['far_target']:g} | {r['tar'] * 100:.2f}% | - | ")
        rows[-1] += (f"{r['threshold']:.4f} | {r['far']:.2e} | "
                     f"{'' if r['resolvable'] else 'not resolvable'} |")
    fta = "; ".join(f"{k} {v['failed']}/{v['images']}" for k, v in report["fta"].items() if k != "pairs_with_fta")
    tp = report["throughput"]
    chip = report.get("chipsim")
    try:
        out_rel = out.resolve().relative_to(ROOT)
    except ValueError:
        out_rel = out
    body = "\n".join([
        f"Command: `{report['command']}` (commit {(report['git']['commit'] or '?')[:7]}"
        f"{', dirty tree' if report['git']['dirty'] else ''}; {report['timestamp']}; report `{out_rel}/report.json`)",
        "",
        f"Machine: {_machine()}; throughput {tp['images_per_s']} images/s over {tp['items']} (image, side) items.",
        "",
        f"Model `{report.get('model_version')}` (manifest sha256 {str(report.get('manifest_sha256'))[:12]}...)"
        + (f"; chips {chip['version']}, mean {chip['bytes']['mean']:.0f} B" if chip else ""),
        "",
        f"Accuracy ({len(report['folds'])}-fold, threshold from {acc['threshold_selection']}): "
        f"**{acc['mean'] * 100:.2f}%** +- {acc['standard_error'] * 100:.2f}% (s.e.), std {acc['std'] * 100:.2f}%. "
        f"Genuine {c['genuine']}, impostor {c['impostor']:,} ({report['impostors']}); FTA {fta}.",
        "",
        *rows,
    ])
    section = f"{start}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        if "## Verification accuracy" not in text:
            text = text.rstrip("\n") + "\n\n## Verification accuracy (`idverify eval`)\n"
        text = text.rstrip("\n") + f"\n\n### {report['protocol']}, folds {','.join(map(str, report['folds']))}{variant}\n\n{section}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
