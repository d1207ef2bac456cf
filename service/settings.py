"""All configuration in one typed object, read from IDV_* environment variables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "IDV_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # SQLite under ./var/ is the embedded default; PostgreSQL in production.
    database_url: str = f"sqlite:///{ROOT / 'var' / 'idverify.db'}"
    bootstrap_admin_key: str | None = None   # at least 32 characters
    key_pepper: str | None = None   # server-side secret: API keys are stored as HMAC(pepper, SHA-256(key))
    auth_failures_per_minute: int = Field(30, ge=0)  # wrong keys / sign-ins per client address and per key prefix, then 429

    models_dir: Path = ROOT / "models" / "repository"
    detector: Literal["yunet", "mtcnn"] = "yunet"  # yunet | mtcnn: the detector's model name in the repository (docs/benchmarks.md)
    detector_version: str = "1"     # version folder of models/repository/<detector>/ ("current" = its CURRENT file)
    towers: str = "towers"          # model name in the repository
    tower_version: str = "current"  # version folder, or "current" = the one named in models/repository/towers/CURRENT
    onnx_threads: int = Field(0, ge=0)  # intra-op threads per session; 0 = 1 (service/threads.py)
    # thread and worker model (docs/benchmarks.md "Threads and workers"): 0 = sized from the cores
    workers: int = Field(0, ge=0)       # uvicorn worker processes of `idverify serve` (0 = one per 2 cores)
    cv2_threads: int = Field(1, ge=-1)  # cv2.setNumThreads in the API process (1 = none; -1 = OpenCV's default)
    threadpool_size: int = Field(0, ge=0)  # anyio worker threads running the pipeline (0 = anyio's default, 40)
    # tower calls: micro-batching of concurrent requests, and where the towers run
    batch_wait_ms: float = Field(0.0, ge=0)  # 0 = off; else a tower call waits up to this for others to join
    batch_max: int = Field(16, ge=1)    # rows per batched tower call
    tower_backend: Literal["onnxruntime", "triton"] = "onnxruntime"  # onnxruntime | triton (IDV_TRITON_URL, models idverify_id/idverify_live)
    triton_url: str = "127.0.0.1:8001"  # gRPC host:port of a Triton server
    scoring: Literal["fused", "towers", "sface"] = "fused"  # the fusion of both families (at its members' versions), or one family alone
    sface_version: str = "3"        # version folder of models/repository/sface/ (scoring sface)
    fusion_version: str = "current" # version folder of models/repository/fusion/ (scoring fused; "current" = its CURRENT)
    providers: Literal["auto", "cpu", "cuda"] = "auto"  # auto | cpu | cuda

    # decision: either a fixed score threshold, or a target FAR looked up in the calibration table
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    far_target: float = Field(1e-3, gt=0.0, le=1.0)

    # input limits, checked before full decoding
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(16_000_000, ge=1)     # live photo: a 12 MP phone frame fits, 4K video is 8.3 MP
    max_id_image_pixels: int = Field(2_000_000, ge=1)   # ID-chip photo (ICAO chip images are about 0.3 MP)
    decode_target_side: int = Field(1600, ge=1) # JPEG / JPEG 2000 at least 2x larger are decoded at 1/2..1/8 scale, not below this
    max_concurrent_decodes: int = Field(2, ge=1)# decodes at once per process; others wait up to decode_wait_seconds, then 503
    decode_wait_seconds: float = Field(10.0, ge=0)
    max_request_bytes: int = Field(25 * 1024 * 1024, ge=1)
    min_face_px: int = Field(32, ge=1)
    # the id_photo's own quality rules. On simulated LFW chips (102x126, ~1 KB) the face is 48-69 px
    # wide and the sharpness 3.2-79 (median 7): the live photo's 64 px and 25 would flag nearly all
    chip_small_face_px: int = 40
    chip_blur_min: float = 4.0
    detect_max_side: int = 800      # big frames are detected on a copy downscaled to this
    detect_min_side: int = 240      # small images (chip photos) are upsampled to this before detection

    rate_limit_per_minute: int = Field(0, ge=0)  # per key, 0 = off

    # HTTP server limits (service/server.py, service/middleware.py); see docs/security.md
    header_timeout_seconds: float = Field(10.0, gt=0)  # request line + headers must arrive within this, else the connection closes
    body_timeout_seconds: float = Field(60.0, ge=0)    # the whole body within this of the request's start, else 408
    keep_alive_seconds: int = Field(5, ge=1)           # idle keep-alive connections close after this
    max_connections: int = Field(2048, ge=1)           # open connections; more are answered 503 and closed
    max_header_bytes: int = Field(16384, ge=1024)      # request line + headers
    metrics_token: str | None = None       # when set, /metrics needs "Authorization: Bearer <token>"

    retain_images: bool = False
    retention_days: int = Field(30, ge=0)  # `idverify audit purge` deletes retained images older than this
    image_key: str | None = None    # urlsafe-base64 32-byte key (AES-256-GCM) for retained images

    # operator console (/console)
    console_session_minutes: int = Field(30, ge=1)  # idle timeout of a console session (absolute cap: 12 h)
    console_secure_cookie: Literal["auto", "true", "false"] = "auto"  # auto (Secure when the request came over https) | true | false

    # decision policy (service/face/policy.py): what refuses a pair before its score decides
    live_face_dominance: float = 2.0   # several faces on the live photo: the chosen one's box area must be >= this x the next's
    refuse_quality: str = ""           # quality flags that refuse (422): comma list of flag, id_photo:flag or live_photo:flag
    require_liveness: bool = False     # /verify needs the kiosk's passing liveness (presentation-attack) result

    # replays and the same image (docs/security.md "Replays and the same image")
    replay_window_seconds: int = 24 * 3600   # a live photo (its SHA-256) decided on within this is flagged; 0 = off
    refuse_replayed_live: bool = False       # refuse a flagged live photo (409 live_photo_replayed)

    data_dir: Path = ROOT.parent / "shared" / "data"

    # logging (service/logs.py): one access line per request, text or JSON lines on stderr
    log_format: Literal["text", "json"] = "text"


    # --- bounded waits (docs/operations.md, "Bounded waits") -----------------------------------
    # /verify answers within this of its start; past it, 503 deadline_exceeded (Retry-After) and
    # the call's record, written when the database lets it, says so (never match/no_match)
    request_deadline_seconds: float = Field(20.0, gt=0)
    # PostgreSQL, set by the service on each connection (0 = the server's own setting)
    db_statement_timeout_seconds: float = 10.0
    db_lock_timeout_seconds: float = 5.0
    db_idle_in_transaction_timeout_seconds: float = 30.0
    db_connect_timeout_seconds: int = 5     # a new connection (PostgreSQL)
    db_pool_timeout_seconds: float = 5.0    # waiting for a pooled connection (PostgreSQL)
    readyz_timeout_seconds: float = 2.0     # /readyz is not ready when a database round trip takes longer

    # --- throttles shared by workers and replicas (docs/operations.md, "Throttles") --------------
    # X-Forwarded-For is used only when the peer is one of these (comma-separated addresses or
    # CIDR networks, e.g. "10.0.0.0/8,127.0.0.1"); empty = never (the default)
    trusted_proxies: str = ""
    # where the key-guessing throttle and the per-key rate limit keep their state: empty = in
    # this process; redis://host:port/db = shared by every worker and replica
    rate_limit_store: str = ""


# never printed (`idverify config` masks them) nor logged
SECRETS = ("bootstrap_admin_key", "key_pepper", "metrics_token", "image_key")


def env_name(field: str) -> str:
    """The environment variable of a setting: `far_target` -> `IDV_FAR_TARGET`."""
    return ENV_PREFIX + field.upper()


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per refused setting, named by its IDV_ variable, with the value given (secrets
    withheld) and what it should be (pydantic's message: the allowed values of a Literal, a bound)."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else "?"
        shown = "" if field in SECRETS or "input" not in err else f"={err['input']!r:.80}"
        lines.append(f"{env_name(field)}{shown}: {err['msg'][:1].lower()}{err['msg'][1:]}")
    return lines


@lru_cache
def get_settings() -> Settings:
    return Settings()
