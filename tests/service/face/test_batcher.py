"""service/face/batcher.py: concurrent tower calls merged into batches, each caller getting its
own rows; a lone caller runs at once; the wait is bounded; errors reach every caller."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from service.face.batcher import BatchedTower, batched


class SlowTower:
    """Row i of the answer = the chips' mean pixel, so each caller can check it got its own."""

    def __init__(self, seconds: float = 0.02, fail: bool = False):
        self.seconds, self.fail, self.calls, self.session = seconds, fail, [], "the session"

    def embed(self, chips: np.ndarray) -> np.ndarray:
        self.calls.append(len(chips))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("tower broke")
        return chips.reshape(len(chips), -1).mean(axis=1, keepdims=True).astype(np.float32)


def chips(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 4, 4, 3), value, np.uint8)


def test_lone_caller_runs_at_once_without_waiting():
    tower = SlowTower(seconds=0.0)
    b = BatchedTower(tower, wait_ms=200, max_rows=8)
    t0 = time.perf_counter()
    out = b.embed(chips(7)[0])          # one (S, S, 3) chip, as Pipeline.analyse passes
    assert time.perf_counter() - t0 < 0.05 and out.tolist() == [[7.0]]
    assert tower.calls == [1] and b.session == "the session"   # attributes pass through


def test_concurrent_callers_are_batched_and_get_their_rows():
    tower = SlowTower(seconds=0.03)
    b = BatchedTower(tower, wait_ms=5, max_rows=16)
    results, start = {}, threading.Barrier(12)

    def call(i):
        start.wait()
        results[i] = b.embed(chips(i, n=1 + i % 2))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    for i in range(12):
        assert results[i].shape == (1 + i % 2, 1) and np.all(results[i] == i)
    assert sum(tower.calls) == sum(1 + i % 2 for i in range(12)) == b.rows
    assert len(tower.calls) < 12 and max(tower.calls) > 1 and max(tower.calls) <= 16


def test_wait_is_bounded():
    """Queued behind a busy tower, a caller leads the next call no later than wait_ms after it
    queued (plus the call in flight), even though the batch never fills."""
    tower = SlowTower(seconds=0.05)
    b = BatchedTower(tower, wait_ms=20, max_rows=64)
    first = threading.Thread(target=b.embed, args=(chips(1),))
    first.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    b.embed(chips(2))
    took = time.perf_counter() - t0
    first.join()
    assert took < 0.05 + 0.02 + 0.05 + 0.05, took   # rest of the first call + wait + own call + slack
    assert tower.calls == [1, 1]


def test_errors_reach_every_caller_of_the_batch():
    b = BatchedTower(SlowTower(seconds=0.02, fail=True), wait_ms=5, max_rows=8)
    errors = []

    def call():
        try:
            b.embed(chips(1))
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(5)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert errors == ["tower broke"] * 5


def test_batched_wraps_shared_towers_once_and_off_is_a_no_op():
    class Towers:
        pass

    towers = Towers()
    shared = SlowTower()
    towers.id = towers.live = shared
    assert batched(towers, 0, 8).id is shared
    out = batched(towers, 2, 8)
    assert isinstance(out.id, BatchedTower) and out.id is out.live and out.id.tower is shared


@pytest.mark.parametrize("wait_ms", [0.5, 2])
def test_real_tower_same_embeddings_batched_or_not(pipeline, wait_ms):
    """The served towers give the same rows in a batch as one by one."""
    tower = pipeline.towers.live
    tower = getattr(tower, "tower", tower)
    x = np.random.default_rng(0).integers(0, 256, (6, pipeline.chip_size, pipeline.chip_size, 3)).astype(np.uint8)
    alone = np.concatenate([tower.embed(x[i:i + 1]) for i in range(6)])
    b = BatchedTower(tower, wait_ms=wait_ms, max_rows=8)
    got = [None] * 6

    def call(i):
        got[i] = b.embed(x[i:i + 1])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    np.testing.assert_allclose(np.concatenate(got), alone, atol=1e-4)
