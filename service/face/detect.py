"""Face detection with five landmarks: the MTCNN cascade (P-Net -> R-Net -> O-Net) on ONNX Runtime.

The three graphs come from models/build/export_mtcnn.py (weights from the facenet-pytorch wheel,
MIT). Each takes `image` float32 NHWC RGB in 0..255 and normalises inside the graph. The cascade
itself (pyramid, box generation, NMS, box regression, squaring, crops) is here in numpy/OpenCV.

Coordinates, all in pixels of the image passed to `detect`:

* `Face.box` = (x1, y1, x2, y2) in *edge* coordinates: pixel column i spans [i, i+1), so the
  box width is x2 - x1. Boxes are not clipped to the image: a face cut by the frame edge keeps
  its full estimated extent.
* `Face.landmarks` (5, 2) (x, y) in *pixel-index* coordinates (the centre of pixel i is at i),
  the convention of the MTCNN training labels and of cv2.warpAffine / the alignment templates.
  Order as MTCNN gives them: left eye, right eye, nose, left mouth corner, right mouth corner,
  where "left" is the subject's right, i.e. the one with the smaller x in an upright face.

Before the cascade the image is rescaled so that its longer side is at most `max_side` (big
frames) or its shorter side at least `min_side` (small chip photos, whose faces would otherwise
be near P-Net's 12 px window); results are mapped back to the caller's image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from service.face.artifacts import ArtifactError, load_manifest, verify_file
from service.runtime import make_session

MANIFEST = "manifest.json"
ROLES = ("pnet", "rnet", "onet")


class DetectorArtifactError(ArtifactError):
    """The detector's model folder is missing a file or a file does not match its manifest."""


@dataclass(eq=False)  # identity semantics: landmarks is an array
class Face:
    box: tuple[float, float, float, float]
    landmarks: np.ndarray = field(repr=False)
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0


# ------------------------------------------------------------------------------------ box utils

def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first. `mode` "union" = IoU,
    "min" = intersection over the smaller box (MTCNN's last stage)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        if mode == "min":
            denom = np.minimum(area[i], area[rest])
        else:
            denom = area[i] + area[rest] - inter
        overlap = inter / np.maximum(denom, 1e-9)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.intp)


def regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply MTCNN offsets (dx1, dy1, dx2, dy2), fractions of the box width/height."""
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes[:, :4] + reg * np.concatenate([w, h, w, h], axis=1)


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (side = the longer side)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    cx = boxes[:, 0] + w * 0.5
    cy = boxes[:, 1] + h * 0.5
    return np.stack([cx - side * 0.5, cy - side * 0.5, cx + side * 0.5, cy + side * 0.5], axis=1)


def crop_batch(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Integer boxes (K, 4) -> (K, size, size, 3) float32 crops. Parts outside the image are
    zero (black), as in the original MTCNN, so a box keeps its geometry at the frame edge."""
    h, w = img.shape[:2]
    out = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        bw, bh = x2 - x1, y2 - y1
        if x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h:
            patch = img[y1:y2, x1:x2]
        else:
            patch = np.zeros((bh, bw, 3), dtype=img.dtype)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            if sx2 > sx1 and sy2 > sy1:
                patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
        interp = cv2.INTER_AREA if min(bw, bh) >= size else cv2.INTER_LINEAR
        out[k] = cv2.resize(patch, (size, size), interpolation=interp)
    return out


# ------------------------------------------------------------------------------------ detector


def working_scale(h: int, w: int, max_side: int, min_side: int) -> float:
    """Scale applied before detection (every detector): down so the longer side <= max_side; up
    so the shorter side >= min_side, but never so far that the longer side passes max_side."""
    long_side, short_side = max(h, w), min(h, w)
    if long_side > max_side:
        return max_side / long_side
    if short_side < min_side:
        return max(1.0, min(min_side / short_side, max_side / long_side))
    return 1.0

