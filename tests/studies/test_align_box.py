"""studies/align_box.py: FaceNet-style box crops."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from studies.align_box import box_crop_matrix, crop_box, points_in_crop


def test_box_fills_size_minus_margin():
    box = (40.0, 30.0, 140.0, 160.0)  # 100 x 130, not square: stretched like facenet
    m = box_crop_matrix(box, 160, 32)
    corners = points_in_crop(np.array([[40.0, 30.0], [140.0, 160.0]]), box, 160, 32)
    # box edges (pixel boundaries) land margin/2 px inside the chip's edges
    edges = np.array([[40.0 - 0.5, 30.0 - 0.5], [140.0 - 0.5, 160.0 - 0.5]]) @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(edges + 0.5, [[16.0, 16.0], [144.0, 144.0]], atol=1e-9)
    assert corners.shape == (2, 2)


def test_matches_resize_of_the_grown_box():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (240, 200, 3), dtype=np.uint8)
    # a box whose grown crop is exactly the integer rectangle x 20..180, y 10..210 (160 x 200 px)
    size, margin = 80, 16
    sx, sy = 160 / size, 200 / size  # image px per chip px
    box = (20 + margin / 2 * sx, 10 + margin / 2 * sy, 180 - margin / 2 * sx, 210 - margin / 2 * sy)
    got = crop_box(img, box, size, margin).astype(np.float64)
    want = cv2.resize(img[10:210, 20:180], (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    assert got.shape == (size, size, 3) and got.dtype == np.float64
    assert np.abs(got - want)[2:-2, 2:-2].max() <= 1.0


def test_outside_is_zero_and_bad_margin():
    img = np.full((50, 50, 3), 200, np.uint8)
    chip = crop_box(img, (0, 0, 50, 50), 64, 32)
    assert chip[0, 0].tolist() == [0, 0, 0] and chip[32, 32].tolist() == [200, 200, 200]
    with pytest.raises(ValueError):
        crop_box(img, (0, 0, 50, 50), 32, 32)
