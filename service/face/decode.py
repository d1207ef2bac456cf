"""Uploaded bytes -> RGB uint8 (H, W, 3), refusing what we cannot or will not decode.

Order of checks, cheapest first, so hostile input is turned away before pixels are allocated:

1. empty -> 400 image_undecodable; more than `settings.max_image_bytes` -> 413 image_too_large
2. format sniffed from the magic bytes (the client's filename / content type are not trusted):
   JPEG, PNG, BMP, WebP, JPEG 2000 (.jp2 container and raw J2K codestream); else 415
   unsupported_media_type. Pillow is then only allowed to use that one decoder.
3. header only (Pillow opens lazily): width * height over the side's cap -> 413
   image_too_large (`settings.max_id_image_pixels` for the ID-chip photo, far smaller than
   `settings.max_image_pixels` for the live photo). Pillow's own decompression-bomb limit is
   switched off in favour of this cap, which is always checked. The pixel mode must be one we
   convert (else 400); JPEG 2000 also has its codestream header read here (service/face/j2k.py):
   more than MAX_J2K_TILES tiles, MAX_J2K_COMPONENTS components or 16 bits per sample -> 400.
4. reduced-resolution decoding: a JPEG or JPEG 2000 at least twice `settings.decode_target_side`
   on its long side is decoded at 1/2, 1/4 or 1/8 scale (JPEG draft mode, JPEG 2000 `reduce`),
   never below that side; detection works on 800 px anyway. Face boxes are then in the
   decoded image's pixels, the image the console also shows.
5. full decode, at most `settings.max_concurrent_decodes` at once in the process (a caller waits
   up to `settings.decode_wait_seconds`, then 503 busy); a truncated or corrupt file -> 400
   image_undecodable (truncated images are never silently padded: ImageFile.LOAD_TRUNCATED_IMAGES
   stays False). After a large decode the freed heap is handed back to the OS (malloc_trim).
6. EXIF orientation applied; modes converted to RGB: L/1/P/CMYK/YCbCr/... directly, anything
   with alpha (LA, PA, RGBA, P + transparency) composited on white, 16/32-bit grey scaled to 8 bit
   in row blocks (no full-size wider copy).

Tiny images decode fine; whether they hold a usable face is the detector's call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import threading
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps

from service.errors import BUSY, IMAGE_TOO_LARGE, IMAGE_UNDECODABLE, UNSUPPORTED_MEDIA_TYPE, ApiError
from service.face import j2k

# Our pixel cap (settings.max_image_pixels) replaces Pillow's DecompressionBomb warning/error.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED = "JPEG, PNG, BMP, WebP or JPEG 2000"
# pixel modes Pillow opens these formats in that _to_array converts; anything else is refused
MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I;16", "I;16B", "I;16L", "I;16N", "I"}
MAX_J2K_TILES = 1024        # one tile is the encoders' default; 16 MP in 128 px tiles is ~1000
MAX_J2K_COMPONENTS = 4
MAX_DEPTH = 16
TRIM_PIXELS = 2_000_000     # hand freed memory back to the OS after decodes at least this large
ROWS_PER_BLOCK = 256


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


def _grey16_to_u8(im: Image.Image) -> np.ndarray:
    """16/32-bit grey -> 8-bit L, in blocks of rows (no float64 or other full-size wide copy):
    0..65535 -> round(v / 257). Mode "I" is 32-bit and says nothing about the source depth:
    values within 0..255 are taken as 8-bit content, else as 16-bit."""
    arr = np.asarray(im)
    eight_bit = im.mode == "I" and arr.size and int(arr.min()) >= 0 and int(arr.max()) <= 255
    out = np.empty(arr.shape, np.uint8)
    for top in range(0, arr.shape[0], ROWS_PER_BLOCK):
        block = arr[top:top + ROWS_PER_BLOCK]
        if eight_bit:
            out[top:top + ROWS_PER_BLOCK] = block
        else:
            wide = np.clip(block, 0, 65535).astype(np.uint32)
            out[top:top + ROWS_PER_BLOCK] = (wide * 255 + 32767) // 65535   # = round(v / 257)
    return out


def _to_array(im: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) with as few full-size copies as the mode allows."""
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = _grey16_to_u8(im)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(_to_rgb(im), dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def pixel_cap(field: str, settings) -> int:
    """The side's pixel cap: the ID-chip photo's is far smaller than the live photo's."""
    return settings.max_id_image_pixels if field == "id_photo" else settings.max_image_pixels


def _undecodable(message: str, field: str) -> ApiError:
    return ApiError(IMAGE_UNDECODABLE, message, field, status=400)


def _check_j2k(data: bytes, field: str) -> j2k.J2KHeader:
    try:
        head = j2k.read_header(data)
    except (ValueError, IndexError) as exc:
        raise _undecodable("the JPEG 2000 codestream header could not be read", field) from exc
    if head.tiles > MAX_J2K_TILES:
        raise _undecodable(f"the JPEG 2000 image has {head.tiles} tiles; at most {MAX_J2K_TILES} are accepted", field)
    if head.components > MAX_J2K_COMPONENTS:
        raise _undecodable(f"the JPEG 2000 image has {head.components} components; at most "
                           f"{MAX_J2K_COMPONENTS} are accepted", field)
    if head.max_depth > MAX_DEPTH:
        raise _undecodable(f"the JPEG 2000 image has {head.max_depth} bits per sample; at most {MAX_DEPTH}", field)
    return head


def _reduction(long_side: int, target: int, max_steps: int = 3) -> int:
    """log2 of the scale to decode at: the largest 2^k (k <= max_steps) that keeps the long side
    at or above `target`."""
    k = 0
    while k < max_steps and long_side >> (k + 1) >= target:
        k += 1
    return k


def _reduce(im: Image.Image, fmt: str, head: j2k.J2KHeader | None, target: int) -> None:
    """Ask the decoder for a reduced image when this one is far larger than needed."""
    width, height = im.size
    if fmt == "JPEG":
        k = _reduction(max(width, height), target)
        if k:
            im.draft(None, (max(1, width >> k), max(1, height >> k)))
    elif fmt == "JPEG2000" and head is not None:
        k = _reduction(max(width, height), target, min(3, head.levels))
        if k:
            im.reduce = k


_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextmanager
def decode_slot(settings):
    """One of the process's `settings.max_concurrent_decodes` decode slots; 503 busy (with
    Retry-After) after `settings.decode_wait_seconds` without one."""
    limit = max(1, int(settings.max_concurrent_decodes))
    with _slots_lock:
        slot = _slots.setdefault(limit, threading.BoundedSemaphore(limit))
    if not slot.acquire(timeout=max(0.0, float(settings.decode_wait_seconds))):
        err = ApiError(BUSY, "the server is decoding other images; retry shortly", None, status=503)
        err.headers = {"Retry-After": "1"}
        raise err
    try:
        yield
    finally:
        slot.release()


def _load_libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_libc_trim()


def release_memory() -> None:
    """Hand the heap pages freed by a large decode back to the OS (glibc keeps them otherwise)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


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
    cap = pixel_cap(field, settings)
    if width * height > cap:
        raise ApiError(IMAGE_TOO_LARGE, f"the image is {width}x{height} = {width * height} pixels; at most "
                       f"{cap} are accepted", field, status=413)
    if im.mode not in MODES:
        raise _undecodable(f"the {fmt} image's pixel format ({im.mode}) is not supported", field)
    head = _check_j2k(bytes(data), field) if fmt == "JPEG2000" else None
    try:
        _reduce(im, fmt, head, settings.decode_target_side)
    except Exception as exc:  # noqa: BLE001
        raise _undecodable(f"the {fmt} image header could not be read", field) from exc

    try:
        with decode_slot(settings):
            return _decode_pixels(im, fmt, field)
    finally:
        im.close()
        del im
        if width * height >= TRIM_PIXELS:
            release_memory()


def _decode_pixels(im: Image.Image, fmt: str, field: str) -> np.ndarray:
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, unsupported variant, ...
        raise ApiError(IMAGE_UNDECODABLE, f"the {fmt} image is truncated or corrupt", field, status=400) from exc

    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is nothing to turn
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        pass

    try:
        arr = _to_array(im)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(IMAGE_UNDECODABLE, f"the {fmt} image ({im.mode}) could not be converted to RGB",
                       field, status=400) from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ApiError(IMAGE_UNDECODABLE, f"the image decoded to an unexpected shape {arr.shape}", field, status=400)
    return np.ascontiguousarray(arr)
