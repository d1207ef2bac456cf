"""Per-stage latency of the face pipeline (decode, detect, align, embed) on the CPU.

Three inputs, each analysed `--runs` times after `--warmup` untimed runs, through
`Pipeline.analyse` (the exact code behind /verify):

  chip    a simulated ID-chip photo (models.eval.chipsim: 102x126 JPEG2000, ~1 KB) -> id tower
  frame   a 640x480 JPEG camera frame (the face image scaled to 360 px high, centred on a
          blurred copy of itself) -> live tower
  lfw     one 250x250 LFW image (JPEG) -> live tower; target: detect+align+embed median <= 30 ms
  pair    chip + lfw through analyse, then the scores and the decision (`Models.scoring`): the
          work of one /verify call without HTTP; target (speed issue): p50 <= 30 ms through HTTP

`--scoring fused` (or towers, sface; default IDV_SCORING) picks the served scoring; with several
families the per-family stages (`align:sface`, `embed:towers`, ...) get their own columns.

Source face: an LFW image from the shared data (settings.data_dir), else matplotlib's bundled
sample photo (grace_hopper.jpg) so the bench runs anywhere.

Prints a markdown table (median and p90 per stage, ms), the thread settings and the command
line; `--write-docs` puts the same into docs/benchmarks.md between markers, with the machine
description (nproc, CPU model, load average) beside the figures.

    .venv/bin/python bench/latency.py [--runs 200] [--threads N] [--providers cpu] [--write-docs]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench/latency.py:start -->", "<!-- bench/latency.py:end -->"
LFW_REL = "lfw/images/Abel_Pacheco/Abel_Pacheco_0001.jpg"
STAGES = ("decode", "detect", "align", "embed")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def source_face(data_dir: Path) -> tuple[np.ndarray, bytes, str]:
    """(RGB array, original JPEG bytes, description)."""
    from PIL import Image
    p = data_dir / LFW_REL
    if not p.exists():
        import matplotlib.cbook
        p = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        desc = f"matplotlib sample {p.name} (LFW not found under {data_dir})"
    else:
        desc = f"LFW {p.relative_to(data_dir / 'lfw' / 'images')}"
    data = p.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), data, desc


def make_inputs(pipeline, img: np.ndarray, img_bytes: bytes, is_lfw: bool) -> dict[str, tuple[bytes, str, str]]:
    import cv2
    from PIL import Image

    from models.eval import chipsim
    from service.face.detect import select_face

    landmarks = None
    if not is_lfw:  # not LFW-framed: crop the chip on detected landmarks
        faces = pipeline.detector.detect(img)
        if faces:
            landmarks = select_face(faces, img.shape).landmarks
    chip = chipsim.simulate_chip(img, landmarks, chipsim.chip_rng("bench/chip", 0))

    h = 360
    w = round(img.shape[1] * h / img.shape[0])
    face = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    frame = cv2.GaussianBlur(cv2.resize(img, (640, 480), interpolation=cv2.INTER_AREA), (0, 0), 8)
    x0, y0 = max(0, (640 - w) // 2), (480 - h) // 2
    frame[y0:y0 + h, x0:x0 + min(w, 640)] = face[:, :min(w, 640)]
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=90)
    inputs = {
        "chip": (chip, "id_photo", f"simulated chip 102x126 JPEG2000, {len(chip)} B"),
        "frame": (buf.getvalue(), "live_photo", f"640x480 JPEG q90, {buf.tell()} B"),
    }
    if is_lfw:
        inputs["lfw"] = (img_bytes, "live_photo", f"LFW 250x250 JPEG, {len(img_bytes)} B")
    else:
        buf = io.BytesIO()
        Image.fromarray(cv2.resize(img, (250, 250), interpolation=cv2.INTER_AREA)).save(buf, "JPEG", quality=90)
        inputs["lfw"] = (buf.getvalue(), "live_photo", f"250x250 JPEG (sample photo resized), {buf.tell()} B")
    return inputs


def measure(pipeline, data: bytes, field: str, runs: int, warmup: int) -> dict[str, np.ndarray]:
    for _ in range(warmup):
        pipeline.analyse(data, field, {})
    rows: dict[str, list] = {k: [] for k in (*STAGES, "total")}
    for _ in range(runs):
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        pipeline.analyse(data, field, t)
        rows["total"].append((time.perf_counter() - t0) * 1e3)
        for k in set(rows) | set(t):
            if k != "total":
                rows.setdefault(k, []).append(t.get(k, 0.0))
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["detect+align+embed"] = out["detect"] + out["align"] + out["embed"]
    return out


def measure_pair(models, chip: bytes, live: bytes, runs: int, warmup: int) -> dict[str, np.ndarray]:
    """chip + live analysed, scored and decided: what one /verify call computes."""
    p = models.pipeline

    def once(t: dict) -> None:
        a, b = p.analyse(chip, "id_photo", t), p.analyse(live, "live_photo", t)
        t0 = time.perf_counter()
        models.decide(a, b)
        t["compare"] = (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        once({})
    rows: dict[str, list] = {}
    for _ in range(runs):
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        once(t)
        t["total"] = (time.perf_counter() - t0) * 1e3
        for k, v in t.items():
            rows.setdefault(k, []).append(v)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["detect+align+embed"] = out["detect"] + out["align"] + out["embed"]
    return out


def thread_info(pipeline, settings) -> str:
    import cv2
    import onnxruntime as ort
    sess = pipeline.towers.live.session
    if not hasattr(sess, "get_session_options"):   # IDV_TOWER_BACKEND=triton: no local session
        return f"towers on {sess.get_providers()}, cv2 threads={cv2.getNumThreads()}"
    so = sess.get_session_options()
    return (f"IDV_ONNX_THREADS={settings.onnx_threads} (0 = service default, service/threads.py), session intra_op={so.intra_op_num_threads} "
            f"inter_op={so.inter_op_num_threads}, providers={sess.get_providers()}, onnxruntime {ort.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cv2 threads={cv2.getNumThreads()}")


def table(results: dict[str, dict], descs: dict[str, str]) -> str:
    extra = sorted({k for r in results.values() for k in r if ":" in k})   # per-family stages
    cols = (*STAGES, *extra, "detect+align+embed", "total")
    lines = ["| input | " + " | ".join(f"{c} median / p90 (ms)" for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for name, r in results.items():
        cells = [f"{np.median(r[c]):.1f} / {np.percentile(r[c], 90):.1f}" if c in r else "-" for c in cols]
        lines.append(f"| {name}: {descs[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(block: str, scoring: str = "towers") -> None:
    """The section of this scoring (towers: the served default; others get their own markers)."""
    start, end = (START, END) if scoring == "towers" else (START.replace(":start", f":{scoring}:start"),
                                                           END.replace(":end", f":{scoring}:end"))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else (
        "# Benchmarks\n\nFigures are written by the scripts named beside them; rerun them to refresh.\n\n")
    section = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        title = "Latency per stage (CPU)" + ("" if scoring == "towers" else f", IDV_SCORING={scoring}")
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", default=None,
                    help="IDV_ONNX_THREADS for this run; a comma list (e.g. 1,2,0) measures each in turn")
    ap.add_argument("--providers", default="cpu", help="auto | cpu | cuda (default cpu)")
    ap.add_argument("--only", default=None, help="comma list of chip,frame,lfw,pair")
    ap.add_argument("--scoring", default=None, help="towers | sface | fused (default IDV_SCORING)")
    ap.add_argument("--write-docs", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    os.environ["IDV_PROVIDERS"] = args.providers
    if args.scoring:
        os.environ["IDV_SCORING"] = args.scoring
    load_start = os.getloadavg()
    thread_list = [int(t) for t in str(args.threads).split(",")] if args.threads is not None else [None]

    from service.face.loader import load_models
    from service.settings import Settings

    results, descs, infos = {}, {}, []
    for threads in thread_list:
        if threads is not None:
            os.environ["IDV_ONNX_THREADS"] = str(threads)
        settings = Settings()
        t0 = time.perf_counter()
        models = load_models(settings)
        pipeline = models.pipeline
        load_s = time.perf_counter() - t0
        pipeline.warmup()
        img, img_bytes, src = source_face(Path(settings.data_dir))
        inputs = make_inputs(pipeline, img, img_bytes, src.startswith("LFW"))
        keep = set(args.only.split(",")) if args.only else {*inputs, "pair"}
        pair = (inputs["chip"][0], inputs["lfw"][0])
        inputs = {k: v for k, v in inputs.items() if k in keep}
        tag = f"threads={settings.onnx_threads}"
        infos.append(f"{tag}: {thread_info(pipeline, settings)}; pipeline load {load_s:.1f} s")
        for name, (data, field, desc) in inputs.items():
            key = f"{name} ({tag})" if len(thread_list) > 1 else name
            results[key] = measure(pipeline, data, field, args.runs, args.warmup)
            descs[key] = desc
            print(f"{key}: median total {np.median(results[key]['total']):.1f} ms", file=sys.stderr)
        if "pair" in keep:
            key = f"pair ({tag})" if len(thread_list) > 1 else "pair"
            results[key] = measure_pair(models, *pair, args.runs, args.warmup)
            descs[key] = "chip + LFW 250x250, analysed, scored and decided (no HTTP)"
            print(f"{key}: median total {np.median(results[key]['total']):.1f} ms", file=sys.stderr)

    cmd = "python bench/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    def fmt(la):
        return " / ".join(f"{x:.2f}" for x in la)
    machine = (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
               f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
               f"load average (1/5/15 min) {fmt(load_start)} before, {fmt(os.getloadavg())} after "
               f"(the machine is shared: figures above ~2 runnable processes per core are contended)")
    verdicts = []
    for key, r in results.items():
        if key.startswith("lfw"):
            med = float(np.median(r["detect+align+embed"]))
            verdicts.append(f"{key}: 250x250 LFW image, detect+align+embed median **{med:.1f} ms** "
                            f"(target <= 30 ms: {'met' if med <= 30 else 'NOT met'}).")
        if key.startswith("pair"):
            med = float(np.median(r["total"]))
            verdicts.append(f"{key}: chip + 250x250 live, analysed, scored, decided, median **{med:.1f} ms** "
                            f"without HTTP (speed issue: p50 <= 30 ms through HTTP: "
                            f"{'within reach' if med <= 30 else 'NOT met'}).")
    verdict = "\n".join(f"- {v}" for v in verdicts)
    block = "\n".join([
        f"Command: `{env + ' ' if env else ''}{cmd.strip()}` ({args.runs} runs per input after {args.warmup} warm-up; "
        f"`Pipeline.analyse`, stage times from its timings dict; total includes quality flags)",
        "",
        f"Machine: {machine}",
        "",
        f"Model: {pipeline.model_version}; providers `{args.providers}`. Threads:",
        "",
        *[f"- {i}" for i in infos],
        "",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}, commit {git_commit()}, "
        f"source face {src}",
        "",
        table(results, descs),
        "",
        verdict,
    ])
    print(block)
    if args.write_docs:
        write_docs(block, settings.scoring)
        print(f"\nwritten to {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
