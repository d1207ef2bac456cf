"""service/face/decode.py: formats, modes, EXIF orientation, caps and error codes.

Every input is generated here from a package image (skimage's astronaut), so nothing binary is
checked in."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from service.face.decode import decode_image, sniff_format
from service.errors import ApiError
from service.settings import Settings

FIELD = "live_photo"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo, small: skimage's astronaut at 128x128."""
    skdata = pytest.importorskip("skimage.data")
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((128, 128), Image.BILINEAR))


def encode(img: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def expect_error(data: bytes, code: str, status: int, settings, field: str = FIELD) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_image(data, field, settings)
    err = info.value
    assert (err.code, err.status, err.field) == (code, status, field), err.message
    return err


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB, followed by a token IDAT and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("fmt,kw,tol", [
    ("PNG", {}, 0),
    ("BMP", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("JPEG", {"quality": 95}, 12),
    ("WEBP", {"quality": 90}, 20),
    ("JPEG2000", {}, 0),                          # .jp2 container, lossless by default
    ("JPEG2000", {"no_jp2": True}, 0),            # raw J2K codestream
])
def test_formats_round_trip(photo, settings, fmt, kw, tol):
    data = encode(photo, fmt, **kw)
    out = decode_image(data, FIELD, settings)
    assert out.shape == photo.shape and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert np.abs(out.astype(int) - photo.astype(int)).mean() <= tol


def test_sniff_by_magic_not_by_name(photo):
    assert sniff_format(encode(photo, "JPEG")) == "JPEG"
    assert sniff_format(encode(photo, "PNG")) == "PNG"
    assert sniff_format(encode(photo, "BMP")) == "BMP"
    assert sniff_format(encode(photo, "WEBP")) == "WEBP"
    assert sniff_format(encode(photo, "JPEG2000")) == "JPEG2000"
    assert sniff_format(encode(photo, "JPEG2000", no_jp2=True)) == "JPEG2000"
    assert sniff_format(encode(photo, "GIF")) is None
    assert sniff_format(encode(photo, "TIFF")) is None


def test_bytearray_and_memoryview_accepted(photo, settings):
    data = encode(photo, "PNG")
    assert np.array_equal(decode_image(bytearray(data), FIELD, settings), photo)
    assert np.array_equal(decode_image(memoryview(data), FIELD, settings), photo)


def test_tiny_image_decodes(settings):
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), FIELD, settings)
    assert out.shape == (1, 1, 3) and out[0, 0].tolist() == [10, 20, 30]


# ------------------------------------------------------------------------------------ modes

def test_grayscale(photo, settings):
    gray = Image.fromarray(photo).convert("L")
    out = decode_image(encode(gray, "PNG"), FIELD, settings)
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[..., 0], np.asarray(gray)) and np.array_equal(out[..., 0], out[..., 2])


