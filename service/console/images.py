"""Retained images as the console shows them: decoded by the pipeline's own bounded decoder
(service.face.decode: the same caps, header checks, reduced decoding and decode slots, so the
audited face box lands on the face and a hostile upload costs the console no more than /verify),
the box drawn, scaled down, re-encoded as JPEG. What that decoder refuses is not shown."""
from __future__ import annotations

import io

import cv2

MAX_SIDE = 640
BOX_COLOUR = (0, 230, 64)    # RGB, a bright green that stands out on skin and backgrounds


def native_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a retained image as uploaded, from its header (nothing decoded; EXIF
    rotation applied as the decoder applies it); None when the header cannot be read."""
    from PIL import Image

    from service.face.decode import sniff_format

    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)   # orientations with a quarter turn
    except Exception:  # noqa: BLE001 - an unreadable header: no size stated
        return None
    return (h, w) if turned else (w, h)


def annotated_jpeg(data: bytes, box, field: str, settings, max_side: int = MAX_SIDE) -> bytes:
    """JPEG bytes of the image with `box` ([x1, y1, x2, y2] in image pixels) drawn.
    ValueError when the image cannot be decoded at all."""
    from service.face.decode import decode_image

    try:
        rgb = decode_image(data, field, settings)
    except Exception as exc:  # noqa: BLE001 - refused or undecodable: never decoded another way
        raise ValueError("the retained image cannot be decoded") from exc
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1.0 else rgb.copy()
    if box and len(box) == 4 and all(v is not None for v in box):
        x1, y1, x2, y2 = (int(round(float(v) * scale)) for v in box)
        # boxes are not clipped (a face cut by the frame keeps its extent): draw the part in view
        x1, x2 = (min(max(v, 0), img.shape[1] - 1) for v in (x1, x2))
        y1, y2 = (min(max(v, 0), img.shape[0] - 1) for v in (y1, y2))
        thickness = max(2, round(max(img.shape[:2]) / 200))
        cv2.rectangle(img, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("could not encode the image")
    return buf.tobytes()
