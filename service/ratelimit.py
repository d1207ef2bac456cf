"""Per-key rate limit (IDV_RATE_LIMIT_PER_MINUTE, 0 = off): a token bucket per key that holds
at most one minute's allowance and refills continuously. In memory, so per process: run one
API process per container (the default) or divide the limit by the number of processes."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def check(self, key: object) -> float:
        """Take one token for `key`. Returns 0.0 when allowed, else the seconds until the next
        token (for Retry-After)."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
