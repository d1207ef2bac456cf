"""The thread and worker model of the API process, in one place (docs/benchmarks.md, "Threads
and workers", has the measurements behind the defaults).

A /verify call runs its CPU work (decode, detect, align, the towers) in one of anyio's worker
threads; ONNX Runtime runs each graph with `IDV_ONNX_THREADS` intra-op threads of the calling
session; OpenCV (resize, warpAffine) may add its own pool. On a small box these pools multiply:
C concurrent requests x ONNX threads + OpenCV threads runnable threads on 2 cores. The model
here: parallelism comes from *requests* (worker processes x concurrent requests), not from
splitting one small graph across cores, so

* `IDV_WORKERS` uvicorn processes (0 = one per 2 cores, at least 1);
* `IDV_ONNX_THREADS` per session (0 = cores / workers, at least 1: together the workers use
  each core once);
* `IDV_CV2_THREADS` for OpenCV (1 = none of its own; -1 = OpenCV's default, one per core);
* `IDV_THREADPOOL_SIZE` anyio threads (0 = anyio's default of 40): the bound on requests
  analysed at once in one worker; more wait for a thread.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("idverify.threads")


def cores() -> int:
    """CPUs this process may run on (the container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers(settings) -> int:
    return settings.workers if settings.workers > 0 else max(1, cores() // 2)


def onnx_threads(settings) -> int:
    """Intra-op threads per ONNX Runtime session: the setting, or cores shared by the workers."""
    if settings.onnx_threads > 0:
        return settings.onnx_threads
    return max(1, cores() // workers(settings))


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
