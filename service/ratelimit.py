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

    def _refilled(self, key: object, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.per_minute), now))
        return min(float(self.per_minute), tokens + (now - last) * self.per_minute / 60.0)

    def peek(self, key: object) -> float:
        """Like check, without taking a token: 0.0, or the seconds until one is there."""
        if self.per_minute <= 0:
            return 0.0
        with self._lock:
            tokens = self._refilled(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * 60.0 / self.per_minute

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


class FailureThrottle:
    """Failed authentications (wrong API keys, refused console sign-ins), counted per client
    address and per presented key prefix (IDV_AUTH_FAILURES_PER_MINUTE, 0 = off): each may fail
    that many times in a burst, refilled continuously; past that, attempts from that address or
    with that prefix are answered 429 with Retry-After before the key is even looked up. Only
    failures count. At most `max_entries` idents are remembered (the fullest buckets, which are
    no different from unseen ones, are dropped first)."""

    def __init__(self, per_minute: int, clock=time.monotonic, max_entries: int = 100_000):
        self.limiter = RateLimiter(per_minute, clock)
        self.max_entries = max_entries

    @staticmethod
    def idents(address: str | None, presented: str | None) -> list[tuple[str, str]]:
        from service.records.keys import display_prefix

        out = [("address", address or "?")]
        if presented:
            out.append(("prefix", display_prefix(presented)))
        return out

    def wait(self, idents) -> float:
        return max((self.limiter.peek(i) for i in idents), default=0.0)

    def failed(self, idents) -> None:
        for ident in idents:
            self.limiter.check(ident)
        buckets = self.limiter._buckets
        if len(buckets) > self.max_entries:
            with self.limiter._lock:
                now = self.limiter.clock()
                for key in [k for k in list(buckets) if self.limiter._refilled(k, now) >= self.limiter.per_minute - 1]:
                    buckets.pop(key, None)
                while len(buckets) > self.max_entries:
                    buckets.pop(next(iter(buckets)))
