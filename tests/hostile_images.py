"""Hostile image files of issue 12, generated (never committed): tiny files that claim or
decode to huge images. Each builder returns bytes; `ALL` names them."""
from __future__ import annotations

import io
import struct
import zlib


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_zeros(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A valid PNG of all-zero pixels, compressed row by row (never the whole raw image in memory)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png16_grey(side: int = 6324) -> bytes:
    """The 78 KB 16-bit grey PNG of 6324x6324 (40 MP, under the old 40 MP cap)."""
    return png_zeros(side, side, 16, 0)


def png_line(width: int = 40_000_000) -> bytes:
    """1 x 40M pixels."""
    return png_zeros(width, 1, 8, 0)


def webp_lossless(width: int = 6000, height: int = 6000) -> bytes:
    """A lossless WebP whose VP8L header claims width x height (the rest from a 1x1 image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = int.from_bytes(data[at + 1:at + 5], "little")
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[at + 1:at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def j2k_codestream(width: int, height: int, tile: tuple[int, int] | None = None, components: int = 1,
                   depth: int = 8, levels: int = 5, pad: int = 0) -> bytes:
    """A raw J2K codestream: SOC, SIZ, COD, QCD, then `pad` bytes of a tile and EOC."""
    tw, th = tile or (width, height)
    siz = struct.pack(">HIIIIIIIIH", 0, width, height, 0, 0, tw, th, 0, 0, components)
    siz += bytes([depth - 1, 1, 1]) * components
    cod = struct.pack(">BBHBBBBBB", 0, 0, 1, 0, levels, 4, 4, 0, 0)
    qcd = struct.pack(">B", 0x40) + bytes([0x48] * (3 * levels + 1))
    body = b"\xff\x4f" + b"\xff\x51" + struct.pack(">H", 2 + len(siz)) + siz
    body += b"\xff\x52" + struct.pack(">H", 2 + len(cod)) + cod
    body += b"\xff\x5c" + struct.pack(">H", 2 + len(qcd)) + qcd
    if pad:
        body += b"\xff\x90" + struct.pack(">HHIBB", 10, 0, 14 + pad, 0, 1) + b"\xff\x93" + b"\x00" * pad
    return body + b"\xff\xd9"


def j2k_big() -> bytes:
    """About 260 bytes claiming 6000x6000 (seconds of OpenJPEG time if decoded)."""
    return j2k_codestream(6000, 6000, pad=160)


def j2k_tiles() -> bytes:
    """About 76 bytes declaring 65,520 tiles (a 4680x1400 image in 10x10 tiles... here 1x1 tiles)."""
    return j2k_codestream(65520, 1, tile=(1, 1), levels=0)


ALL = {"png16_grey_6324": png16_grey, "png_1x40M": png_line, "webp_6000": webp_lossless,
       "j2k_6000": j2k_big, "j2k_65520_tiles": j2k_tiles}
