"""Issue 12, item 8: property-based fuzzing of every operation in /openapi.json (schemathesis over
the ASGI app with the real models and an admin key, so the calls reach the routes' depths):
no answer is a server error (>= 500, except 503 with Retry-After, which is an answer the
contract allows), on SQLite and PostgreSQL.

Bounded by time: IDV_FUZZ_SECONDS per database backend (default 30 s, so `make test` stays
short; CI's .ci/run sets 150, about 5 minutes for both), split over the operations (time one
leaves unused goes to the next); each
operation also stops at IDV_FUZZ_SECONDS x 8 examples. Shrinking is kept, so a failure reports a
minimal case; every failing case is listed, not just the first."""
from __future__ import annotations

import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings as hsettings  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

SECONDS = float(os.environ.get("IDV_FUZZ_SECONDS", "30"))


def test_fuzz_openapi_no_server_errors(db_url, models, role_keys):
    from fastapi.testclient import TestClient

    app = create_app(Settings(database_url=db_url, auth_failures_per_minute=0), models=models)
    with TestClient(app):   # lifespan
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert operations
        end = time.monotonic() + SECONDS
        failures: list[str] = []
        counts: dict[str, int] = {}
        for i, op in enumerate(operations):
            label = f"{op.method.upper()} {op.path}"
            deadline = time.monotonic() + (end - time.monotonic()) / (len(operations) - i)   # unused time carries over
            counts[label] = 0

            @given(case=op.as_strategy())
            @hsettings(max_examples=max(10, int(SECONDS * 8)), deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
            def run(case):
                if time.monotonic() > deadline:
                    return
                counts[label] += 1
                headers = {"X-API-Key": role_keys["admin"], **(case.headers or {})}
                response = case.call(headers=headers)
                if response.status_code == 503 and response.headers.get("retry-after"):
                    return
                assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - AssertionError, or hypothesis' Flaky group around one
                found = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
                failures.extend(str(e).splitlines()[0] for e in found)
        print(f"\nfuzzed {sum(counts.values())} cases over {len(operations)} operations in {SECONDS:g} s: {counts}")
        assert not failures, failures
