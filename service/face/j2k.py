"""JPEG 2000 main-header facts, read from the codestream bytes before OpenJPEG sees them.

Pillow reads a JPEG 2000 file's size lazily but not how it is tiled: a 76-byte codestream can
declare 65,520 tiles, and OpenJPEG allocates per tile. `read_header` walks the JP2 boxes to the
codestream (or takes a raw J2K codestream), parses SIZ (size, tiling, components and their bit
depth) and COD (wavelet decomposition levels, which bound how far decoding can be reduced).
ValueError when the header is missing or malformed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

SOC, SIZ, COD, SOT = 0xFF4F, 0xFF51, 0xFF52, 0xFF90
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass(frozen=True)
class J2KHeader:
    width: int
    height: int
    tiles: int
    components: int
    max_depth: int          # bits per sample, the deepest component
    levels: int             # wavelet decomposition levels (0: no COD marker seen)


def _codestream_offset(data: bytes) -> int:
    if not data.startswith(JP2_SIGNATURE):
        return 0
    pos = 0
    while pos + 8 <= len(data):
        length, box = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                break
            length = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif length == 0:
            length = len(data) - pos
        if box == b"jp2c":
            return pos + header
        if length < header:
            break
        pos += length
    raise ValueError("no codestream box")


def read_header(data: bytes) -> J2KHeader:
    pos = _codestream_offset(data)
    if len(data) < pos + 42 or struct.unpack_from(">HH", data, pos) != (SOC, SIZ):
        raise ValueError("no SIZ marker")
    lsiz = struct.unpack_from(">H", data, pos + 4)[0]
    (_rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz,
     csiz) = struct.unpack_from(">HIIIIIIIIH", data, pos + 6)
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz or len(data) < pos + 4 + lsiz:
        raise ValueError("malformed SIZ marker")
    if xsiz <= xosiz or ysiz <= yosiz or xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise ValueError("malformed image or tile geometry")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    depths = [(data[pos + 42 + 3 * i] & 0x7F) + 1 for i in range(csiz)]
    levels = 0
    pos += 4 + lsiz
    while pos + 4 <= len(data):   # the rest of the main header, up to the first tile
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker == SOT or marker >> 8 != 0xFF or length < 2:
            break
        if marker == COD and pos + 9 < len(data):
            levels = data[pos + 9]
        pos += 2 + length
    return J2KHeader(xsiz - xosiz, ysiz - yosiz, tiles, csiz, max(depths), levels)
