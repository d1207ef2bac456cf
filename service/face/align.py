"""Face alignment: a similarity transform that puts 5 detector landmarks on the embedder's
template, then a bilinear warp to a square chip.

Landmark order everywhere (MTCNN's): left-eye centre, right-eye centre, nose tip, left mouth
corner, right mouth corner, with left/right in IMAGE coordinates (the subject's right eye
comes first).

The template: where dlib puts these 5 points in its 150 px face chip
---------------------------------------------------------------------
dlib's embedder was trained on chips made by ``get_face_chip_details(shape, 150, 0.25)``
(dlib/image_transforms/interpolation.h). For a 68-point shape it fits a similarity transform
from the image landmarks 17..67 (less the eyebrows 17-26 and the inner lower lip 55-59 and
65-67) to a mean face shape, ``mean_face_shape_x/y``: 51 points, landmarks 17..67, in a unit
square. Each mean point ``p`` is placed in the chip at::

    chip = (padding + p) / (1 + 2 * padding) * size          # padding 0.25, size 150

Our 5 points are derived from the same mean shape with the iBUG-68 indices: left-eye centre
= mean of 36..41, right-eye centre = mean of 42..47, nose tip = 30, mouth corners = 48 and 54
(:func:`dlib_chip_template`). With padding 0.25 and size 150 this gives
``DLIB_CHIP_TEMPLATE_DERIVED`` (x, y in chip pixels)::

    left eye  ( 47.55,  46.60)   right eye   (100.48,  46.60)   nose (74.01, 76.56)
    left mouth( 50.41, 103.02)   right mouth ( 97.61, 103.02)

dlib's real chips put the 5 points slightly elsewhere, because (a) dlib fits the chip to
many landmarks (41 of the 68-point shape, or with the 5-point predictor a separate
eye-corner/nose template), so the 5 points land where that fit puts them on each face rather
than on their mean-shape positions, and (b) ``extract_image_chip`` puts the template's
centre (75, 75) on pixel (74.5, 74.5), i.e. shifts everything half a pixel up-left, and maps
the chip rectangle (``size * s`` image pixels wide, s = image pixels per chip pixel) as
``size*s - 1`` pixels onto ``size - 1`` chip pixels, a stretch of ``(size*s - 1) / ((size-1)*s)``
about the centre, within 0.2 % of 1 on LFW (measured with coordinate-ramp images).

So the template was also fitted by least squares to dlib's own chips: on 149 LFW images
(first image of every 23rd person, sorted, starting at the first; dlib HOG detector,
upsample 1), the exact chip mapping of ``get_face_chip(img, shape5, 150, 0.25)`` (recovered
from chips of coordinate-ramp images) was applied to the 5 points derived from dlib's
68-point predictor on the same face; the least-squares template is their mean,
``DLIB_CHIP_TEMPLATE_FITTED``::

    left eye  ( 46.99,  46.36)   right eye   (100.15,  46.31)   nose (73.58, 74.79)
    left mouth( 49.84, 104.72)   right mouth ( 97.69, 104.60)

(per-point spread across faces: ~1.5 px at the eyes, ~5 px at the mouth, ~6-7 px at the
nose, i.e. pose). Held-out check on 100 other LFW images (every 23rd person from the 12th):
cosine between dlib's embedding of its own 5-point chip and dlib's embedding of our chip
(aligned from the 68-derived 5 points): derived template mean 0.9943 (min 0.963), fitted
template mean 0.9949 (min 0.965), paired gain +0.00066 +- 0.00014; the derived template
scaled by 149/150 was slightly worse (-0.0002). For scale: dlib's own 68-point chip scores
0.9959 against its 5-point chip. ``DLIB_CHIP_TEMPLATE`` (what the service uses) is the
fitted one.

Note the fit is to dlib-68-derived points; MTCNN was trained on differently annotated 5
points, so the pipeline's chips match dlib's only as well as MTCNN's points agree with these
(a fit of the template to MTCNN's own points on dlib chips would remove that bias). Measured
with the MTCNN of models/repository/mtcnn/1 on the same 100 held-out LFW faces: MTCNN points +
this template give mean cosine 0.9937 to dlib's own chips (derived template 0.9928); a
template fitted to MTCNN's points the same way ((47.36, 45.65), (101.79, 45.47),
(74.36, 77.08), (50.59, 105.24), (98.31, 105.11)) gives 0.9943.
"""
from __future__ import annotations

import cv2
import numpy as np

# dlib's mean face shape (interpolation.h, get_face_chip_details): landmarks 17..67 of the
# iBUG 68-point scheme, normalised to the unit square.
DLIB_MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
])
DLIB_MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
])
MEAN_FACE_FIRST = 17  # DLIB_MEAN_FACE_*[i] is landmark i + 17

# the 5 points as groups of iBUG-68 landmarks (averaged): image-left eye, image-right eye,
# nose tip, image-left mouth corner, image-right mouth corner
FIVE_POINT_GROUPS: tuple[tuple[int, ...], ...] = (
    tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,),
)
POINT_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")


def five_points_from_68(shape68: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG landmarks -> (5, 2) in our order (eye centres, nose tip, mouth corners)."""
    shape68 = np.asarray(shape68, dtype=np.float64)
    return np.stack([shape68[list(g)].mean(axis=0) for g in FIVE_POINT_GROUPS])


def dlib_chip_template(size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The 5-point template in ``size`` x ``size`` chip pixels, from dlib's mean face shape.

    ``x_chip = (padding + x) / (1 + 2 * padding) * size`` (same for y) applied to the mean
    positions of the landmark groups in ``FIVE_POINT_GROUPS``; this is exactly where
    ``get_face_chip_details(shape, size, padding)`` puts those mean-shape points.
    """
    unit = np.stack([DLIB_MEAN_FACE_X, DLIB_MEAN_FACE_Y], axis=1)
    pts = np.stack([unit[[i - MEAN_FACE_FIRST for i in g]].mean(axis=0) for g in FIVE_POINT_GROUPS])
    return ((padding + pts) / (1.0 + 2.0 * padding) * size).astype(np.float32)


DLIB_CHIP_TEMPLATE_DERIVED = dlib_chip_template(150, 0.25)

# Least-squares fit of the 5 points to where dlib's own 150 px / padding 0.25 chips put them
# (149 LFW faces; method in the module docstring). Chip pixels, same order as above.
DLIB_CHIP_TEMPLATE_FITTED = np.array([
    [46.988, 46.360],
    [100.148, 46.315],
    [73.583, 74.792],
    [49.845, 104.718],
    [97.691, 104.602],
], dtype=np.float32)

DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25
DLIB_CHIP_TEMPLATE = DLIB_CHIP_TEMPLATE_FITTED


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) taking
    ``src`` points to ``dst`` points (Umeyama 1991; what skimage's SimilarityTransform
    estimates). Returns the 2x3 matrix for ``cv2.warpAffine``."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (K>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s ** 2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all the same")
    scale = float((sig * sign).sum() / var_s)
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align(img: np.ndarray, landmarks: np.ndarray, template: np.ndarray, size: int) -> np.ndarray:
    """Warp ``img`` (H, W, 3) so that ``landmarks`` (5, 2) land on ``template`` (5, 2, chip
    pixels); returns the (size, size, 3) chip, same dtype, bilinear, zeros outside the image."""
    m = estimate_similarity(landmarks, template)
    return cv2.warpAffine(img, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
