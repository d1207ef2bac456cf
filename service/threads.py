"""The thread and worker model of the API process, in one place (docs/benchmarks.md, "Threads
and workers", has the measurements behind the defaults).

A /verify call runs its CPU work (decode, detect, align, the towers) in one of anyio's worker
threads; ONNX Runtime runs each graph with `IDV_ONNX_THREADS` intra-op threads of the calling
session; OpenCV (resize, warpAffine) may add its own pool. On a small box these pools multiply:
C concurrent requests x ONNX threads + OpenCV threads runnable threads on 2 cores. The model
here: parallelism comes from *requests* (worker processes x concurrent requests), not from
splitting one small graph across cores, so

* `IDV_WORKERS` uvicorn processes (0 = one per 2 cores, at least 1);
* `IDV_ONNX_THREADS` per session (0 = 1);
* a /verify analyses its two photos at once, in two threads (service/api/verify.py), so a lone
  request still uses two cores;
* `IDV_CV2_THREADS` for OpenCV (1 = none of its own; -1 = OpenCV's default, one per core);
* `IDV_THREADPOOL_SIZE` anyio threads (0 = anyio's default of 40): the bound on requests
  analysed at once in one worker; more wait for a thread.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("idverify.threads")


def cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity (cpuset), capped by the cgroup v2 CPU quota (a
    Kubernetes CPU limit is a quota, not a cpuset: a 2-CPU pod on a 64-core node sees 64)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def workers(settings) -> int:
    """uvicorn worker processes: the setting, or one per 2 cores (each worker keeps about 2 cores
    busy with its concurrent requests before the GIL-bound parts of a request limit it)."""
    return settings.workers if settings.workers > 0 else max(1, cores() // 2)


def onnx_threads(settings) -> int:
    """Intra-op threads per ONNX Runtime session: the setting, or 1 (the graphs are small: a
    second thread per call cost ~6-10 % more CPU per pair on 2 cores for little latency, and a
    lone request already uses two cores through its two sides)."""
    return settings.onnx_threads if settings.onnx_threads > 0 else 1


def configure_process(settings) -> dict:
    """OpenCV's threads, once per process (each uvicorn worker); returns what was set."""
    import cv2

    cv2.setNumThreads(settings.cv2_threads)
    return {"cv2_threads": cv2.getNumThreads()}


def configure_event_loop(settings) -> dict:
    """anyio's worker-thread limit; call from inside the running event loop (the lifespan)."""
    import anyio.to_thread

    limiter = anyio.to_thread.current_default_thread_limiter()
    if settings.threadpool_size > 0:
        limiter.total_tokens = settings.threadpool_size
    return {"threadpool": limiter.total_tokens}


def describe(settings) -> str:
    return (f"{cores()} cores; workers {workers(settings)}, onnx intra-op threads {onnx_threads(settings)}, "
            f"cv2 threads {settings.cv2_threads}, threadpool {settings.threadpool_size or 'anyio default'}")
