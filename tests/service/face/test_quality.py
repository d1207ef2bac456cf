"""service/face/quality.py: the informational flags on synthetic chips with known answers."""
from __future__ import annotations

import numpy as np

from service.face.quality import BLUR_MIN, SMALL_FACE_PX, assess

# eyes level, nose centred under them (pixel coordinates of a 150 px chip)
FRONTAL = np.array([[50, 60], [100, 60], [75, 90], [55, 115], [95, 115]], np.float32)


def _chip(value: int = 128, noise: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.full((150, 150, 3), value, np.float64)
    if noise:
        base += rng.normal(0, 30, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def test_a_sharp_frontal_well_lit_face_raises_no_flag():
    q = assess(_chip(), FRONTAL, face_px=120.0, faces_seen=1)
    assert q["sharpness"] >= BLUR_MIN and abs(q["yaw_ratio"]) < 1e-6 and q["roll_deg"] == 0.0
    assert not any(q[k] for k in ("blurry", "underexposed", "overexposed", "off_frontal", "small_face",
                                  "multiple_faces"))


def test_flags():
    assert assess(_chip(noise=False), FRONTAL, 120.0, 1)["blurry"]              # flat: no edges
    assert assess(_chip(20, noise=False), FRONTAL, 120.0, 1)["underexposed"]
    assert assess(_chip(230, noise=False), FRONTAL, 120.0, 1)["overexposed"]
    turned = FRONTAL.copy()
    turned[2, 0] += 25                                                           # nose 0.5 eye distances off
    assert assess(_chip(), turned, 120.0, 1)["off_frontal"]
    assert assess(_chip(), FRONTAL, SMALL_FACE_PX - 1, 1)["small_face"]
    assert assess(_chip(), FRONTAL, 120.0, 2)["multiple_faces"]


def test_roll_is_the_eye_line_angle():
    tilted = FRONTAL.copy()
    tilted[1, 1] += 50                                                           # right eye 50 px lower
    assert assess(_chip(), tilted, 120.0, 1)["roll_deg"] == 45.0


# --- the chip side's face-size rule, on real simulated chips through the pipeline ---------------

def _simulated_chips(lfw, n: int):
    from PIL import Image

    from models.eval.chipsim import chip_rng, simulate_chip

    for person in sorted(p for p in (lfw / "images").iterdir() if p.is_dir())[:n]:
        path = sorted(person.glob("*.jpg"))[0]
        key = f"lfw/images/{person.name}/{path.name}"
        yield simulate_chip(np.asarray(Image.open(path).convert("RGB")), None, chip_rng(key, 0), return_image=True)


def test_a_normal_chip_photo_is_not_flagged_small_or_blurry(pipeline, lfw):
    widths, blurry = [], 0
    for data, _image in _simulated_chips(lfw, 40):
        side, _chip_ = pipeline.prepare(data, "id_photo", {})
        widths.append(side.face_px)
        assert not side.quality["small_face"], side.face_px
        blurry += side.quality["blurry"]
    assert 45 < np.median(widths) < SMALL_FACE_PX  # a chip's face is narrower than the live photo's rule
    assert pipeline.settings.chip_small_face_px < min(widths)
    assert blurry <= 4, blurry                       # the live photo's rule (25) would flag nearly all


def test_a_blurred_chip_is_flagged_blurry(pipeline, lfw):
    import io

    import cv2
    from PIL import Image

    data, image = next(_simulated_chips(lfw, 1))
    assert not pipeline.prepare(data, "id_photo", {})[0].quality["blurry"]
    buf = io.BytesIO()
    Image.fromarray(cv2.GaussianBlur(image, (0, 0), 2.0)).save(buf, "PNG")
    assert pipeline.prepare(buf.getvalue(), "id_photo", {})[0].quality["blurry"]


def test_a_tiny_face_on_a_chip_is_still_flagged(pipeline, lfw):
    import io

    from PIL import Image

    _data, image = next(_simulated_chips(lfw, 1))
    small = Image.fromarray(image).resize((66, 82), Image.LANCZOS)    # the face at 65 % of its size
    canvas = Image.new("RGB", (image.shape[1], image.shape[0]), tuple(int(v) for v in image[0, 0]))
    canvas.paste(small, ((canvas.width - small.width) // 2, (canvas.height - small.height) // 3))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    side, _chip_ = pipeline.prepare(buf.getvalue(), "id_photo", {})
    assert pipeline.settings.min_face_px <= side.face_px < pipeline.settings.chip_small_face_px
    assert side.quality["small_face"]
    # the live photo keeps its own rule: the same normal chip image sent as the live photo is small
    live, _chip_ = pipeline.prepare(_data, "live_photo", {})
    assert live.quality["small_face"] and live.face_px < SMALL_FACE_PX
