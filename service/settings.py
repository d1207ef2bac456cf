"""All configuration in one typed object, read from IDV_* environment variables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IDV_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # SQLite under ./var/ is the embedded default; PostgreSQL in production.
    database_url: str = f"sqlite:///{ROOT / 'var' / 'idverify.db'}"
    bootstrap_admin_key: str | None = None

    models_dir: Path = ROOT / "models" / "repository"
    detector_version: str = "1"     # version folder of models/repository/mtcnn/ ("current" = its CURRENT file)
    towers: str = "towers"          # model name in the repository
    tower_version: str = "current"  # version folder, or "current" = the one named in models/repository/towers/CURRENT
    scoring: str = "towers"         # towers | sface | fused: which family's score decides, or the fusion of both
    sface_version: str = "1"        # version folder of models/repository/sface/ (scoring sface or fused)
    fusion_version: str = "current" # version folder of models/repository/fusion/ (scoring fused; "current" = its CURRENT)
    onnx_threads: int = 0           # 0 = onnxruntime's default
    providers: str = "auto"         # auto | cpu | cuda

    # decision: either a fixed score threshold, or a target FAR looked up in the calibration table
    threshold: float | None = None
    far_target: float = 1e-3

    # input limits, checked before full decoding
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_request_bytes: int = 25 * 1024 * 1024
    min_face_px: int = 32
    detect_max_side: int = 800      # big frames are detected on a copy downscaled to this
    detect_min_side: int = 240      # small images (chip photos) are upsampled to this before detection

    rate_limit_per_minute: int = 0  # per key, 0 = off

    retain_images: bool = False
    retention_days: int = 30        # `idverify audit purge` deletes retained images older than this
    image_key: str | None = None    # urlsafe-base64 32-byte key (AES-256-GCM) for retained images

    # operator console (/console)
    console_session_minutes: int = 30   # idle timeout of a console session (absolute cap: 12 h)
    console_secure_cookie: str = "auto" # auto (Secure when the request came over https) | true | false

    data_dir: Path = ROOT.parent / "shared" / "data"


@lru_cache
def get_settings() -> Settings:
    return Settings()
