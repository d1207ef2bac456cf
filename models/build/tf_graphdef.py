"""A minimal reader for TensorFlow frozen graphs (``GraphDef`` .pb) without TensorFlow.

Decodes the protobuf wire format directly, for the handful of messages a frozen inference
graph uses (tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape}.proto):

* ``GraphDef``: ``node`` = 1 (repeated ``NodeDef``);
* ``NodeDef``: ``name`` = 1, ``op`` = 2, ``input`` = 3 (repeated), ``device`` = 4,
  ``attr`` = 5 (map<string, AttrValue>: entries with key = 1, value = 2);
* ``AttrValue`` (oneof): ``list`` = 1, ``s`` = 2, ``i`` = 3, ``f`` = 4, ``b`` = 5,
  ``type`` = 6, ``shape`` = 7, ``tensor`` = 8;
* ``AttrValue.ListValue``: ``s`` = 2, ``i`` = 3, ``f`` = 4, ``b`` = 5, ``type`` = 6 (numeric
  ones packed or not);
* ``TensorProto``: ``dtype`` = 1, ``tensor_shape`` = 2, ``tensor_content`` = 4 (raw
  little-endian), ``float_val`` = 5, ``double_val`` = 6, ``int_val`` = 7, ``int64_val`` = 10,
  ``bool_val`` = 11 (a single value is broadcast to the shape, as TF does);
* ``TensorShapeProto``: ``dim`` = 2 (``size`` = 1), ``unknown_rank`` = 3.

Other fields are skipped. Only what the converters need is decoded; this is not a general
protobuf library.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# tensorflow/core/framework/types.proto
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
          9: np.int64, 10: np.bool_, 19: np.float16}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes):
    """Yield (field_number, wire_type, value) for one message; value is an int for varints,
    bytes for length-delimited fields, raw bytes for fixed32/fixed64."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val = buf[pos:pos + n]
            pos += n
        elif wt == 5:
            val = buf[pos:pos + 4]
            pos += 4
        elif wt == 1:
            val = buf[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} (field {num})")
        yield num, wt, val


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_varints(val, wt) -> list[int]:
    if wt == 0:
        return [_signed(val)]
    out, pos = [], 0
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(_signed(v))
    return out


def _packed_fixed(val, wt, fmt: str, size: int) -> list:
    if wt == 2:
        return list(struct.unpack(f"<{len(val) // size}{fmt}", val))
    return [struct.unpack(f"<{fmt}", val)[0]]


def parse_shape(buf: bytes) -> list[int] | None:
    dims, unknown = [], False
    for num, _, val in fields(buf):
        if num == 2:
            size = 0
            for n2, _, v2 in fields(val):
                if n2 == 1:
                    size = _signed(v2)
            dims.append(size)
        elif num == 3:
            unknown = bool(val)
    return None if unknown else dims


def parse_tensor(buf: bytes) -> np.ndarray:
    dtype, shape, content = 1, [], None
    vals: list = []
    for num, wt, val in fields(buf):
        if num == 1:
            dtype = val
        elif num == 2:
            shape = parse_shape(val) or []
        elif num == 4:
            content = val
        elif num == 5:
            vals += _packed_fixed(val, wt, "f", 4)
        elif num == 6:
            vals += _packed_fixed(val, wt, "d", 8)
        elif num in (7, 10, 11, 13):
            vals += _packed_varints(val, wt)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    np_dtype = DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    elif dtype == 19:  # half_val holds the raw 16-bit patterns in int32s
        arr = np.asarray(vals, dtype=np.uint16).view(np.float16)
    else:
        arr = np.asarray(vals, dtype=np_dtype)
    if arr.size == 1 and count != 1:
        arr = np.full(count, arr.reshape(()), dtype=np_dtype)
    if arr.size == 0 and count:
        arr = np.zeros(count, dtype=np_dtype)
    return arr.reshape(shape)


def parse_attr(buf: bytes):
    for num, wt, val in fields(buf):
        if num == 1:
            items: list = []
            for n2, w2, v2 in fields(val):
                if n2 == 2:
                    items.append(bytes(v2).decode("utf-8", "replace"))
                elif n2 in (3, 5, 6):
                    items += _packed_varints(v2, w2)
                elif n2 == 4:
                    items += _packed_fixed(v2, w2, "f", 4)
            return items
        if num == 2:
            return bytes(val).decode("utf-8", "replace")
        if num in (3, 6):
            return _signed(val)
        if num == 4:
            return struct.unpack("<f", val)[0]
        if num == 5:
            return bool(val)
        if num == 7:
            return parse_shape(val)
        if num == 8:
            return parse_tensor(val)
    return None


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attr: dict = field(default_factory=dict)


def parse_node(buf: bytes) -> Node:
    node = Node("", "")
    for num, _, val in fields(buf):
        if num == 1:
            node.name = bytes(val).decode()
        elif num == 2:
            node.op = bytes(val).decode()
        elif num == 3:
            node.inputs.append(bytes(val).decode())
        elif num == 5:
            key, value = "", None
            for n2, _, v2 in fields(val):
                if n2 == 1:
                    key = bytes(v2).decode()
                elif n2 == 2:
                    value = parse_attr(v2)
            node.attr[key] = value
    return node


def read_graph(path: Path | str) -> dict[str, Node]:
    """All nodes of a frozen GraphDef, by name, in file order."""
    buf = memoryview(Path(path).read_bytes())
    nodes: dict[str, Node] = {}
    for num, _, val in fields(buf):
        if num == 1:
            node = parse_node(val)
            nodes[node.name] = node
    return nodes


def input_name(ref: str) -> str:
    """``'^ctrl'`` / ``'name:1'`` -> ``'name'``."""
    return ref.lstrip("^").split(":")[0]
