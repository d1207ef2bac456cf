"""Uploaded bytes -> RGB uint8 (H, W, 3), refusing what we cannot or will not decode.

Order of checks, cheapest first, so hostile input is turned away before pixels are allocated:

1. empty -> 400 image_undecodable; more than `settings.max_image_bytes` -> 413 image_too_large
2. format sniffed from the magic bytes (the client's filename / content type are not trusted):
   JPEG, PNG, BMP, WebP, JPEG 2000 (.jp2 container and raw J2K codestream); else 415
   unsupported_media_type. Pillow is then only allowed to use that one decoder.
3. header only (Pillow opens lazily): width * height > `settings.max_image_pixels` -> 413
   image_too_large. Pillow's own decompression-bomb limit is switched off in favour of this cap,
   which is always checked.
4. full decode; a truncated or corrupt file -> 400 image_undecodable (truncated images are never
   silently padded: ImageFile.LOAD_TRUNCATED_IMAGES stays False).
5. EXIF orientation applied; modes converted to RGB: L/1/P/CMYK/YCbCr/... directly, anything
   with alpha (LA, PA, RGBA, P + transparency) composited on white, 16/32-bit grey scaled to 8 bit.

Tiny images decode fine; whether they hold a usable face is the detector's call.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from service.errors import IMAGE_TOO_LARGE, IMAGE_UNDECODABLE, UNSUPPORTED_MEDIA_TYPE, ApiError

# Our pixel cap (settings.max_image_pixels) replaces Pillow's DecompressionBomb warning/error.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED = "JPEG, PNG, BMP, WebP or JPEG 2000"


def sniff_format(data: bytes) -> str | None:
    """Pillow format name from the leading bytes, or None if not one we accept."""
    head = bytes(data[:16])
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":   # JP2 signature box
        return "JPEG2000"
    if head[:4] == b"\xff\x4f\xff\x51":                  # J2K codestream: SOC then SIZ marker
        return "JPEG2000"
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG, JPEG 2000): 0..65535 -> 0..255. Mode "I" is 32-bit and says nothing
        # about the source depth: values within 0..255 are taken as 8-bit content, else as 16-bit.
        arr = np.asarray(im).astype(np.float64)
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            gray = arr
        else:
            gray = np.round(np.clip(arr, 0, 65535) / 257.0)
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, field: str, settings) -> np.ndarray:
    """Decode one uploaded image to RGB uint8 (H, W, 3); raises ApiError naming `field`."""
    if data is None or len(data) == 0:
        raise ApiError(IMAGE_UNDECODABLE, "the image is empty", field, status=400)
    if len(data) > settings.max_image_bytes:
        raise ApiError(IMAGE_TOO_LARGE, f"the image is {len(data)} bytes; at most "
                       f"{settings.max_image_bytes} are accepted", field, status=413)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(UNSUPPORTED_MEDIA_TYPE, f"not a {ACCEPTED} image", field, status=415)

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # never decode a cut-off file as if it were whole
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = im.size  # from the header; no pixels decoded yet
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure means "not a valid image"
        raise ApiError(IMAGE_UNDECODABLE, f"the {fmt} image header could not be read", field, status=400) from exc

    if width <= 0 or height <= 0:
        raise ApiError(IMAGE_UNDECODABLE, f"the image claims a size of {width}x{height}", field, status=400)
    if width * height > settings.max_image_pixels:
        raise ApiError(IMAGE_TOO_LARGE, f"the image is {width}x{height} = {width * height} pixels; at most "
                       f"{settings.max_image_pixels} are accepted", field, status=413)

    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, unsupported variant, ...
        raise ApiError(IMAGE_UNDECODABLE, f"the {fmt} image is truncated or corrupt", field, status=400) from exc

    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        pass

    try:
        rgb = _to_rgb(im)
        arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(IMAGE_UNDECODABLE, f"the {fmt} image ({im.mode}) could not be converted to RGB",
                       field, status=400) from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ApiError(IMAGE_UNDECODABLE, f"the image decoded to an unexpected shape {arr.shape}", field, status=400)
    return np.ascontiguousarray(arr)
