"""The face pipeline behind /verify, eval and bench: decode -> detect -> align -> embed, then
compare. Loaded once per process (service/face/loader.py); holds no per-request state and no
decision threshold (that is service/face/decide.py's)."""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field as dc_field

import numpy as np

from service.errors import FACE_TOO_SMALL, NO_FACE, ApiError
from service.face import quality
from service.face.align import align
from service.face.artifacts import Towers
from service.face.decode import decode_image
from service.face.detect import Face, FaceDetector, select_face
from service.face.embed import Tower
from service.face.score import similarity
from service.settings import Settings

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
    """What the pipeline saw of one photo; filled stage by stage, so a failure leaves what was
    seen before it."""
    field: str
    sha256: str
    faces_seen: int | None = None  # None: detection never ran on it
    face: Face | None = None
    face_px: float = 0.0
    quality: dict = dc_field(default_factory=dict)
    embedding: np.ndarray | None = None

    @classmethod
    def of(cls, field: str, data: bytes) -> "Side":
        """What is known of an image before any analysis: its SHA-256."""
        return cls(field=field, sha256=hashlib.sha256(data).hexdigest())

    @property
    def box(self) -> list[float] | None:
        """The face box as answered and audited: [x1, y1, x2, y2], 0.1 px."""
        return [round(float(v), 1) for v in self.face.box] if self.face else None

    def to_public(self) -> dict:
        f = self.face
        return {
            "box": self.box,
            "landmarks": np.round(f.landmarks.astype(np.float64), 1).tolist() if f else None,
            "detection_score": round(float(f.score), 4) if f else None,
            "face_px": round(self.face_px, 1),
            "faces_seen": self.faces_seen,
            "quality": self.quality,
        }


class Pipeline:
    def __init__(self, settings: Settings, detector: FaceDetector, towers: Towers):
        self.settings = settings
        self.detector = detector
        self.towers = towers
        tpl = towers.manifest["template"]
        self.template = np.asarray(tpl["points"], dtype=np.float32)
        self.chip_size = int(tpl["size"])
        self.model_version = towers.version
        self.detector_version = f"{detector.manifest.get('name', 'mtcnn')}:{detector.manifest.get('version', '?')}"
        self.providers = list(towers.id.session.get_providers())
        self.warm = False

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

    def analyse(self, data: bytes, field: str, timings: dict[str, float], side: Side | None = None) -> Side:
        """One image, one side: decode, detect, align, embed, filling `side` (a new one if not
        given). Raises ApiError on input the caller can fix; `side` then holds what was seen."""
        side, chip = self.prepare(data, field, timings, side)
        with timed(timings, "embed"):
            side.embedding = self.tower(field).embed(chip)[0]
        return side

    def prepare(self, data: bytes, field: str, timings: dict[str, float],
                side: Side | None = None) -> tuple[Side, np.ndarray]:
        """decode -> detect -> select -> size check -> align: the Side so far and the aligned
        chip, ready for the tower (evaluation batches many chips through it)."""
        side = side if side is not None else Side.of(field, data)
        with timed(timings, "decode"):
            image = decode_image(data, field, self.settings)
        with timed(timings, "detect"):
            faces = self.detector.detect(image)
        side.faces_seen = len(faces)
        if not faces:
            raise ApiError(NO_FACE, "no face was found in the image", field, status=422)
        face = select_face(faces, image.shape)
        side.face = face
        side.face_px = float(face.box[2] - face.box[0])
        if side.face_px < self.settings.min_face_px:
            raise ApiError(FACE_TOO_SMALL, f"the face is {side.face_px:.0f} px wide; at least "
                           f"{self.settings.min_face_px} px are needed", field, status=422)
        with timed(timings, "align"):
            chip = align(image, face.landmarks, self.template, self.chip_size)
        rules = ({"small_face_px": self.settings.chip_small_face_px, "blur_min": self.settings.chip_blur_min}
                 if SIDES[field] == "id" else {})
        side.quality = quality.assess(chip, face.landmarks, side.face_px, side.faces_seen, **rules)
        return side, chip

    def compare(self, id_side: Side, live_side: Side) -> float:
        return similarity(id_side.embedding, live_side.embedding)
