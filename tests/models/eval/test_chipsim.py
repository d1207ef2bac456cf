"""ID-chip photo simulator: determinism, format, size budget, geometry, detectability."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.eval import chipsim

ROOT = Path(__file__).resolve().parents[3]


def _synthetic_face(h: int = 250, w: int = 250) -> np.ndarray:
    """A smooth face-like picture (no shared data needed): background gradient, skin ellipse,
    dark eyes and mouth at LFW-like positions."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([90 + 60 * xx / w, 110 + 40 * yy / h, 160 - 50 * xx / w], -1)
    face = ((xx - 0.5 * w) / (0.2 * w)) ** 2 + ((yy - 0.52 * h) / (0.28 * h)) ** 2 < 1
    img[face] = (205, 160, 130)
    for cx, cy, r in ((0.415, 0.455, 0.025), (0.58, 0.45, 0.025), (0.5, 0.63, 0.03)):
        m = ((xx - cx * w) ** 2 + (yy - cy * h) ** 2) < (r * w) ** 2
        img[m] = (40, 30, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_deterministic_per_key_and_seed():
    img = _synthetic_face()
    a = chipsim.simulate_chip(img, None, chipsim.chip_rng("lfw/images/A/A_0001.jpg", 0))
    b = chipsim.simulate_chip(img, None, chipsim.chip_rng("lfw/images/A/A_0001.jpg", 0))
    c = chipsim.simulate_chip(img, None, chipsim.chip_rng("lfw/images/A/A_0001.jpg", 1))
    d = chipsim.simulate_chip(img, None, chipsim.chip_rng("lfw/images/A/A_0002.jpg", 0))
    assert a == b
    assert a != c and a != d


def test_rng_independent_of_order():
    first = chipsim.chip_rng("x/y.jpg", 7).random(4)
    chipsim.chip_rng("other.jpg", 7).random(100)
    assert np.array_equal(first, chipsim.chip_rng("x/y.jpg", 7).random(4))


@pytest.mark.parametrize("seed", range(6))
def test_format_size_and_dims(seed):
    img = _synthetic_face()
    data, decoded = chipsim.simulate_chip(img, None, chipsim.chip_rng("k", seed), return_image=True)
    assert data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n"          # JP2 signature box
    lo, hi = chipsim.TARGET_BYTES * (1 - chipsim.TARGET_TOLERANCE), chipsim.TARGET_BYTES * (1 + chipsim.TARGET_TOLERANCE)
    assert lo <= len(data) <= hi
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG2000" and im.size == (102, 126)  # (w, h)
    assert decoded.shape == (126, 102, 3) and decoded.dtype == np.uint8


def test_encodings_differ_and_both_fit_the_size():
    """rgb (no colour transform, the default) and ycc (YCbCr transform) encode the same drawn
    chip differently, both within the size window; the default is rgb."""
    img = _synthetic_face()
    rgb = chipsim.simulate_chip_ex(img, None, chipsim.chip_rng("k", 3))
    ycc = chipsim.simulate_chip_ex(img, None, chipsim.chip_rng("k", 3), encoding="ycc")
    assert rgb.params["encoding"] == "rgb" and rgb.params["version"] == chipsim.CHIPSIM_VERSION == "chipsim-1"
    assert ycc.params["version"] == "chipsim-2" and rgb.data != ycc.data
    lo, hi = chipsim.TARGET_BYTES * (1 - chipsim.TARGET_TOLERANCE), chipsim.TARGET_BYTES * (1 + chipsim.TARGET_TOLERANCE)
    assert lo <= len(rgb.data) <= hi and lo <= len(ycc.data) <= hi


def test_landmarks_place_eyes_icao():
    """Given landmarks, the eyes land at the ICAO-ish positions (within the jitter): eye
    distance 0.25 x width, midpoint (51, 60)."""
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), (200, 170, 150), np.uint8)
    lm = np.array([[120, 180], [180, 178], [150, 215], [128, 250], [172, 250]], np.float32)
    for x, y in lm[:2]:
        img[(xx - x) ** 2 + (yy - y) ** 2 < 36] = (20, 20, 20)
    for seed in range(4):
        chip = chipsim.simulate_chip_ex(img, lm, chipsim.chip_rng("k", seed))
        p = chip.params
        assert 0.94 <= p["scale_jitter"] <= 1.06 and abs(p["rotation_deg"]) <= 2
        grey = chip.image.astype(np.float32).mean(-1)
        dark = grey < grey.mean() - 40
        cy, cx = np.nonzero(dark)
        left, right = cx < chipsim.CHIP_W / 2, cx >= chipsim.CHIP_W / 2
        le = np.array([cx[left].mean(), cy[left].mean()])
        re = np.array([cx[right].mean(), cy[right].mean()])
        assert np.linalg.norm(re - le) == pytest.approx(chipsim.EYE_DIST, rel=0.12)
        mid = (le + re) / 2
        assert abs(mid[0] - chipsim.EYE_X) < 3 and abs(mid[1] - chipsim.EYE_Y) < 3
    # eye order does not matter
    swapped = lm.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    a = chipsim.simulate_chip_ex(img, lm, chipsim.chip_rng("k", 3))
    b = chipsim.simulate_chip_ex(img, swapped, chipsim.chip_rng("k", 3))
    assert a.data == b.data


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        chipsim.simulate_chip(np.zeros((50, 50), np.uint8), None, chipsim.chip_rng("k"))


