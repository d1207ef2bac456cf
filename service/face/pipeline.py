"""The face pipeline behind /verify, eval and bench: decode -> detect -> align -> embed, then
score and decide. Loaded once per process; holds no per-request state."""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field as dc_field

import numpy as np

from service.face import quality
from service.face.align import align
from service.face.artifacts import Towers, load_towers, resolve_version
from service.face.decide import Threshold
from service.face.decode import decode_image
from service.face.detect import Face, FaceDetector, select_face
from service.face.embed import Tower
from service.errors import FACE_TOO_SMALL, NO_FACE, ApiError
from service.runtime import choose_providers
from service.face.score import similarity
from service.settings import Settings

log = logging.getLogger("idverify.pipeline")

SIDES = {"id_photo": "id", "live_photo": "live"}


@contextmanager
def timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0


@dataclass
class Side:
    sha256: str
    faces_seen: int | None = None  # None: detection never ran on it
    face: Face | None = None
    face_px: float = 0.0
    quality: dict = dc_field(default_factory=dict)
    embedding: np.ndarray | None = None

    @classmethod
    def of(cls, data: bytes) -> "Side":
        """What is known of an image before any analysis: its SHA-256."""
        return cls(sha256=hashlib.sha256(data).hexdigest())

    def to_public(self) -> dict:
        f = self.face
        return {
            "box": [round(float(v), 1) for v in f.box] if f else None,
            "landmarks": np.round(f.landmarks.astype(np.float64), 1).tolist() if f else None,
            "detection_score": round(float(f.score), 4) if f else None,
            "face_px": round(self.face_px, 1),
            "faces_seen": self.faces_seen,
            "quality": self.quality,
        }


class Pipeline:
    def __init__(self, settings: Settings, detector: FaceDetector, towers: Towers, threshold: Threshold):
        self.settings = settings
        self.detector = detector
        self.towers = towers
        self.threshold = threshold
        tpl = towers.manifest["template"]
        self.template = np.asarray(tpl["points"], dtype=np.float32)
        self.chip_size = int(tpl["size"])
        self.model_version = towers.version
        self.warm = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "Pipeline":
        providers = choose_providers(settings.providers)
        detector_dir = resolve_version(settings.models_dir, "mtcnn", "1")
        detector = FaceDetector.from_dir(detector_dir, providers=providers, threads=settings.onnx_threads,
                                         max_side=settings.detect_max_side, min_side=settings.detect_min_side)
        towers = load_towers(settings.models_dir, settings.towers, settings.tower_version, providers, settings.onnx_threads)
        threshold = Threshold.from_calibration(towers.calibration, score=settings.threshold, far_target=settings.far_target)
        log.info("loaded %s on %s; threshold %.4f (FAR %s)", towers.version, providers[0], threshold.score, threshold.far)
        return cls(settings, detector, towers, threshold)

    def tower(self, field: str) -> Tower:
        return self.towers.id if SIDES[field] == "id" else self.towers.live

    def warmup(self) -> None:
        """One pass over a synthetic frame so the first request does not pay for lazy init."""
        frame = np.full((480, 640, 3), 128, np.uint8)
        self.detector.detect(frame)
        chip = np.zeros((1, self.chip_size, self.chip_size, 3), np.uint8)
        self.towers.id.embed(chip)
        self.towers.live.embed(chip)
        self.warm = True

    def analyse(self, data: bytes, field: str, timings: dict[str, float]) -> Side:
        """One image, one side: decode, detect, align, embed. Raises ApiError on input the
        caller can fix; the error carries what was seen so far (`.side`) for the audit trail."""
        side, chip = self.prepare(data, field, timings)
        with timed(timings, "embed"):
            side.embedding = self.tower(field).embed(chip)[0]
        return side

    def prepare(self, data: bytes, field: str, timings: dict[str, float]) -> tuple[Side, np.ndarray]:
        """decode -> detect -> select -> size check -> align: the Side so far and the aligned
        chip, ready for the tower (evaluation batches many chips through it)."""
        side = Side.of(data)
        with timed(timings, "decode"):
            try:
                image = decode_image(data, field, self.settings)
            except ApiError as exc:
                raise exc.with_side(side)
        with timed(timings, "detect"):
            faces = self.detector.detect(image)
        side.faces_seen = len(faces)
        if not faces:
            raise ApiError(NO_FACE, "no face was found in the image", field, status=422).with_side(side)
        face = select_face(faces, image.shape)
        side.face = face
        side.face_px = float(face.box[2] - face.box[0])
        if side.face_px < self.settings.min_face_px:
            raise ApiError(FACE_TOO_SMALL, f"the face is {side.face_px:.0f} px wide; at least "
                           f"{self.settings.min_face_px} px are needed", field, status=422).with_side(side)
        with timed(timings, "align"):
            chip = align(image, face.landmarks, self.template, self.chip_size)
        side.quality = quality.assess(chip, face.landmarks, side.face_px, side.faces_seen)
        return side, chip

    def compare(self, id_side: Side, live_side: Side) -> float:
        return similarity(id_side.embedding, live_side.embedding)
