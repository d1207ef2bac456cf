"""The HTTP service: `create_app(settings=None)` and `idverify serve`.

The lifespan loads the models once (service.face.loader.load_models) (refusing to start if the models fail their manifest
check), warms it, checks that the database schema is at the latest migration, and creates the
bootstrap admin key when IDV_BOOTSTRAP_ADMIN_KEY is set.
"""
from __future__ import annotations

import inspect
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import logsafe, threads
from service.api import openapi
from service.api.deadline import Unanswered
from service.records import keys
from service.records.engine import OUTAGE_ERRORS, make_engine, schema_is_current
from service.errors import INVALID_REQUEST, MISSING_FIELD, ApiError, database_unavailable
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import AccessLog, BodyDeadline, CatchAll, SecurityHeaders
from service.proxies import ClientAddress, TrustedProxies
from service.ratelimit import FailureThrottle, RateLimiter, make_store
from service.settings import Settings, get_settings

log = logging.getLogger("idverify.app")
ANYIO_THREADS = 40   # anyio's default worker threads (IDV_THREADPOOL_SIZE=0)


def load_models(settings: Settings):
    """The served models, loaded and warmed."""
    from service.face.loader import load_models as load

    models = load(settings)
    models.warmup()
    return models


def create_app(settings: Settings | None = None, models=None) -> FastAPI:
    """`models`: already loaded (and warmed) models (service.face.loader.Models) to use instead
    of loading them at start-up, e.g. one set shared by many apps in the tests."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not await run_in_threadpool(schema_is_current, engine):
            raise RuntimeError("the database schema is not at the latest migration: run `idverify migrate`")
        if await run_in_threadpool(keys.ensure_bootstrap_admin, engine, settings.bootstrap_admin_key,
                                   settings.key_pepper):
            log.info("created the bootstrap admin key")
        if not settings.key_pepper:
            log.warning("IDV_KEY_PEPPER is not set: API keys are hashed without a server-side secret")
        log.info("threads: %s", {**threads.configure_process(settings), **threads.configure_event_loop(settings)})
        if app.state.models is None:
            app.state.models = await run_in_threadpool(load_models, settings)
        app.state.metrics.set_models(app.state.models)
        try:
            yield
        finally:
            # calls answered at their deadline still write their records, if the database lets them
            await app.state.unanswered.drain(timeout=max(1.0, settings.db_lock_timeout_seconds))
            engine.dispose()

    app = FastAPI(title="idverify", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,  # openapi.install
                  description="Identity verification: ID-chip photo vs live photo, with an audit trail.")
    app.state.settings = settings
    from service import console
    from service.records import retention

    app.state.image_cipher = retention.cipher_for(settings)  # refuses to start: retention on without a usable key
    from service.face.policy import Policy

    app.state.policy = Policy.from_settings(settings)   # refuses to start: PolicyConfigError names the variable
    log.info("decision policy: %s", app.state.policy.describe())
    app.state.engine = engine
    app.state.models = models
    store = make_store(settings.rate_limit_store)   # in-process, or shared by every worker and replica
    app.state.limiter = RateLimiter(settings.rate_limit_per_minute, store)
    app.state.auth_throttle = FailureThrottle(settings.auth_failures_per_minute, store)
    app.state.metrics = Metrics()
    # /verify calls answered at their deadline whose work still runs (at most one per worker thread)
    app.state.unanswered = Unanswered(settings.threadpool_size or ANYIO_THREADS)
    app.add_middleware(BodyDeadline, seconds=settings.body_timeout_seconds)
    app.add_middleware(CatchAll)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(AccessLog)   # one line per request, whatever answered it (with the client's address as
    # ClientAddress, outside it, has set it)
    app.add_middleware(ClientAddress, proxies=TrustedProxies(settings.trusted_proxies))   # outermost
    _error_handlers(app)

    from service.api import admin, audit, health, verify

    for module in (verify, audit, admin, health):
        app.include_router(module.router)
    openapi.install(app)
    console.install(app)
    return app


def _error_response(code: str, message: str, field: str | None, status: int, headers=None) -> JSONResponse:
    return JSONResponse(ApiError(code, message, field).to_dict(), status_code=status, headers=headers)


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": {"code", "message", "field"}}."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.code, exc.message, exc.field, exc.status, exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        code = MISSING_FIELD if first.get("type") == "missing" else INVALID_REQUEST
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
        return _error_response(code, message, field, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        code = code or (INVALID_REQUEST if exc.status_code < 500 else "internal_error")
        return _error_response(code, str(exc.detail), None, exc.status_code, getattr(exc, "headers", None))

    async def database_outage(request: Request, exc: Exception) -> JSONResponse:
        """The database is unreachable (down, restarting, refusing connections, locked): 503
        with Retry-After, never a bare 500 or a dropped connection. The pool reconnects by itself."""
        err = database_unavailable()
        request_id = str(uuid.uuid4())
        cause = logsafe.printable(str(exc).splitlines()[0]) if str(exc) else exc.__class__.__name__
        log.warning("database unavailable on %s %s (request %s): %s", request.method,
                    logsafe.printable(request.url.path), request_id, cause)
        return _error_response(err.code, err.message, None, err.status, {**err.headers, "X-Request-ID": request_id})

    for cls in OUTAGE_ERRORS:
        app.add_exception_handler(cls, database_outage)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, logsafe.printable(request.url.path), exc_info=exc)
        return _error_response("internal_error", "internal error", None, 500)


# --- command line ---------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API on IDV_HOST:IDV_PORT")
    p.add_argument("--host", help="default: IDV_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: IDV_PORT (8000)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import uvicorn

    from service import config_check, logs
    from service.server import uvicorn_config

    # before anything: a refused setting, an unusable database or model ends here, in one line each
    settings = config_check.checked_settings(database=True)
    logs.configure(settings)
    threads.configure_process(settings)
    models, problems = config_check.load_models(settings)
    if problems:
        config_check.refuse(problems)
    n = threads.workers(settings)   # several: each worker process builds its own app (and models)
    log.info("serving with %s", threads.describe(settings))
    host, port = args.host or settings.host, args.port or settings.port
    common = dict(host=host, port=port, log_level="info", log_config=logs.logging_config(settings),
                  timeout_graceful_shutdown=10)
    if n == 1:
        models.warmup()
        uvicorn.Server(uvicorn_config(create_app(settings, models=models), settings, **common)).run()
        return 0
    del models   # checked; each worker loads its own
    from uvicorn.supervisors import Multiprocess
    config = uvicorn_config("service.app:create_app", settings, factory=True, workers=n, **common)
    sockets = [config.bind_socket()]
    if "target" in inspect.signature(Multiprocess.__init__).parameters:   # uvicorn 0.30-0.36 at least
        Multiprocess(config, target=uvicorn.Server(config).run, sockets=sockets).run()
    else:   # each worker process builds its own Server from the config
        Multiprocess(config, sockets=sockets).run()
    return 0
