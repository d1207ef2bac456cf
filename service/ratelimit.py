"""Rate limits: the per-key call limit (IDV_RATE_LIMIT_PER_MINUTE, 0 = off) and the key-guessing
throttle (IDV_AUTH_FAILURES_PER_MINUTE), with their state in this process or in a shared store.

Each limit is a bucket per key holding at most one minute's allowance, refilled continuously,
kept as one number (GCRA: the "theoretical arrival time" by which the bucket is full again).

- `MemoryStore` (IDV_RATE_LIMIT_STORE empty): in this process, so per worker and replica. At
  most `max_entries` buckets, least recently used dropped first, in constant time (no scan).
- `RedisStore` (IDV_RATE_LIMIT_STORE=redis://host:port/db): one Redis key per bucket, updated by
  a script on the Redis server's clock and expiring when the bucket is full again, so every
  worker and replica sharing the store shares the limits. When Redis does not answer within
  0.5 s, that call falls back to the process's own buckets (logged): the limits then hold per
  process for a while rather than every call failing.

Blocking (Redis is a network call): call `check`, `wait`, `failed` from worker threads.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger("idverify.ratelimit")

WINDOW = 60.0        # seconds: a bucket holds one minute's allowance
REDIS_TIMEOUT = 0.5  # seconds for a connection or an answer from Redis
EPSILON = 1e-6

# KEYS[1]: the bucket; ARGV: interval ms, window ms, take (1|0). Returns 0 (allowed; taken when
# ARGV[3] is 1) or the milliseconds until it would be.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local after = tat + interval
if after - now > window + 0.001 then return math.ceil(after - now - window) end
if ARGV[3] == '1' then redis.call('SET', KEYS[1], tostring(after), 'PX', math.ceil(after - now)) end
return 0
"""


class MemoryStore:
    def __init__(self, max_entries: int = 100_000, clock=time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tat)

    def __contains__(self, key: str) -> bool:
        return key in self._tat

    def acquire(self, key: str, interval: float, take: bool) -> float:
        """0.0 when the bucket has a token (taken when `take`), else the seconds until it has."""
        with self._lock:
            now = self.clock()
            tat = max(self._tat.get(key, now), now)
            if key in self._tat:
                self._tat.move_to_end(key)
            after = tat + interval
            if after - now > WINDOW + EPSILON:
                return after - now - WINDOW
            if take:
                self._tat[key] = after
                self._tat.move_to_end(key)
                while len(self._tat) > self.max_entries:
                    self._tat.popitem(last=False)
            return 0.0


class RedisStore:
    def __init__(self, url: str, fallback: MemoryStore):
        import redis

        self.url = url
        self.fallback = fallback
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
        self._script = self._client.register_script(GCRA_SCRIPT)
        self._logged = 0.0

    def acquire(self, key: str, interval: float, take: bool) -> float:
        try:
            wait_ms = self._script(keys=[f"idv:rl:{key}"], args=[interval * 1000.0, WINDOW * 1000.0, int(take)])
            return float(wait_ms) / 1000.0
        except self._errors as exc:
            if time.monotonic() - self._logged > 30:
                self._logged = time.monotonic()
                log.warning("rate-limit store %s not answering (%s): limits hold per process meanwhile",
                            self._client.connection_pool.connection_kwargs.get("host", "?"), exc.__class__.__name__)
            return self.fallback.acquire(key, interval, take)


def make_store(url: str, max_entries: int = 100_000):
    """The store IDV_RATE_LIMIT_STORE names; ValueError (the service refuses to start) when it is
    neither empty nor a redis:// (rediss://, unix://) URL."""
    memory = MemoryStore(max_entries)
    url = (url or "").strip()
    if not url:
        return memory
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("IDV_RATE_LIMIT_STORE must be empty (in-process) or a redis:// URL")
    return RedisStore(url, memory)


class RateLimiter:
    def __init__(self, per_minute: int, store=None, namespace: str = "rate", clock=time.monotonic):
        self.per_minute = per_minute
        self.store = store if store is not None else MemoryStore(clock=clock)
        self.namespace = namespace

    def _acquire(self, key: object, take: bool) -> float:
        if self.per_minute <= 0:
            return 0.0
        return self.store.acquire(f"{self.namespace}:{key}", WINDOW / self.per_minute, take)

    def peek(self, key: object) -> float:
        """Like check, without taking a token: 0.0, or the seconds until one is there."""
        return self._acquire(key, False)

    def check(self, key: object) -> float:
        """Take one token for `key`. Returns 0.0 when allowed, else the seconds until the next
        token (for Retry-After)."""
        return self._acquire(key, True)


class FailureThrottle:
    """Failed authentications (wrong API keys, refused console sign-ins), counted per client
    address and per presented key prefix (IDV_AUTH_FAILURES_PER_MINUTE, 0 = off): each may fail
    that many times in a burst, refilled continuously; past that, attempts from that address or
    with that prefix are answered 429 with Retry-After before the key is even looked up. Only
    failures count. The client address is the peer's, or X-Forwarded-For's from a trusted proxy
    (service/proxies.py)."""

    def __init__(self, per_minute: int, store=None):
        self.limiter = RateLimiter(per_minute, store, namespace="auth")

    @staticmethod
    def idents(address: str | None, presented: str | None) -> list[tuple[str, str]]:
        from service.records.keys import display_prefix

        out = [("address", address or "?")]
        if presented:
            out.append(("prefix", display_prefix(presented)))
        return out

    @staticmethod
    def _key(ident: tuple[str, str]) -> str:
        return f"{ident[0]}:{ident[1]}"

    def wait(self, idents) -> float:
        return max((self.limiter.peek(self._key(i)) for i in idents), default=0.0)

    def failed(self, idents) -> None:
        for ident in idents:
            self.limiter.check(self._key(ident))