def test_encode_j2k_hits_other_targets():
    img = _synthetic_face()[60:186, 74:176].copy()
    for target in (800, 1500):
        data, _ = chipsim.encode_j2k(img, target)
        assert abs(len(data) - target) <= 0.15 * target


@pytest.mark.parametrize("encoding,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_other_coders_store_the_same_drawn_chip_at_the_byte_target(encoding, magic):
    """jpeg / webp: the same drawn chip as rgb (same random draws, same decoded size), another
    file format, within the size window of the byte target passed in; rgb/ycc stay chipsim-1/2."""
    img = _synthetic_face()
    rgb = chipsim.simulate_chip_ex(img, None, chipsim.chip_rng("k", 4))
    for target in (800, 1000, 1400):
        other = chipsim.simulate_chip_ex(img, None, chipsim.chip_rng("k", 4), target_bytes=target, encoding=encoding)
        assert other.data[:len(magic)] == magic and abs(len(other.data) - target) <= 0.15 * target
        assert other.image.shape == rgb.image.shape == (126, 102, 3)
        assert other.params["scale_jitter"] == rgb.params["scale_jitter"] and "quality" in other.params
        # the decoded chips are close (same picture) but not equal (another coder)
        assert 0 < np.abs(other.image.astype(int) - rgb.image.astype(int)).mean() < 20
    assert other.params["version"] == chipsim.ENCODINGS[encoding][0] not in ("chipsim-1", "chipsim-2")
    assert chipsim.ENCODINGS["rgb"][0] == "chipsim-1" and chipsim.ENCODINGS["ycc"][0] == "chipsim-2"


def test_simulate_chip_takes_a_byte_target():
    img = _synthetic_face()
    small = chipsim.simulate_chip(img, None, chipsim.chip_rng("k", 2), target_bytes=800)
    large = chipsim.simulate_chip(img, None, chipsim.chip_rng("k", 2), target_bytes=1400)
    assert abs(len(small) - 800) <= 120 and abs(len(large) - 1400) <= 210
    assert chipsim.simulate_chip(img, None, chipsim.chip_rng("k", 2)) == \
        chipsim.simulate_chip(img, None, chipsim.chip_rng("k", 2), target_bytes=chipsim.TARGET_BYTES)
    with pytest.raises(ValueError):
        chipsim.simulate_chip(img, None, chipsim.chip_rng("k", 2), encoding="gif")


def _lfw_dir() -> Path:
    from service.settings import get_settings
    return Path(get_settings().data_dir) / "lfw" / "images"


def test_chips_of_lfw_images_are_detected():
    """The chip is still a usable face: MTCNN finds it, about 55-60 % of the width, eyes where
    the ICAO geometry puts them."""
    images = _lfw_dir()
    if not images.is_dir():
        pytest.skip(f"LFW images not found at {images} (set IDV_DATA_DIR)")
    mtcnn = ROOT / "models" / "repository" / "mtcnn" / "1"
    if not (mtcnn / "manifest.json").exists():
        pytest.skip(f"MTCNN artifacts not found at {mtcnn}")
    from service.face.detect import select_face
    from service.face.loader import load_detector
    from service.settings import Settings
    det = load_detector(Settings(), threads=1)
    names = ["Abel_Pacheco", "Akhmed_Zakayev", "George_W_Bush", "Serena_Williams", "Colin_Powell", "Jennifer_Aniston"]
    widths, eyes = [], []
    for name in names:
        rel = f"{name}/{name}_0001.jpg"
        with Image.open(images / rel) as im:
            img = np.asarray(im.convert("RGB"))
        data = chipsim.simulate_chip(img, None, chipsim.chip_rng(f"lfw/images/{rel}", 0))
        with Image.open(io.BytesIO(data)) as im:
            chip = np.asarray(im.convert("RGB"))
        faces = det.detect(chip)
        assert faces, f"no face detected in the chip of {rel}"
        f = select_face(faces, chip.shape)
        widths.append(f.width / chipsim.CHIP_W)
        eyes.append(f.landmarks[:2].mean(0))
    assert 0.45 <= float(np.median(widths)) <= 0.70
    mid = np.median(np.array(eyes), 0)
    assert abs(mid[0] - chipsim.EYE_X) < 5 and abs(mid[1] - chipsim.EYE_Y) < 6
