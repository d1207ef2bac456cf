"""`idverify eval`: registered through the `idverify.commands` entry point group."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import models.eval as _package
from models.eval import DEFAULT_FOLDS, PROTOCOLS

ROOT = Path(__file__).resolve().parents[2]
REQUIRES = ("matplotlib", "scipy", "tqdm")  # the `eval` extra; without it `idverify eval` says so
EXTRA = "eval"


def register(sub) -> None:
    p = sub.add_parser("eval", help="verification accuracy on LFW (lfw) or simulated chip vs live (lfw-ivs)",
                       description=_package.__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=PROTOCOLS, default="lfw")
    p.add_argument("--folds", default=None, help="e.g. 1-10 or 9,10 (default: lfw 1-10, lfw-ivs 9,10)")
    p.add_argument("--out", default=None, help="report folder (default reports/<protocol>-folds<...>)")
    p.add_argument("--data-dir", default=None, help="data root holding lfw/ (default: settings.data_dir, IDV_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="at most N pairs per fold (half matched, half mismatched)")
    p.add_argument("--extended-impostors", "--extended", dest="extended_impostors",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="impostors = all cross-identity image pairs of the selected folds (default) "
                        "or only the mismatched pairs of pairs.txt")
    p.add_argument("--seed", type=int, default=0, help="global seed of the chip simulator")
    p.add_argument("--chip-landmarks", choices=("fixed", "detect"), default="fixed")
    p.add_argument("--chip-encoding", choices=("rgb", "ycc", "jpeg", "webp"), default="rgb",
                   help="coder of simulated chips: JPEG2000 rgb (harsher, default) or ycc; jpeg or webp at the same "
                        "~1 KB (webp is never used in training: the held-out coder; see models/eval/chipsim.py)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--write-docs", action="store_true",
                   help="put the summary, command and machine into docs/benchmarks.md (one section per protocol and folds)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from models.eval.docs import write_docs_section
    from models.eval.pairs import parse_folds
    from models.eval.protocols import evaluate
    from models.eval.report import summary_lines
    from service.face.loader import load_pipeline
    from service.settings import get_settings

    settings = get_settings()
    data_dir = Path(args.data_dir) if args.data_dir else Path(settings.data_dir)
    folds = parse_folds(args.folds or DEFAULT_FOLDS[args.protocol])
    fold_tag = "-".join(map(str, folds)) if len(folds) < 10 else "1-10"
    tag = f"{args.protocol}-folds{fold_tag}" + (f"-{args.chip_encoding}" if args.protocol == "lfw-ivs" and args.chip_encoding != "rgb" else "")
    out = Path(args.out) if args.out else ROOT / "reports" / tag
    if not (data_dir / "lfw" / "pairs.txt").exists():
        print(f"error: {data_dir / 'lfw' / 'pairs.txt'} not found (set --data-dir or IDV_DATA_DIR)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipeline = load_pipeline(settings)   # evaluation needs no decision threshold
    pipeline.warmup()
    print(f"loaded {pipeline.model_version} in {time.perf_counter() - t0:.1f}s; onnx threads "
          f"{settings.onnx_threads or 'default'}; cpu count {os.cpu_count()}", file=sys.stderr)
    report = evaluate(args.protocol, folds, pipeline, data_dir, limit=args.limit,
                      extended_impostors=args.extended_impostors, seed=args.seed, out=out,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      chip_landmarks=args.chip_landmarks, chip_encoding=args.chip_encoding,
                      command="idverify " + " ".join(sys.argv[1:]))
    for line in summary_lines(report):
        print(line)
    print(f"report: {out / 'report.json'}")
    if args.write_docs:
        write_docs_section(report, out)
    return 0