def test_one_bit(settings):
    img = Image.fromarray((np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    out = decode_image(encode(img, "PNG"), FIELD, settings)
    assert set(np.unique(out).tolist()) == {0, 255}


def test_rgba_composited_on_white(photo, settings):
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0          # fully transparent band -> white
    rgba[10:20, :, 3] = 128      # half transparent band -> halfway to white
    out = decode_image(encode(rgba, "PNG"), FIELD, settings)
    assert (out[:10] == 255).all()
    half = (photo[10:20].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(out[10:20].astype(int) - half).max() <= 2
    assert np.array_equal(out[20:], photo[20:])


def test_gray_alpha(settings):
    la = Image.merge("LA", [Image.new("L", (8, 8), 40), Image.new("L", (8, 8), 0)])
    assert (decode_image(encode(la, "PNG"), FIELD, settings) == 255).all()


def test_palette_and_palette_with_transparency(photo, settings):
    pal = Image.fromarray(photo).quantize(64)
    out = decode_image(encode(pal, "PNG"), FIELD, settings)
    assert np.array_equal(out, np.asarray(pal.convert("RGB")))
    index = np.asarray(pal)[0, 0]
    data = encode(pal, "PNG", transparency=int(index))
    out = decode_image(data, FIELD, settings)
    assert (out[np.asarray(pal) == index] == 255).all()


def test_16_bit_gray_scaled_to_8_bit(settings):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for fmt in ("PNG", "JPEG2000"):
        out = decode_image(encode(Image.fromarray(ramp), fmt), FIELD, settings)
        assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
        assert np.abs(out[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1, fmt


def test_cmyk_jpeg(photo, settings):
    cmyk = Image.fromarray(photo).convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG", quality=95), FIELD, settings)
    assert out.shape == photo.shape
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 15


@pytest.mark.parametrize("orientation,undo", [
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),   # stored rotated 90 deg counter-clockwise
    (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_applied(photo, settings, orientation, undo):
    # store the pixels so that applying `orientation` gives back the upright photo
    stored = {3: np.rot90(photo, 2), 6: np.rot90(photo, 1), 8: np.rot90(photo, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(np.ascontiguousarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, FIELD, settings)
    assert out.shape == photo.shape
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 12
    assert np.abs(undo(out).astype(int) - photo.astype(int)).mean() > 30  # not upright by accident


# ------------------------------------------------------------------------------------ errors

def test_empty_is_undecodable(settings):
    expect_error(b"", "image_undecodable", 400, settings)


def test_field_name_is_reported(settings):
    assert expect_error(b"", "image_undecodable", 400, settings, field="id_photo").field == "id_photo"


def test_too_many_bytes(photo, settings):
    data = encode(photo, "PNG")
    small = settings.model_copy(update={"max_image_bytes": len(data) - 1})
    expect_error(data, "image_too_large", 413, small)
    assert decode_image(data, FIELD, settings.model_copy(update={"max_image_bytes": len(data)})).shape == photo.shape


def test_too_many_pixels(photo, settings):
    small = settings.model_copy(update={"max_image_pixels": 128 * 128 - 1})
    for fmt in ("JPEG", "PNG", "WEBP", "JPEG2000"):
        expect_error(encode(photo, fmt), "image_too_large", 413, small)


def test_header_claiming_huge_image_refused_without_decoding(settings):
    data = png_header_only(30000, 30000)  # 900 Mpx, a 2.7 GB decode if it were attempted
    t0 = time.perf_counter()
    err = expect_error(data, "image_too_large", 413, settings)
    assert time.perf_counter() - t0 < 1.0
    assert "30000x30000" in err.message


def test_pillow_bomb_check_replaced_by_our_cap(settings):
    # 20000 x 10000 = 200 Mpx is past Pillow's own DecompressionBombError limit (~179 Mpx): with
    # Pillow's check active this would surface as a generic open failure, not as our 413
    err = expect_error(png_header_only(20000, 10000), "image_too_large", 413, settings)
    assert "200000000 pixels" in err.message
    # within our cap, a header-only file is undecodable (no pixels), not a bomb
    assert expect_error(png_header_only(64, 64), "image_undecodable", 400, settings)


@pytest.mark.parametrize("data", [
    b"GIF89a" + b"\x00" * 64,
    b"II*\x00" + b"\x00" * 64,                 # TIFF
    b"%PDF-1.4\n" + b"\x00" * 64,
    b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    b"hello world",
    b"\x00",
])
def test_unsupported_media_type(settings, data):
    expect_error(data, "unsupported_media_type", 415, settings)


def test_real_gif_and_tiff_refused(photo, settings):
    expect_error(encode(photo, "GIF"), "unsupported_media_type", 415, settings)
    expect_error(encode(photo, "TIFF"), "unsupported_media_type", 415, settings)


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {}), ("BMP", {}),
                                    ("JPEG2000", {}), ("JPEG2000", {"no_jp2": True})])
def test_truncated_is_undecodable(photo, settings, fmt, kw):
    data = encode(photo, fmt, **kw)
    for cut in (len(data) // 2, 40):
        expect_error(data[:cut], "image_undecodable", 400, settings)


def test_magic_only_is_undecodable(settings):
    for data in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"\xff\x4f\xff\x51"):
        expect_error(data, "image_undecodable", 400, settings)


def test_corrupt_body_is_undecodable(photo, settings):
    data = bytearray(encode(photo, "PNG"))
    data[100:200] = b"\x00" * 100   # inside the first IDAT: bad CRC / bad zlib stream
    expect_error(bytes(data), "image_undecodable", 400, settings)


def test_truncated_refused_even_if_pillow_was_told_to_pad(photo, settings, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(photo, "JPEG", quality=90)
    expect_error(data[: len(data) // 2], "image_undecodable", 400, settings)
