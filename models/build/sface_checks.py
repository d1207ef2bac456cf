"""Checks behind `models/build/export_sface.py`: the two weight forms timed in turns, real LFW
faces for the parity check, and parity of our tower graph against cv2.FaceRecognizerSF."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.build.export_towers import INPUT_NAME, OUTPUT_NAME

REPO = Path(__file__).resolve().parents[2] / "models" / "repository"
SIZE = 112

# OpenCV's FaceRecognizerSF alignCrop destination points (modules/objdetect/src/face_recognize.cpp,
# getSimilarityTransformMatrix), 112x112 chip pixels, in MTCNN order (image-left eye, image-right
# eye, nose, image-left mouth corner, image-right mouth corner); the ArcFace/insightface template.
SFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float32)



def session(model, threads: int = 1, fold_dequantize: bool = False):
    """A CPU session (the service's own factory) of a graph: an ONNX ModelProto, bytes or a path."""
    from service.runtime import make_session

    data = model if isinstance(model, (bytes, str, Path)) else model.SerializeToString()
    return make_session(data, threads=threads, fold_dequantize=fold_dequantize)


def time_graphs(models: dict, batches=(1, 8), repeats: int = 30) -> dict:
    """Median ms per call of each graph, 1 thread, NHWC float input; the graphs take turns
    call by call so that load from other processes hits them alike. A key ending in
    `_folded_at_load` runs its graph with `fold_dequantize` (service.runtime.make_session)."""
    sessions = {k: session(m, fold_dequantize=k.endswith("_folded_at_load")) for k, m in models.items()}
    out = {}
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, SIZE, SIZE, 3)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {INPUT_NAME: x})
        for _ in range(repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {INPUT_NAME: x})
                times[k].append((time.perf_counter() - t0) * 1e3)
        out.update({f"{k}_batch{b}": round(float(np.median(t)), 2) for k, t in times.items()})
    return out


def lfw_faces(data_dir: Path, n: int = 8) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(relpath, RGB image, MTCNN landmarks (5, 2)): the first image of every 97th LFW person
    (sorted names) in which our MTCNN finds a face, `n` of them."""
    from PIL import Image

    from service.face.detect import FaceDetector, select_face

    det = FaceDetector.from_dir(REPO / "mtcnn" / "1", threads=1, max_side=1280, min_side=160)
    people = sorted(p for p in (data_dir / "lfw" / "images").iterdir() if p.is_dir())
    out = []
    for person in people[::97]:
        rel = f"{person.name}/{person.name}_0001.jpg"
        with Image.open(data_dir / "lfw" / "images" / rel) as im:
            img = np.asarray(im.convert("RGB"))
        faces = det.detect(img)
        if faces:
            out.append((rel, img, select_face(faces, img.shape).landmarks))
        if len(out) >= n:
            break
    return out


def face_row(landmarks: np.ndarray) -> np.ndarray:
    """A YuNet-format face row (x, y, w, h, 5 landmark pairs, score) for FaceRecognizerSF.alignCrop."""
    lm = np.asarray(landmarks, np.float32)
    x0, y0 = lm.min(axis=0)
    x1, y1 = lm.max(axis=0)
    return np.concatenate([[x0, y0, x1 - x0, y1 - y0], lm.ravel(), [1.0]]).astype(np.float32)[None]


def parity(tower_bytes: bytes, reference_path: Path, faces, fold_dequantize: bool = False) -> dict:
    """onnxruntime (tower, RGB NHWC chips from service.align; with `fold_dequantize` as the
    service opens it) vs cv2.FaceRecognizerSF.feature (reference graph, the same chips as BGR)
    and our crops vs alignCrop's."""
    import cv2

    from service.face.align import align

    rec = cv2.FaceRecognizerSF.create(str(reference_path), "")
    sess = session(tower_bytes, fold_dequantize=fold_dequantize)
    chips = np.stack([align(img, lm, SFACE_TEMPLATE, SIZE) for _, img, lm in faces])
    chips = np.concatenate([chips, chips[:, :, ::-1]])          # and mirrored
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: chips.astype(np.float32)})[0]
    want = np.concatenate([rec.feature(np.ascontiguousarray(c[:, :, ::-1])) for c in chips])
    crop_diff = []
    for _, img, lm in faces:
        theirs = rec.alignCrop(np.ascontiguousarray(img[:, :, ::-1]), face_row(lm))[:, :, ::-1]
        ours = align(img, lm, SFACE_TEMPLATE, SIZE)
        crop_diff.append(float(np.abs(theirs.astype(np.int16) - ours.astype(np.int16)).mean()))
    cos = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return {"images": [r for r, _, _ in faces], "crops": len(chips),
            "max_abs_diff": float(np.abs(got - want).max()),
            "min_cosine": float(cos.min()),
            "embedding_abs_max": float(np.abs(want).max()),
            "align_vs_alignCrop_mean_abs_px": float(np.mean(crop_diff))}
