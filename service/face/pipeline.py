"""The face pipeline behind /verify, eval and bench: decode -> detect -> align -> embed, then
compare. Loaded once per process (service/face/loader.py); holds no per-request state and no
decision threshold (that is service/face/decide.py's).

One or more tower families (`families`: repository name -> Towers; the first is the primary
one, `towers`) share one detection; each aligns the face to its own template and size and
embeds it. A family whose manifest asks for a wider face (`template.min_face_px`) than the
face found leaves that family's embedding None (`Side.family_rejects` says why); only when no
family can take the face is it `face_too_small`. With a fusion (`fusion`), `scores` gives every
family's score and the fusion turns them into one (service/face/fusion.py)."""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager, nullcontext
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
    faces: list[Face] = dc_field(default_factory=list, repr=False)  # every face detected (the policy's input)
    face_px: float = 0.0
    quality: dict = dc_field(default_factory=dict)
    embedding: np.ndarray | None = None          # the primary family's
    embeddings: dict[str, np.ndarray | None] = dc_field(default_factory=dict)  # family -> embedding
    family_rejects: dict[str, str] = dc_field(default_factory=dict)          # family -> why it has none

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
    def __init__(self, settings: Settings, detector: FaceDetector, towers: Towers,
                 extra: dict[str, Towers] | None = None, fusion=None):
        self.settings = settings
        self.detector = detector
        self.towers = towers
        tpl = towers.manifest["template"]
        self.template = np.asarray(tpl["points"], dtype=np.float32)
        self.chip_size = int(tpl["size"])
        self.families: dict[str, Towers] = {towers.manifest["name"]: towers, **(extra or {})}
        self.primary = towers.manifest["name"]
        self.fusion = fusion   # service.face.fusion.Fusion, or None: the primary family's score decides
        self.model_version = towers.version if fusion is None else (
            f"{fusion.version}({','.join(t.version for t in self.families.values())})")
        self.detector_version = f"{detector.manifest.get('name', 'mtcnn')}:{detector.manifest.get('version', '?')}"
        self.providers = list(towers.id.session.get_providers())
        self.warm = False

    def tower(self, field: str, family: str | None = None) -> Tower:
        towers = self.families[family or self.primary]
        return towers.id if SIDES[field] == "id" else towers.live

    def min_face_px(self, family: str) -> float:
        """The narrowest face `family` takes: IDV_MIN_FACE_PX, or its manifest's, if wider."""
        own = self.families[family].manifest["template"].get("min_face_px") or 0
        return max(float(self.settings.min_face_px), float(own))

    def warmup(self) -> None:
        """One pass over a synthetic frame so the first request does not pay for lazy init."""
        frame = np.full((480, 640, 3), 128, np.uint8)
        self.detector.detect(frame)
        for towers in self.families.values():
            size = int(towers.manifest["template"]["size"])
            chip = np.zeros((1, size, size, 3), np.uint8)
            towers.id.embed(chip)
            towers.live.embed(chip)
        self.warm = True

    def analyse(self, data: bytes, field: str, timings: dict[str, float], side: Side | None = None) -> Side:
        """One image, one side: decode, detect, align, embed, filling `side` (a new one if not
        given). Raises ApiError on input the caller can fix; `side` then holds what was seen."""
        side, chips = self.prepare_families(data, field, timings, side)
        for family, chip in chips.items():
            with timed(timings, "embed"), self._timed_family(timings, "embed", family):
                e = None if chip is None else self.tower(field, family).embed(chip)[0]
            if e is not None and not np.all(np.isfinite(e)):
                e, side.family_rejects[family] = None, "embedding_not_finite"
            side.embeddings[family] = e
        side.embedding = side.embeddings.get(self.primary)
        return side

    def prepare(self, data: bytes, field: str, timings: dict[str, float],
                side: Side | None = None) -> tuple[Side, np.ndarray]:
        """decode -> detect -> select -> size check -> align: the Side so far and the primary
        family's aligned chip, ready for its tower (evaluation batches many chips through it)."""
        side, chips = self.prepare_families(data, field, timings, side)
        if chips[self.primary] is None:
            raise ApiError(FACE_TOO_SMALL, f"the face is {side.face_px:.0f} px wide; at least "
                           f"{self.min_face_px(self.primary):.0f} px are needed", field, status=422)
        return side, chips[self.primary]

    def _timed_family(self, timings: dict[str, float], stage: str, family: str):
        """Per-family stage time (`align:sface`) beside the stage total, when there are several."""
        return timed(timings, f"{stage}:{family}") if len(self.families) > 1 else nullcontext()

    def prepare_families(self, data: bytes, field: str, timings: dict[str, float],
                         side: Side | None = None) -> tuple[Side, dict[str, np.ndarray | None]]:
        """decode -> detect -> select -> size check -> align for every family: the Side so far
        and family -> aligned chip (None where the face is narrower than the family takes)."""
        side = side if side is not None else Side.of(field, data)
        with timed(timings, "decode"):
            image = decode_image(data, field, self.settings)
        with timed(timings, "detect"):
            faces = self.detector.detect(image)
        side.faces, side.faces_seen = faces, len(faces)
        if not faces:
            raise ApiError(NO_FACE, "no face was found in the image", field, status=422)
        face = select_face(faces, image.shape)
        side.face = face
        side.face_px = float(face.box[2] - face.box[0])
        need = min(self.min_face_px(f) for f in self.families)
        if side.face_px < need:
            raise ApiError(FACE_TOO_SMALL, f"the face is {side.face_px:.0f} px wide; at least "
                           f"{need:.0f} px are needed", field, status=422)
        chips: dict[str, np.ndarray | None] = {}
        for family, towers in self.families.items():
            if side.face_px < self.min_face_px(family):
                chips[family], side.family_rejects[family] = None, "face_too_small"
                continue
            tpl = towers.manifest["template"]
            points = self.template if family == self.primary else np.asarray(tpl["points"], np.float32)
            with timed(timings, "align"), self._timed_family(timings, "align", family):
                chips[family] = align(image, face.landmarks, points, int(tpl["size"]))
        first = next(c for c in chips.values() if c is not None)
        rules = ({"small_face_px": self.settings.chip_small_face_px, "blur_min": self.settings.chip_blur_min}
                 if SIDES[field] == "id" else {})
        side.quality = quality.assess(chips[self.primary] if chips[self.primary] is not None else first,
                                      face.landmarks, side.face_px, side.faces_seen, **rules)
        return side, chips

    def compare(self, id_side: Side, live_side: Side) -> float:
        return similarity(id_side.embedding, live_side.embedding)

    def scores(self, id_side: Side, live_side: Side) -> dict[str, float | None]:
        """Every family's score of the pair (None where a side has no embedding of that family)."""
        out: dict[str, float | None] = {}
        for family in self.families:
            a, b = id_side.embeddings.get(family), live_side.embeddings.get(family)
            out[family] = similarity(a, b) if a is not None and b is not None else None
        return out
