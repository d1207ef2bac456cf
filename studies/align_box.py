"""Box-crop "alignment", the way FaceNet (davidsandberg/facenet, facenet-pytorch) prepares faces:
no landmarks, the detector's box grown by a margin and resized to a square chip.

facenet's align_dataset_mtcnn.py grows the MTCNN box by ``margin / 2`` image pixels on each
side (44 px for training at 182 px then a 160 px centre crop, 32 px at 160 for LFW) and
resizes the crop to ``size x size`` without keeping the aspect ratio. Here the margin is in
OUTPUT pixels, like facenet-pytorch's ``extract_face``: the box occupies ``size - margin``
chip pixels in each direction whatever the face's size in the image, so the crop is
scale-free (an absolute image-pixel margin would depend on the camera distance). For LFW's
~110 px MTCNN boxes, margin 32 (of 160) is ~28 image pixels, between facenet's LFW (32 px) and
training (44 px at 182 -> 160) conventions.

Unlike facenet, which clips the grown box to the image (stretching faces at the border),
parts of the crop outside the image are filled with zeros, as :func:`service.face.align.align`
does, so the geometry is the same for every face.
"""
from __future__ import annotations

import cv2
import numpy as np


def box_crop_matrix(box, size: int, margin: float) -> np.ndarray:
    """2x3 affine matrix (image -> chip pixels) of :func:`crop_box`."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    if size <= margin:
        raise ValueError(f"margin {margin} leaves no room in a {size} px chip")
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    sx, sy = (size - margin) / bw, (size - margin) / bh  # chip px per image px
    # crop rectangle in image pixels: box grown by margin/2 chip px each side
    cx1, cy1 = x1 - margin / 2.0 / sx, y1 - margin / 2.0 / sy
    # pixel-centre convention of cv2.resize: chip x = (img x - cx1 + 0.5) * sx - 0.5
    return np.array([[sx, 0.0, (0.5 - cx1) * sx - 0.5],
                     [0.0, sy, (0.5 - cy1) * sy - 0.5]], dtype=np.float64)


def crop_box(img: np.ndarray, box, size: int = 160, margin: float = 32) -> np.ndarray:
    """The (size, size, 3) chip of ``img`` (H, W, 3) for a detector ``box`` (x1, y1, x2, y2,
    image pixels): the box plus ``margin / 2`` chip pixels on each side, stretched to the
    square chip; bilinear, zeros outside the image, same dtype as ``img``."""
    m = box_crop_matrix(box, size, margin)
    return cv2.warpAffine(img, m, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def points_in_crop(points: np.ndarray, box, size: int = 160, margin: float = 32) -> np.ndarray:
    """Where image ``points`` (K, 2) land in :func:`crop_box`'s chip."""
    m = box_crop_matrix(box, size, margin)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]
