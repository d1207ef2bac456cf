"""Throttles that hold: X-Forwarded-For is believed only from IDV_TRUSTED_PROXIES (none by
default), also under `idverify serve`'s uvicorn; the limits live in a store shared by every
worker and replica when IDV_RATE_LIMIT_STORE names Redis (the one at 127.0.0.1:6379 here), in the
process otherwise, and that store drops its least recently used buckets without scanning."""
from __future__ import annotations

import random
import socket
import time
import uuid

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from conftest import UnusedModels
from service.app import create_app
from service.ratelimit import MemoryStore, RateLimiter
from service.records import keys
from service.settings import Settings

REDIS = "redis://127.0.0.1:6379/0"
LIMIT = 10


def _random_address() -> str:
    return ".".join(str(random.randint(1, 254)) for _ in range(4))


def _wrong_key() -> str:
    return f"idv_{uuid.uuid4().hex}{uuid.uuid4().hex[:11]}"   # a fresh prefix each time


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError as exc:
        pytest.skip(f"Redis not reachable at 127.0.0.1:6379: {exc}")
    return REDIS


def _allowed(seconds: float) -> int:
    """A burst of LIMIT, then LIMIT a minute: how many failures `seconds` of guessing may have."""
    return LIMIT + int(seconds * LIMIT / 60.0)


def test_random_forwarded_for_gets_no_more_wrong_keys_through(db_url, live_server):
    """300 wrong keys, each with a new key prefix and a random X-Forwarded-For, from one local
    process, against the server as `idverify serve` runs it."""
    settings = Settings(database_url=db_url, auth_failures_per_minute=LIMIT)
    base = live_server(create_app(settings, models=UnusedModels()), settings)
    with httpx.Client(base_url=base, timeout=30) as http:
        t0 = time.monotonic()
        codes = [http.get("/audit", headers={"X-API-Key": _wrong_key(), "X-Forwarded-For": _random_address()})
                 .status_code for _ in range(300)]
        elapsed = time.monotonic() - t0
    assert codes[:LIMIT] == [401] * LIMIT and codes[LIMIT] == 429
    assert codes.count(401) <= _allowed(elapsed) and codes.count(401) + codes.count(429) == 300, codes


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(db_url):
    app = create_app(Settings(database_url=db_url, auth_failures_per_minute=2, trusted_proxies="10.8.0.0/24"),
                     models=UnusedModels())

    def codes(peer: str, forwarded: str, n: int = 3) -> list[int]:
        with TestClient(app, client=(peer, 40000)) as c:
            return [c.get("/audit", headers={"X-API-Key": _wrong_key(), "X-Forwarded-For": forwarded}).status_code
                    for _ in range(n)]

    # through the proxy: each client its own bucket, whatever the client wrote to the left
    assert codes("10.8.0.1", "6.6.6.6, 192.0.2.1") == [401, 401, 429]
    assert codes("10.8.0.2", "6.6.6.6, 192.0.2.2") == [401, 401, 429]
    assert codes("10.8.0.1", "192.0.2.1") == [429] * 3            # 192.0.2.1 is still throttled
    assert codes("10.8.0.1", "192.0.2.3, 10.8.0.9") == [401, 401, 429]   # proxies chained
    # not from a proxy: the header is ignored, the peer is the client
    assert codes("192.0.2.50", "198.51.100.1") == [401, 401, 429]
    assert codes("192.0.2.50", "198.51.100.2") == [429] * 3


def test_two_replicas_sharing_redis_share_the_limits(db_url, engine, role_keys, redis_url):
    attacker = _random_address()   # fresh buckets in the shared store
    apps = [create_app(Settings(database_url=db_url, auth_failures_per_minute=LIMIT, rate_limit_store=redis_url,
                                rate_limit_per_minute=3), models=UnusedModels()) for _ in range(2)]
    replicas = [TestClient(app, client=(attacker, 40000)) for app in apps]
    for r in replicas:
        r.__enter__()
    try:
        t0 = time.monotonic()
        codes = [replicas[i % 2].get("/audit", headers={"X-API-Key": _wrong_key()}).status_code for i in range(300)]
        elapsed = time.monotonic() - t0
        assert codes[:LIMIT] == [401] * LIMIT and codes[LIMIT] == 429
        assert codes.count(401) <= _allowed(elapsed) and codes.count(401) + codes.count(429) == 300, codes
        # the per-key call limit too: 3 calls a minute for this kiosk key over both replicas
        # (an empty body: 4xx once past the limit check, which comes first)
        kiosk_id = keys.lookup(engine, role_keys["kiosk"]).id
        redis.Redis.from_url(redis_url).delete(f"idv:rl:rate:{kiosk_id}")   # ids recur across databases
        with TestClient(apps[0], client=("192.0.2.60", 40000)) as a, TestClient(apps[1], client=("192.0.2.61", 40000)) as b:
            calls = [(a, b)[i % 2].post("/verify", headers={"X-API-Key": role_keys["kiosk"]}).status_code
                     for i in range(6)]
        assert [c == 429 for c in calls] == [False] * 3 + [True] * 3 and 400 <= min(calls), calls
    finally:
        for r in replicas:
            r.__exit__(None, None, None)


def test_an_unreachable_store_falls_back_to_the_process(db_url):
    app = create_app(Settings(database_url=db_url, auth_failures_per_minute=3,
                              rate_limit_store="redis://127.0.0.1:1/0"), models=UnusedModels())
    with TestClient(app, client=("192.0.2.70", 40000)) as c:
        codes = [c.get("/audit", headers={"X-API-Key": _wrong_key()}).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]


def test_bad_throttle_settings_refuse_to_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ValueError, match="IDV_TRUSTED_PROXIES"):
        create_app(Settings(database_url=url, trusted_proxies="10.0.0.0/8, not-an-address"), models=object())
    with pytest.raises(ValueError, match="IDV_RATE_LIMIT_STORE"):
        create_app(Settings(database_url=url, rate_limit_store="memcached://x"), models=object())


def test_memory_store_drops_the_least_recently_used():
    now = [0.0]
    store = MemoryStore(max_entries=1000, clock=lambda: now[0])
    limiter = RateLimiter(2, store, namespace="t")
    assert limiter.check("attacker") == 0.0 and limiter.check("attacker") == 0.0
    assert limiter.check("attacker") > 0          # throttled
    for i in range(5000):                         # a flood of other idents
        limiter.check(f"ident-{i}")
        if i % 100 == 0:
            assert limiter.peek("attacker") > 0   # still throttled: used recently, kept
    assert len(store) == 1000
    assert "t:attacker" in store and "t:ident-4999" in store and "t:ident-0" not in store
    now[0] = 61.0                                 # a minute on, the bucket is full again
    assert limiter.check("attacker") == 0.0
