"""SFace (OpenCV Zoo face_recognition_sface_2021dec) in PyTorch, read from our ONNX graph.

    net = from_onnx()                    # models/repository/sface/2/sface.onnx by default
    emb = net(preprocess(chips))         # chips: (N,112,112,3) RGB, uint8 or float 0..255
    to_onnx(net, "sface.onnx")           # back to the tower contract

The graph (opset 21, 27 Conv + 29 BatchNormalization + 27 PRelu, no residual adds) is a
MobileNet-style chain at 112x112 input:

    (x - 127.5) * 0.0078125  (RGB, NCHW)
    conv_1     3x3/1,  3 -> 32, BN, PReLU                                 112x112
    conv_k     k = 2..14: depthwise 3x3 (stride 2 at k = 3, 5, 7, 13), BN, PReLU,
               then pointwise 1x1, BN, PReLU; widths 64, 128, 128, 256, 256, 512 x 6,
               1024 x 2                                                    -> 1024x7x7
    bn1        BN on the 1024x7x7 map; Dropout(0.4) (identity at inference)
    pre_fc1    Flatten (NCHW order) + Gemm 50176 -> 128; fc1: BN on the 128 outputs

Batch normalisation is FOLDED, not kept: every Conv+BN pair becomes one convolution with a bias,
and bn1 (before the flatten) and fc1 (after the Gemm) are folded into the one linear layer of
the head. The module therefore has no BatchNorm and no Dropout, no buffers and no batch
statistics: ``train()`` and ``eval()`` compute the same function, and a batch of chips alone
cannot move anything but the parameters the optimiser steps. Folding is done in float64 from
the graph's float32 weights (the int8 block-quantised weights of the committed graph are first
dequantised by ``export_sface.fold_int8bq``, the arithmetic the graph itself does).

Interface for training:

* ``forward(x)`` takes NCHW float32 **in the network's own normalised range**, RGB,
  ``(pixel - 127.5) * 0.0078125`` (about -1..1); ``preprocess(images)`` makes that from
  NHWC uint8 or float 0..255 (numpy or torch, on the tensor's device). Horizontal flips
  (flip-averaged targets) are ``x.flip(-1)`` on the NCHW tensor. ``SFaceTower(net)`` is the
  contract form (NHWC 0..255 in), what ``to_onnx`` exports.
* ``STAGES`` / ``net.stages()``: ordered input -> output, ``stem`` (conv_1, conv_2: 112x112),
  ``block1`` (conv_3, conv_4: 56x56), ``block2`` (conv_5, conv_6: 28x28), ``block3`` (conv_7
  .. conv_12: 14x14), ``block4`` (conv_13, conv_14: 7x7), ``head`` (flatten + linear, where
  bn1 and fc1 are folded). ``net.stage_parameters()`` and ``net.param_groups(lr, multipliers)``
  give per-stage optimiser groups; ``forward_features(x, upto)`` / ``forward_from(stage, f)``
  split the network at a stage; ``freeze_upto(stage)``.
* ``net.pretrained_state()``: a copy of the parameters as loaded (CPU), for the pull towards
  the pretrained weights.

Parity with the ONNX graph on real aligned LFW faces, and the round trip through ``to_onnx``,
is tests/models/build/test_sface_torch.py.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ONNX = ROOT / "models" / "repository" / "sface" / "2" / "sface.onnx"
SIZE = 112
DIM = 128
MEAN = 127.5        # the graph's _minusscalar0; checked on load
SCALE = 0.0078125   # the graph's _mulscalar0; checked on load
STAGES = ("stem", "block1", "block2", "block3", "block4", "head")
# the depthwise-separable units conv_2..conv_14: (pointwise width, depthwise stride, stage)
UNITS = ([(64, 1, "stem"), (128, 2, "block1"), (128, 1, "block1"), (256, 2, "block2"),
          (256, 1, "block2"), (512, 2, "block3")] + [(512, 1, "block3")] * 5
         + [(1024, 2, "block4"), (1024, 1, "block4")])
FEATURES = 1024 * 7 * 7


class SFaceGraphError(ValueError):
    """The ONNX graph is not the SFace graph this module reproduces."""


# ----------------------------------------------------------------------------------------
# modules


class ConvPReLU(nn.Module):
    """Convolution (BatchNormalization folded into its weight and bias), then PReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=True)
        self.act = nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def preprocess(images) -> torch.Tensor:
    """(N,112,112,3) or (112,112,3) RGB, uint8 or float in 0..255, numpy or torch -> float32
    NCHW (N,3,112,112) in the network's range, ``(x - 127.5) * 0.0078125``. A torch input stays
    on its device (and keeps its graph)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC images (N,H,W,3) in 0..255, got shape {tuple(x.shape)}")
    return (x.permute(0, 3, 1, 2).to(torch.float32) - MEAN) * SCALE


class SFaceNet(nn.Module):
    """SFace's MobileFaceNet with batch norm folded. ``forward``: NCHW float32 (N,3,112,112)
    in the normalised range (see ``preprocess``) -> raw (N,128) embedding, not unit length."""

    def __init__(self):
        super().__init__()
        parts: dict[str, OrderedDict] = {s: OrderedDict() for s in STAGES[:-1]}
        parts["stem"]["conv_1"] = ConvPReLU(3, 32, 3)
        in_ch = 32
        for k, (out_ch, stride, stage) in enumerate(UNITS, start=2):
            parts[stage][f"conv_{k}_dw"] = ConvPReLU(in_ch, in_ch, 3, stride, groups=in_ch)
            parts[stage][f"conv_{k}"] = ConvPReLU(in_ch, out_ch, 1)
            in_ch = out_ch
        body = {s: nn.Sequential(m) for s, m in parts.items()}
        body["head"] = nn.Sequential(OrderedDict(flatten=nn.Flatten(1), fc=nn.Linear(FEATURES, DIM)))
        self.body = nn.ModuleDict(body)
        self._pretrained: dict[str, torch.Tensor] | None = None

    # -- stages ---------------------------------------------------------------------------

    def stages(self) -> OrderedDict[str, nn.Module]:
        """The stages from input to output (``STAGES``), name -> module."""
        return OrderedDict((s, self.body[s]) for s in STAGES)

    def stage_parameters(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Each stage's parameters, input to output; every parameter is in exactly one."""
        return [(s, list(m.parameters())) for s, m in self.stages().items()]

    def param_groups(self, lr: float, multipliers: dict[str, float] | None = None) -> list[dict]:
        """Optimiser groups, one per stage: ``lr * multipliers.get(stage, 1)``; each group also
        carries its ``name``. Parameters with ``requires_grad`` off are left out."""
        mult = multipliers or {}
        unknown = set(mult) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; stages: {STAGES}")
        groups = []
        for name, params in self.stage_parameters():
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": lr * float(mult.get(name, 1.0))})
        return groups

    @staticmethod
    def _index(stage: str | int) -> int:
        """A stage's position in ``STAGES``, by name or index."""
        i = stage if isinstance(stage, int) else STAGES.index(stage) if stage in STAGES else -1
        if not 0 <= i < len(STAGES):
            raise ValueError(f"unknown stage {stage!r}; stages: {STAGES} (or 0..{len(STAGES) - 1})")
        return i

    def _run(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for i in range(first, last + 1):
            x = self.body[STAGES[i]](x)
        return x

    def forward_features(self, x: torch.Tensor, upto: str | int = "block4") -> torch.Tensor:
        """Normalised NCHW input -> the activation after stage ``upto``."""
        return self._run(x, 0, self._index(upto))

    def forward_from(self, stage: str | int, feats: torch.Tensor) -> torch.Tensor:
        """The activation after ``stage`` -> the (N,128) embedding."""
        return self._run(feats, self._index(stage) + 1, len(STAGES) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 0, len(STAGES) - 1)

    def freeze_upto(self, stage: str | int) -> None:
        """Gradients off for the stages up to and including ``stage``, on for the rest."""
        last = self._index(stage)
        for i, (_, params) in enumerate(self.stage_parameters()):
            for p in params:
                p.requires_grad_(i > last)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters as ``from_onnx`` loaded them (CPU float32), by name."""
        if self._pretrained is None:
            raise RuntimeError("no pretrained state: this SFaceNet was not made by from_onnx")
        return {k: v.clone() for k, v in self._pretrained.items()}


class SFaceTower(nn.Module):
    """The tower contract around a net: NHWC float32 (N,112,112,3) RGB 0..255 -> (N,128)."""

    def __init__(self, net: SFaceNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(preprocess(image))


# ----------------------------------------------------------------------------------------
# reading the ONNX graph


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bn_affine(values: dict, node) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization (inference) as y = s * x + t, float64."""
    gamma, beta, mean, var = (values[i].astype(np.float64) for i in node.input[1:5])
    s = gamma / np.sqrt(var + float(_attrs(node).get("epsilon", 1e-5)))
    return s, beta - mean * s


def _scalar(values: dict, node, want: float) -> None:
    got = values.get(node.input[1])
    if got is None or got.size != 1 or abs(float(got.reshape(-1)[0]) - want) > 1e-9:
        raise SFaceGraphError(f"{node.op_type} {node.name}: constant {got}, expected {want}")


class _Chain:
    """The graph's nodes in order, each checked to read the previous node's output."""

    def __init__(self, graph):
        self.nodes = [n for n in graph.node if n.op_type != "Constant"]
        self.i = 0
        self.cur = graph.input[0].name

    def take(self, op: str):
        if self.i >= len(self.nodes):
            raise SFaceGraphError(f"graph ends where {op} was expected")
        node = self.nodes[self.i]
        if node.op_type != op or node.input[0] != self.cur:
            raise SFaceGraphError(f"node {self.i} is {node.op_type} {node.name} on {list(node.input)[:1]}, "
                                  f"expected {op} on {self.cur}")
        self.i += 1
        self.cur = node.output[0]
        return node


def _conv_bn_prelu(chain: _Chain, values: dict, conv: nn.Conv2d, name: str) -> dict[str, np.ndarray]:
    node = chain.take("Conv")
    a = _attrs(node)
    want = {"strides": list(conv.stride), "group": conv.groups, "pads": [conv.padding[0]] * 4,
            "kernel_shape": list(conv.kernel_size), "dilations": [1, 1]}
    defaults = {"strides": [1, 1], "group": 1, "pads": [0, 0, 0, 0], "dilations": [1, 1]}
    got = {k: a.get(k, defaults.get(k)) for k in want}
    if got != want or not node.name.startswith(name + "_"):
        raise SFaceGraphError(f"Conv {node.name}: {got}, expected {name} with {want}")
    w = values[node.input[1]].astype(np.float64)
    b = values[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    s, t = _bn_affine(values, chain.take("BatchNormalization"))
    slope = values[chain.take("PRelu").input[1]]
    return {"conv.weight": w * s[:, None, None, None], "conv.bias": b * s + t,
            "act.weight": slope.reshape(-1)}


def read_onnx(path: str | Path = DEFAULT_ONNX) -> dict[str, np.ndarray]:
    """The graph's weights as an ``SFaceNet`` state dict (float32 numpy), batch norm folded.
    Takes our tower graph (NHWC ``image``) or the original NCHW graph, int8bq or fp32."""
    import onnx
    from onnx import numpy_helper

    from models.build.export_sface import fold_int8bq

    proto = onnx.load(str(path))
    if any(n.op_type == "DequantizeLinear" for n in proto.graph.node):
        fold_int8bq(proto)
    g = proto.graph
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
    chain = _Chain(g)
    if chain.nodes and chain.nodes[0].op_type == "Transpose":
        if list(_attrs(chain.take("Transpose"))["perm"]) != [0, 3, 1, 2]:
            raise SFaceGraphError("the input Transpose is not NHWC -> NCHW")
    _scalar(values, chain.take("Sub"), MEAN)
    _scalar(values, chain.take("Mul"), SCALE)

    state: dict[str, np.ndarray] = {}
    skeleton = SFaceNet()
    for stage in STAGES[:-1]:
        for name, unit in skeleton.body[stage].named_children():
            for k, v in _conv_bn_prelu(chain, values, unit.conv, name).items():
                state[f"body.{stage}.{name}.{k}"] = v

    s1, t1 = _bn_affine(values, chain.take("BatchNormalization"))        # bn1, per channel
    node = chain.take("Dropout")
    if len(node.input) > 2 and node.input[2] and bool(values.get(node.input[2], False)):
        raise SFaceGraphError("Dropout in training mode")
    if _attrs(chain.take("Flatten")).get("axis", 1) != 1:
        raise SFaceGraphError("Flatten axis is not 1")
    gemm = chain.take("Gemm")
    a = _attrs(gemm)
    if (a.get("transA", 0), a.get("transB", 0), a.get("alpha", 1.0), a.get("beta", 1.0)) != (0, 1, 1.0, 1.0):
        raise SFaceGraphError(f"Gemm {gemm.name}: {a}, expected y = x @ W.T + b")
    w = values[gemm.input[1]].astype(np.float64)
    b = values[gemm.input[2]].astype(np.float64)
    if w.shape != (DIM, FEATURES):
        raise SFaceGraphError(f"Gemm weight {w.shape}, expected {(DIM, FEATURES)}")
    s2, t2 = _bn_affine(values, chain.take("BatchNormalization"))        # fc1
    if chain.i != len(chain.nodes) or chain.cur != g.output[0].name:
        raise SFaceGraphError(f"graph continues after fc1 ({len(chain.nodes) - chain.i} nodes)")
    # flatten is NCHW: feature c*49 + p carries channel c, so bn1's s1, t1 repeat 49 times
    s1, t1 = np.repeat(s1, FEATURES // s1.size), np.repeat(t1, FEATURES // t1.size)
    w_fold = (w * s1[None, :]) * s2[:, None]
    b_fold = (b + w @ t1) * s2 + t2
    state["body.head.fc.weight"], state["body.head.fc.bias"] = w_fold, b_fold
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def from_onnx(path: str | Path = DEFAULT_ONNX) -> SFaceNet:
    """An ``SFaceNet`` (eval mode, CPU) with the weights of the SFace ONNX graph at ``path``;
    raises ``SFaceGraphError`` when the graph is not that network."""
    state = {k: torch.from_numpy(v) for k, v in read_onnx(path).items()}
    net = SFaceNet()
    expected = net.state_dict()
    if set(state) != set(expected):
        raise SFaceGraphError(f"weights differ from the module: {sorted(set(state) ^ set(expected))[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SFaceGraphError(f"{k}: {tuple(v.shape)} in the graph, {tuple(expected[k].shape)} in the module")
    net.load_state_dict(state, strict=True)
    net._pretrained = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return net.eval()


def to_onnx(net: SFaceNet, path: str | Path) -> Path:
    """Export ``net`` as a tower: input ``image`` float32 NHWC (N,112,112,3) RGB 0..255,
    output ``embedding`` float32 (N,128), dynamic batch (models/repository/sface/2's contract)."""
    from models.build.export_towers import export_onnx

    tower = SFaceTower(copy.deepcopy(net).cpu().eval())
    tower.net._pretrained = None
    with warnings.catch_warnings():
        # the TorchScript exporter (no onnxscript needed) warns about its own deprecation
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        export_onnx(tower, Path(path), size=SIZE)
    return Path(path)
