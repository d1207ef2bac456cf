"""service/threads.py: cores from affinity and the cgroup quota, the worker/thread defaults, and
what the app's lifespan sets (OpenCV threads, anyio's thread limit)."""
from __future__ import annotations

import os

import anyio
import pytest

from service import threads
from service.settings import Settings


@pytest.mark.parametrize("cpu_max, want", [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2),
                                           ("50000 100000\n", 1), ("garbage", None)])
def test_cores_capped_by_the_cgroup_quota(tmp_path, cpu_max, want):
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert threads.cores(f) == (min(affinity, want) if want else affinity)
    assert threads.cores(tmp_path / "absent") == affinity


def test_defaults_follow_the_cores(monkeypatch):
    for n, workers in ((1, 1), (2, 1), (16, 8)):
        monkeypatch.setattr(threads, "cores", lambda n=n: n)
        s = Settings()
        assert threads.workers(s) == workers and threads.onnx_threads(s) == 1
    s = Settings(workers=3, onnx_threads=2)
    assert threads.workers(s) == 3 and threads.onnx_threads(s) == 2
    assert "workers 3, onnx intra-op threads 2" in threads.describe(s)


def test_process_and_event_loop_settings():
    import cv2

    before = cv2.getNumThreads()
    try:
        assert threads.configure_process(Settings(cv2_threads=1)) == {"cv2_threads": 1}
    finally:
        cv2.setNumThreads(before)

    async def main():
        return threads.configure_event_loop(Settings(threadpool_size=7))

    assert anyio.run(main) == {"threadpool": 7}