class FaceDetector:
    def __init__(self, pnet, rnet, onet, *, min_face_size: float = 20.0, factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 max_side: int, min_side: int, manifest: dict | None = None):
        """`max_side`/`min_side`: IDV_DETECT_MAX_SIDE / IDV_DETECT_MIN_SIDE, passed in by
        service.face.loader.load_detector (the detector reads no settings itself)."""
        self.pnet, self.rnet, self.onet = pnet, rnet, onet
        self.min_face_size = float(min_face_size)
        self.factor = float(factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = int(max_side)   # big frames: detect on a copy with this longer side
        self.min_side = int(min_side)   # small images: upsample so the shorter side is this
        self.manifest = manifest or {}

    @classmethod
    def from_dir(cls, model_dir: str | Path, providers: list[str] | None = None, threads: int = 0,
                 **kwargs) -> "FaceDetector":
        """Load pnet/rnet/onet.onnx from `model_dir` after checking each file's SHA-256 against
        manifest.json. Raises DetectorArtifactError on a missing file or a mismatch."""
        folder = Path(model_dir)
        try:
            manifest = load_manifest(folder)
            entries = {e.get("role", Path(e["file"]).stem): e for e in manifest["files"]}
        except FileNotFoundError as exc:
            raise DetectorArtifactError(f"detector manifest {folder / MANIFEST} is missing") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DetectorArtifactError(f"detector manifest {folder / MANIFEST} is malformed: {exc}") from exc
        missing = [r for r in ROLES if r not in entries]
        if missing:
            raise DetectorArtifactError(f"detector manifest {folder / MANIFEST} names no file for {missing}")
        sessions = {}
        for role in ROLES:
            try:
                path = verify_file(folder, entries[role])
            except ArtifactError as exc:
                raise DetectorArtifactError(
                    f"detector {exc}; re-export with `python -m models.build.export_mtcnn`") from exc
            # three sessions run back to back: make_session turns thread spinning off
            sessions[role] = make_session(path, providers, threads)
        defaults = dict(manifest.get("defaults") or {})
        defaults = {k: v for k, v in defaults.items() if k in ("min_face_size", "factor", "thresholds")}
        defaults.update(kwargs)
        return cls(sessions["pnet"], sessions["rnet"], sessions["onet"], manifest=manifest, **defaults)

    # -------------------------------------------------------------------------------- public

    def detect(self, img: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 (H, W, 3) image, highest score first."""
        img = self._as_rgb(img)
        h, w = img.shape[:2]
        if h == 0 or w == 0:
            return []
        s = self.working_scale(h, w)
        if s == 1.0:
            work = img
        else:
            size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
            interp = cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR
            work = cv2.resize(img, size, interpolation=interp)
        # the scale actually applied, per axis (rounding the size changes it slightly)
        sx, sy = work.shape[1] / w, work.shape[0] / h
        boxes, scores, points = self._cascade(work)
        faces = []
        for b, sc, p in zip(boxes, scores, points):
            box = (float(b[0] / sx), float(b[1] / sy), float(b[2] / sx), float(b[3] / sy))
            lm = np.empty((5, 2), dtype=np.float32)
            lm[:, 0] = (p[:, 0] + 0.5) / sx - 0.5   # pixel-index coordinates
            lm[:, 1] = (p[:, 1] + 0.5) / sy - 0.5
            faces.append(Face(box=box, landmarks=lm, score=float(sc)))
        return faces

    def working_scale(self, h: int, w: int) -> float:
        return working_scale(h, w, self.max_side, self.min_side)

    # -------------------------------------------------------------------------------- cascade

    @staticmethod
    def _as_rgb(img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.ndim == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {img.dtype}")
        return np.ascontiguousarray(img)

    def scales(self, h: int, w: int) -> list[float]:
        """Pyramid: the first level maps min_face_size to P-Net's 12 px window, then each level
        shrinks by `factor` while the shorter side still holds a 12 px window."""
        m = 12.0 / self.min_face_size
        short = min(h, w) * m
        out = []
        while short >= 12.0:
            out.append(m * self.factor ** len(out))
            short *= self.factor
        return out

    def _stage1(self, img: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid -> candidate boxes (K, 9): x1 y1 x2 y2 score dx1 dy1 dx2 dy2."""
        h, w = img.shape[:2]
        thr = self.thresholds[0]
        found = []
        for scale in self.scales(h, w):
            hs, ws = int(math.ceil(h * scale)), int(math.ceil(w * scale))
            if hs < 12 or ws < 12:
                break
            level = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
            prob, reg = self.pnet.run(None, {"image": level[None].astype(np.float32)})
            prob, reg = prob[0], reg[0]
            ys, xs = np.nonzero(prob >= thr)
            if ys.size == 0:
                continue
            kx, ky = ws / w, hs / h  # this level's true scale per axis
            x = xs.astype(np.float32) * 2.0
            y = ys.astype(np.float32) * 2.0
            cand = np.empty((ys.size, 9), dtype=np.float32)
            cand[:, 0] = x / kx
            cand[:, 1] = y / ky
            cand[:, 2] = (x + 12.0) / kx
            cand[:, 3] = (y + 12.0) / ky
            cand[:, 4] = prob[ys, xs]
            cand[:, 5:9] = reg[ys, xs]
            keep = nms(cand[:, :4], cand[:, 4], 0.5)
            found.append(cand[keep])
        if not found:
            return np.zeros((0, 9), dtype=np.float32)
        cand = np.concatenate(found)
        return cand[nms(cand[:, :4], cand[:, 4], 0.7)]

    def _cascade(self, img: np.ndarray):
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
        cand = self._stage1(img)
        if len(cand) == 0:
            return empty
        boxes = np.round(square(regress(cand[:, :4], cand[:, 5:9]))).astype(np.int64)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if len(boxes) == 0:
            return empty

        # R-Net: refine and reject
        prob, reg = self.rnet.run(None, {"image": crop_batch(img, boxes, 24)})
        ok = prob >= self.thresholds[1]
        if not ok.any():
            return empty
        boxes_f, prob, reg = boxes[ok].astype(np.float32), prob[ok], reg[ok]
        keep = nms(boxes_f, prob, 0.7)
        boxes = np.round(square(regress(boxes_f[keep], reg[keep]))).astype(np.int64)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if len(boxes) == 0:
            return empty

        # O-Net: score, final box, landmarks (relative to the crop O-Net saw)
        prob, reg, lm = self.onet.run(None, {"image": crop_batch(img, boxes, 48)})
        ok = prob >= self.thresholds[2]
        if not ok.any():
            return empty
        boxes_f, prob, reg, lm = boxes[ok].astype(np.float32), prob[ok], reg[ok], lm[ok]
        bw = (boxes_f[:, 2] - boxes_f[:, 0])[:, None]
        bh = (boxes_f[:, 3] - boxes_f[:, 1])[:, None]
        points = np.stack([boxes_f[:, 0:1] + lm[:, 0:5] * bw, boxes_f[:, 1:2] + lm[:, 5:10] * bh], axis=2)
        final = regress(boxes_f, reg)
        keep = nms(final, prob, 0.7, mode="min")
        return final[keep], prob[keep], points[keep]


# ------------------------------------------------------------------------------------ selection

def select_face(faces: list[Face], image_shape: tuple[int, ...]) -> Face:
    """The subject's face: the largest, most central one.

    Each face is ranked by visible area * exp(-4 d^2): the visible area is the box clipped to
    the image, d the distance from the box centre to the image centre divided by half the image
    diagonal (0 at the centre, 1 at a corner). A face halfway to a corner counts 0.37 of its
    area, one at the middle of a side of a 4:3 frame ~0.08, so a bystander half-way out must be
    ~1.6x wider than a central face to be chosen. Ties go to the higher score.
    Raises ValueError on an empty list (the caller reports no_face first).
    """
    if not faces:
        raise ValueError("select_face needs at least one face")
    h, w = image_shape[:2]
    cx, cy = w / 2.0, h / 2.0
    half_diag = max(math.hypot(w, h) / 2.0, 1e-9)

    def key(f: Face):
        x1, y1, x2, y2 = f.box
        visible = max(0.0, min(x2, w) - max(x1, 0.0)) * max(0.0, min(y2, h) - max(y1, 0.0))
        fx, fy = f.centre
        d = math.hypot(fx - cx, fy - cy) / half_diag
        return visible * math.exp(-4.0 * d * d), f.score

    return max(faces, key=key)
