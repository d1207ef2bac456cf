"""Micro-batching of tower calls: concurrent requests' chips go through one tower call.

`BatchedTower(tower, wait_ms, max_rows)` has the tower's interface (`embed(chips) -> (N, D)`,
and every other attribute passed through), callable from any number of threads. There is no
worker thread: a caller that finds the tower idle with nobody queued runs its own chips at once
(so one request at a time costs nothing: no wait, no hand-off); a caller that finds the tower
busy queues. When the tower comes free, the oldest queued caller leads the next call: it waits
until `max_rows` rows are queued or `wait_ms` has passed since it was queued, whichever comes
first, then runs everything queued (up to `max_rows`) as one batch and hands each caller its
rows. So a batch forms only while the tower is busy, and no call waits longer than its turn
plus `wait_ms`. A call larger than `max_rows` rows runs alone.

The reason is a GPU (a batch of 16 costs about what a batch of 1 does); on a CPU a batch costs
about the sum of its rows, so batching there is roughly neutral (docs/benchmarks.md has both).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class _Call:
    __slots__ = ("chips", "rows", "queued", "done", "result", "error")

    def __init__(self, chips: np.ndarray):
        self.chips = chips
        self.rows = len(chips)
        self.queued = time.monotonic()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class BatchedTower:
    def __init__(self, tower, wait_ms: float, max_rows: int = 16):
        self.tower = tower
        self.wait_s = max(0.0, float(wait_ms)) / 1000.0
        self.max_rows = max(1, int(max_rows))
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._busy = False
        self.batches = 0          # tower calls made, and rows through them (for /metrics and tests)
        self.rows = 0

    def __getattr__(self, name):   # session, path, flip_average, ...: the wrapped tower's
        return getattr(self.tower, name)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        chips = chips[None] if chips.ndim == 3 else chips
        call = _Call(chips)
        with self._cond:
            if not self._busy and not self._queue:
                self._busy = True
                batch = [call]
            else:
                self._queue.append(call)
                batch = self._wait_to_lead(call)
        if batch:
            self._run(batch)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _wait_to_lead(self, call: _Call) -> list[_Call]:
        """Under the lock: until `call` is answered by another's batch (returns []), or it heads
        the queue with the tower free; then collect the batch (the lock is held again)."""
        while True:
            if call.done.is_set():
                return []
            if not self._busy and self._queue and self._queue[0] is call:
                break
            self._cond.wait()
        self._busy = True
        deadline = call.queued + self.wait_s
        while self._queued_rows() < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, rows = [], 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
            nxt = self._queue.popleft()
            batch.append(nxt)
            rows += nxt.rows
        return batch

    def _queued_rows(self) -> int:
        return sum(c.rows for c in self._queue)

    def _run(self, batch: list[_Call]) -> None:
        try:
            x = batch[0].chips if len(batch) == 1 else np.concatenate([c.chips for c in batch])
            out = self.tower.embed(x)
            at = 0
            for c in batch:
                c.result = out[at:at + c.rows]
                at += c.rows
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for c in batch:
                c.error = exc
        with self._cond:
            self._busy = False
            self.batches += 1
            self.rows += sum(c.rows for c in batch)
            for c in batch:
                c.done.set()
            self._cond.notify_all()


def batched(towers, wait_ms: float, max_rows: int):
    """`towers` (service.face.artifacts.Towers) with each distinct tower wrapped once (the
    baseline's two sides share one session, so they share one batcher)."""
    if wait_ms <= 0:
        return towers
    wrapped = {}
    for side in ("id", "live"):
        t = getattr(towers, side)
        if id(t) not in wrapped:
            wrapped[id(t)] = BatchedTower(t, wait_ms, max_rows)
        setattr(towers, side, wrapped[id(t)])
    return towers
