"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

Two parts:

* :func:`parse_dat` reads dlib's ``serialize`` stream of the network and returns its layers
  bottom-up as :class:`DlibLayer` records (kind, hyper-parameters, weights as numpy arrays).
* :class:`DlibResNet` is a ``torch.nn.Module`` with the same architecture; ``from_dat`` loads
  it from the file and checks the file against the architecture layer by layer.

The stream format (dlib/dnn/core.h, layers.h, input.h, loss.h, tensor.h, serialize.h):

* integers: one control byte (low nibble = number of bytes that follow, bit 7 = negative),
  then the magnitude little-endian; strings: an integer length, then the bytes; bools: the
  ASCII byte ``'0'``/``'1'``; float/double scalars: two integers, mantissa and exponent
  (value = mantissa * 2**exponent);
* tensors: int version 2, then num_samples, k, nr, nc, then the values as raw little-endian
  float32; alias tensors (views into a layer's ``params``): int version 1 and the 4 dims;
* a network nests: ``add_loss_layer`` writes its version, its loss details, then its
  sub-network; ``add_layer`` writes its version, its sub-network (recursively, down to the
  input layer), then its own details and state (3 bools and 3 tensors; the one right above
  the input, when it is version 3, also its sample_expansion_factor); tag and skip layers
  write only a version and their sub-network. The file therefore starts with the loss and a
  run of version numbers (2 per ``add_layer``, 1 per tag/skip), then the input layer, then
  the layer details from the bottom of the network to the top.

Tag and skip ids are template parameters and are not stored, so the residual wiring is
taken from the architecture dlib trained (dlib/examples/dnn_face_recognition_ex.cpp)::

    block<N,stride>  = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUB>>>>>
    ares<N>          = relu<add_prev1<block<N,1,tag1<SUB>>>>
    ares_down<N>     = relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUB>>>>>>>
    level0 = ares_down<256>
    level1 = ares<256,ares<256,ares_down<256>>>
    level2 = ares<128,ares<128,ares_down<128>>>
    level3 = ares<64,ares<64,ares<64,ares_down<64>>>>
    level4 = ares<32,ares<32,ares<32>>>
    net    = loss_metric<fc_no_bias<128,avg_pool_everything<level0<level1<level2<level3<level4<
             max_pool<3,3,2,2,relu<affine<con<32,7,7,2,2,input_rgb_image_sized<150>>>>>>>>>>>>>

and the generated wrapper/layer sequence is checked against the file.

dlib semantics reproduced here:

* input: RGB planes, ``(pixel - mean[c]) / 256`` with the means stored in the file
  (122.782, 117.001, 104.298);
* con/pool padding defaults: ``stride != 1 ? 0 : size/2`` (so the 7x7/2 stem conv, the
  3x3/2 convs and all pools here have no padding; output = floor((in - k) / s) + 1);
* ``affine`` (batch norm folded at test time): per channel ``gamma * x + beta``;
* ``add_prev``: output has the max of both inputs' shapes, each input is added into the
  top-left corner (missing channels/rows/cols count as zero). This matters twice: the
  32->64 channel step and the 8x8 -> 3x3 (conv) vs 4x4 (avg_pool) step of level1;
* ``avg_pool_everything`` = global mean; ``fc_no_bias``: ``x @ W`` with W (in, out).

The output is dlib's 128-D descriptor as dlib computes it (not re-normalised).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DAT = "dlib_face_recognition_resnet_model_v1.dat"
INPUT_SIZE = 150
DLIB_MEANS = (122.782, 117.001, 104.298)  # what the .dat stores; checked on load
STAGES = ("stem", "level4", "level3", "level2", "level1", "level0")


def default_dat_path() -> Path:
    """The .dat that ships in the face-recognition-models(-ng) package."""
    import face_recognition_models  # noqa: PLC0415 (optional dependency)

    return Path(face_recognition_models.__file__).resolve().parent / "models" / DEFAULT_DAT


# ----------------------------------------------------------------------------------------
# stream primitives


class DatFormatError(ValueError):
    """The stream does not match dlib's serialization format or the expected network."""


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def eof(self) -> bool:
        return self.pos >= len(self.data)

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DatFormatError(f"unexpected end of stream at byte {self.pos} (wanted {n})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        ctrl = self._take(1)[0]
        if ctrl & 0x70:
            raise DatFormatError(f"bad integer control byte 0x{ctrl:02x} at byte {self.pos - 1}")
        size = ctrl & 0x0F
        if not 1 <= size <= 8:
            raise DatFormatError(f"bad integer size {size} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if ctrl & 0x80 else value

    def real(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        # dlib encodes inf/nan with reserved exponents (>= 32000 in magnitude); none expected
        if abs(exponent) >= 32000:
            raise DatFormatError(f"non-finite float in stream at byte {self.pos}")
        return float(mantissa) * 2.0 ** exponent

    def str(self) -> str:
        n = self.int()
        return bytes(self._take(n)).decode("ascii")

    def bool(self) -> bool:
        ch = bytes(self._take(1))
        if ch not in (b"0", b"1"):
            raise DatFormatError(f"bad bool byte {ch!r} at byte {self.pos - 1}")
        return ch == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise DatFormatError(f"tensor version {version} != 2 at byte {self.pos}")
        dims = tuple(self.int() for _ in range(4))
        count = int(np.prod(dims))
        values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise DatFormatError(f"alias_tensor version {version} != 1 at byte {self.pos}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------
# layers


@dataclass
class DlibLayer:
    """One layer as stored: ``kind`` is dlib's serialization tag (``con_4``, ``affine_`` ...)."""

    kind: str
    attrs: dict = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:  # con_4 -> con, avg_pool_2 -> avg_pool, fc_2 -> fc ...
        base = self.kind.rstrip("0123456789")
        return base[:-1] if base.endswith("_") else base


@dataclass
class DlibNet:
    """Parsed file: the loss, the input layer, the add_layers bottom-up, the wrapper versions."""

    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]
    wrapper_versions: list[int]  # top-down, as in the file: 2/3 = add_layer, 1 = tag/skip


def _split(params: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    flat = params.reshape(-1)
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[offset:offset + n].reshape(shape).copy())
        offset += n
    if offset != flat.size:
        raise DatFormatError(f"params hold {flat.size} values, aliases use {offset}")
    return out


def _read_details(r: _Reader, kind: str) -> DlibLayer:
    layer = DlibLayer(kind)
    a = layer.attrs
    if kind == "input_rgb_image_sized":
        a["means"] = (r.real(), r.real(), r.real())
        a["nr"], a["nc"] = r.int(), r.int()
    elif kind == "con_4":
        params = r.tensor()
        a["num_filters"], a["nr"], a["nc"] = r.int(), r.int(), r.int()
        a["stride"] = (r.int(), r.int())
        a["padding"] = (r.int(), r.int())
        filters, biases = r.alias(), r.alias()
        for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            a[key] = r.real()
        w, b = _split(params, [filters, biases])
        layer.params = {"weight": w, "bias": b.reshape(-1)}
    elif kind == "affine_":
        params = r.tensor()
        gamma, beta = r.alias(), r.alias()
        a["mode"] = r.int()  # 0 = CONV_MODE (per channel), 1 = FC_MODE
        g, b = _split(params, [gamma, beta])
        layer.params = {"gamma": g, "beta": b}
    elif kind in ("relu_", "add_prev_"):
        pass
    elif kind in ("max_pool_2", "avg_pool_2"):
        a["nr"], a["nc"] = r.int(), r.int()
        a["stride"] = (r.int(), r.int())
        a["padding"] = (r.int(), r.int())
    elif kind == "fc_2":
        a["num_outputs"], a["num_inputs"] = r.int(), r.int()
        params = r.tensor()
        weights, biases = r.alias(), r.alias()
        a["bias_mode"] = r.int()  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
        for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            a[key] = r.real()
        shapes = [weights] + ([biases] if int(np.prod(biases)) else [])
        parts = _split(params, shapes)
        layer.params = {"weight": parts[0].reshape(a["num_inputs"], a["num_outputs"])}
        if len(parts) > 1:
            layer.params["bias"] = parts[1].reshape(-1)
    elif kind == "loss_metric_2":
        a["margin"], a["dist_thresh"] = r.real(), r.real()
    else:
        raise DatFormatError(f"unsupported layer tag {kind!r}")
    return layer


def parse_dat(path: str | Path) -> DlibNet:
    """Parse a serialized dlib network of the layer kinds used by the face ResNet."""
    r = _Reader(Path(path).read_bytes())
    if r.int() != 1:
        raise DatFormatError("expected add_loss_layer version 1 at the start")
    loss = _read_details(r, r.str())
    versions: list[int] = []
    while True:
        start = r.pos
        v = r.int()
        if v not in (1, 2, 3):
            r.pos = start  # that int was the length of the input layer's name
            break
        versions.append(v)
    inp = _read_details(r, r.str())
    layers: list[DlibLayer] = []
    while not r.eof():
        layer = _read_details(r, r.str())
        layer.attrs["state"] = (r.bool(), r.bool(), r.bool())
        for _ in range(3):  # x_grad, cached_output, params_grad/grad_final: unused here
            r.tensor()
        if not layers and versions and versions[-1] == 3:
            # the add_layer right above the input layer, version 3, ends with its
            # sample_expansion_factor (unsigned int); version 2 did not store it
            layer.attrs["sample_expansion_factor"] = r.int()
        layers.append(layer)
    return DlibNet(loss=loss, input=inp, layers=layers, wrapper_versions=versions)


# ----------------------------------------------------------------------------------------
# expected architecture (top-down wrapper sequence, bottom-up layer sequence)

# (kind, channels, stride) for each residual unit, bottom-up
UNITS: list[tuple[str, int, int]] = (
    [("ares", 32, 1)] * 3                                   # level4
    + [("ares_down", 64, 2)] + [("ares", 64, 1)] * 3       # level3
    + [("ares_down", 128, 2)] + [("ares", 128, 1)] * 2     # level2
    + [("ares_down", 256, 2)] + [("ares", 256, 1)] * 2     # level1
    + [("ares_down", 256, 2)]                              # level0
)
UNIT_STAGE = ["level4"] * 3 + ["level3"] * 4 + ["level2"] * 3 + ["level1"] * 3 + ["level0"]


def expected_layout() -> tuple[list[int], list[tuple[str, dict]]]:
    """(wrapper versions top-down, layers bottom-up as (name, attrs to check))."""
    layers: list[tuple[str, dict]] = [
        ("con", {"num_filters": 32, "nr": 7, "nc": 7, "stride": (2, 2), "padding": (0, 0)}),
        ("affine", {}), ("relu", {}),
        ("max_pool", {"nr": 3, "nc": 3, "stride": (2, 2), "padding": (0, 0)}),
    ]
    wrappers_bottom_up = [2, 2, 2, 2]  # con, affine, relu, max_pool
    for kind, n, s in UNITS:
        pad = (0, 0) if s == 2 else (1, 1)
        block = [
            ("con", {"num_filters": n, "nr": 3, "nc": 3, "stride": (s, s), "padding": pad}),
            ("affine", {}), ("relu", {}),
            ("con", {"num_filters": n, "nr": 3, "nc": 3, "stride": (1, 1), "padding": (1, 1)}),
            ("affine", {}),
        ]
        if kind == "ares":  # tag1, block(5), add_prev1, relu
            layers += block + [("add_prev", {}), ("relu", {})]
            wrappers_bottom_up += [1] + [2] * 5 + [2, 2]
        else:  # tag1, block(5), tag2, skip1, avg_pool, add_prev2, relu
            layers += block + [("avg_pool", {"nr": 2, "nc": 2, "stride": (2, 2), "padding": (0, 0)}),
                               ("add_prev", {}), ("relu", {})]
            wrappers_bottom_up += [1] + [2] * 5 + [1, 1] + [2, 2, 2]
    layers += [("avg_pool", {"nr": 0, "nc": 0, "stride": (1, 1), "padding": (0, 0)}),
               ("fc", {"num_outputs": 128, "num_inputs": 256, "bias_mode": 1})]
    wrappers_bottom_up += [2, 2]
    return wrappers_bottom_up[::-1], layers


def check_layout(net: DlibNet) -> None:
    versions, layers = expected_layout()
    if net.loss.kind != "loss_metric_2":
        raise DatFormatError(f"loss is {net.loss.kind}, expected loss_metric_2")
    if net.input.kind != "input_rgb_image_sized" or (net.input.attrs["nr"], net.input.attrs["nc"]) != (150, 150):
        raise DatFormatError(f"input is {net.input.kind} {net.input.attrs}, expected input_rgb_image_sized<150>")
    got = list(net.wrapper_versions)
    if got and got[-1] == 3:  # the bottom add_layer is version 2 or 3 depending on dlib's age
        got[-1] = 2
    if got != versions:
        raise DatFormatError("layer nesting (add_layer/tag/skip versions) differs from the dlib face ResNet")
    if len(net.layers) != len(layers):
        raise DatFormatError(f"{len(net.layers)} layers in file, expected {len(layers)}")
    for i, (got, (name, attrs)) in enumerate(zip(net.layers, layers)):
        if got.name != name:
            raise DatFormatError(f"layer {i}: {got.kind}, expected {name}")
        for key, value in attrs.items():
            if got.attrs.get(key) != value:
                raise DatFormatError(f"layer {i} ({name}): {key}={got.attrs.get(key)}, expected {value}")
        if name == "affine" and got.attrs["mode"] != 0:
            raise DatFormatError(f"layer {i}: affine in FC mode, expected CONV mode")


# ----------------------------------------------------------------------------------------
# torch modules


class Affine(nn.Module):
    """dlib ``affine_`` in CONV mode: per-channel scale and shift (folded batch norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib ``add_prev``: sum into the max shape, each input anchored top-left, zeros elsewhere."""
    # int(): under ONNX tracing these become constants, which is right because only the batch
    # axis is dynamic (C, H, W are fixed by the 150x150 input); export_towers silences the
    # tracer's warning about it and checks batch 1 and 3 against torch.
    sa = [int(a.shape[i]) for i in (1, 2, 3)]
    sb = [int(b.shape[i]) for i in (1, 2, 3)]
    c, h, w = (max(x, y) for x, y in zip(sa, sb))

    def grow(t: torch.Tensor, s: list[int]) -> torch.Tensor:
        dc, dh, dw = c - s[0], h - s[1], w - s[2]
        return F.pad(t, (0, dw, 0, dh, 0, dc)) if (dc or dh or dw) else t

    return grow(a, sa) + grow(b, sb)


class ResUnit(nn.Module):
    """``ares`` (stride 1, identity shortcut) or ``ares_down`` (stride 2, 2x2/2 avg-pool shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        pad = 0 if stride != 1 else 1  # dlib's default padding rule
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, pad)
        self.aff1 = Affine(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.aff2 = Affine(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.stride != 1 else x
        return F.relu(add_prev(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face ResNet. Input: float32 NHWC (N,150,150,3) RGB in 0..255; output (N,128).

    Stages (``STAGES``): ``stem`` (conv7x7/2, affine, relu, maxpool3x3/2 -> 32x35x35),
    ``level4`` (3 x 32ch -> 32x35x35), ``level3`` (64ch -> 64x17x17), ``level2`` (128ch ->
    128x8x8), ``level1`` (256ch -> 256x4x4), ``level0`` (256ch -> 256x2x2); then the head
    (global mean, fc 256->128 without bias).

    For partial fine-tuning: ``forward_features(x, upto="level2")`` returns the activation
    after that stage (input normalisation included), ``forward_from("level2", feats)`` runs
    the remaining stages and the head on it, so ``forward(x) == forward_from(s,
    forward_features(x, s))`` for every stage ``s``. ``freeze_upto(s)`` turns off gradients
    for the stem and all stages up to and including ``s``.
    """

    def __init__(self, means: Sequence[float] = DLIB_MEANS):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(means), dtype=torch.float32).view(1, 3, 1, 1))
        self.stem_conv = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_aff = Affine(32)
        units: dict[str, list[nn.Module]] = {s: [] for s in STAGES[1:]}
        in_ch = 32
        for (_, ch, stride), stage in zip(UNITS, UNIT_STAGE):
            units[stage].append(ResUnit(in_ch, ch, stride))
            in_ch = ch
        self.stages = nn.ModuleDict({s: nn.Sequential(*m) for s, m in units.items()})
        self.fc = nn.Linear(256, 128, bias=False)

    # -- pieces ---------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC 0..255 RGB -> NCHW, (x - mean) / 256 as dlib's input_rgb_image_sized."""
        return (x.permute(0, 3, 1, 2) - self.mean) / 256.0

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.stem_aff(self.stem_conv(x))), 3, 2)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    @staticmethod
    def _index(stage: str | int) -> int:
        if isinstance(stage, int):
            if not 0 <= stage < len(STAGES):
                raise ValueError(f"stage index {stage} out of range 0..{len(STAGES) - 1}")
            return stage
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
        return STAGES.index(stage)

    def _run(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for i in range(first, last + 1):
            x = self.stem(x) if i == 0 else self.stages[STAGES[i]](x)
        return x

    # -- public ---------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, upto: str | int = "level0") -> torch.Tensor:
        """NHWC image batch -> activation after stage ``upto`` (NCHW)."""
        return self._run(self.normalize(x), 0, self._index(upto))

    def forward_from(self, stage: str | int, feats: torch.Tensor) -> torch.Tensor:
        """Activation after ``stage`` -> (N,128) descriptor."""
        return self.head(self._run(feats, self._index(stage) + 1, len(STAGES) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x, len(STAGES) - 1))

    def freeze_upto(self, stage: str | int) -> None:
        last = self._index(stage)
        mods: list[nn.Module] = [self.stem_conv, self.stem_aff] + [self.stages[s] for s in STAGES[1:last + 1]]
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(False)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_dat(cls, path: str | Path | None = None) -> "DlibResNet":
        net = parse_dat(path or default_dat_path())
        check_layout(net)
        means = net.input.attrs["means"]
        if not np.allclose(means, DLIB_MEANS, atol=1e-3):
            raise DatFormatError(f"input means {means} differ from dlib's {DLIB_MEANS}")
        model = cls(means)
        model.load_dlib_layers(net.layers)
        return model.eval()

    def load_dlib_layers(self, layers: list[DlibLayer]) -> None:
        convs = [l for l in layers if l.name == "con"]
        affs = [l for l in layers if l.name == "affine"]
        fcs = [l for l in layers if l.name == "fc"]
        targets_conv = [self.stem_conv]
        targets_aff = [self.stem_aff]
        for s in STAGES[1:]:
            for unit in self.stages[s]:
                targets_conv += [unit.conv1, unit.conv2]
                targets_aff += [unit.aff1, unit.aff2]
        assert len(convs) == len(targets_conv) and len(affs) == len(targets_aff) and len(fcs) == 1
        with torch.no_grad():
            for src, dst in zip(convs, targets_conv):
                _copy(dst.weight, src.params["weight"])
                _copy(dst.bias, src.params["bias"])
            for src, dst in zip(affs, targets_aff):
                _copy(dst.weight, src.params["gamma"].reshape(-1))
                _copy(dst.bias, src.params["beta"].reshape(-1))
            _copy(self.fc.weight, fcs[0].params["weight"].T)


def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise DatFormatError(f"weight shape {src.shape} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(torch.from_numpy(np.ascontiguousarray(src)))


def _main() -> None:  # quick summary: python -m models.build.dlib_resnet [path]
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else default_dat_path()
    net = parse_dat(path)
    check_layout(net)
    n_params = sum(v.size for l in net.layers for v in l.params.values())
    print(f"{path}: loss {net.loss.kind} {net.loss.attrs}, input {net.input.attrs}")
    print(f"{len(net.layers)} layers, {len(net.wrapper_versions)} wrappers, {n_params} parameters")


if __name__ == "__main__":
    _main()
