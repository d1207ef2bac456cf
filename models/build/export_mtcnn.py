"""Export the MTCNN face detector (P-, R- and O-Net) to ONNX for service/face/detect.py.

    python -m models.build.export_mtcnn [--wheel PATH] [--cache DIR] [--out DIR]

Weights: the three torch state dicts that ship inside the `facenet-pytorch` 2.6.0 wheel
(MIT licence), which are the original MTCNN weights (Zhang et al., 2016) as ported by
davidsandberg/facenet. The wheel is fetched with `pip download --no-deps` (nothing is
installed; facenet-pytorch pins an old torch), its SHA-256 is checked against the value
pinned below, and the .pt files are read straight out of the zip.

The network definitions below are our own; attribute names follow the state dicts so they
load with strict=True. facenet-pytorch's conversion already undid the Caffe models' H/W
transposition in the conv kernels, so the nets take an ordinary (un-transposed) RGB image;
only the flatten before the first dense layer keeps the port's (W, H, C) order.

Every exported graph takes `image`: float32 NHWC RGB in 0..255 and normalises inside the
graph ((x - 127.5) / 128), like the tower contract. Outputs:

    pnet.onnx  image (1|N, H, W, 3), H, W >= 12 dynamic -> prob (N, h, w), reg (N, h, w, 4)
    rnet.onnx  image (N, 24, 24, 3)                    -> prob (N,), reg (N, 4)
    onet.onnx  image (N, 48, 48, 3)                    -> prob (N,), reg (N, 4), landmarks (N, 10)

`prob` is the face-class softmax probability; `reg` the box offsets (dx1, dy1, dx2, dy2) as
fractions of the box size; `landmarks` are x1..x5 then y1..y5 as fractions of the box.

This script needs torch and onnx (the `train` extra); the service never imports it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from service.face.artifacts import sha256_file

ROOT = Path(__file__).resolve().parents[2]

PACKAGE = "facenet-pytorch"
PACKAGE_VERSION = "2.6.0"
WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
# sha256 of the wheel as served by PyPI (checked against a fresh `pip download`)
WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
WEIGHT_MEMBERS = {n: f"facenet_pytorch/data/{n}.pt" for n in ("pnet", "rnet", "onet")}
LICENSE_MEMBER = "facenet_pytorch-2.6.0.dist-info/LICENSE.md"

DEFAULT_OUT = ROOT / "models" / "repository" / "mtcnn" / "1"
DEFAULT_CACHE = ROOT / ".cache" / "wheels"
OPSET = 17


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- wheel + weights

def fetch_wheel(cache: Path, wheel: Path | None = None) -> Path:
    """The pinned wheel: an explicit path, else the cache, else `pip download` into the cache."""
    candidates = [Path(wheel)] if wheel else [cache / WHEEL_NAME]
    for path in candidates:
        if path.exists():
            break
    else:
        if wheel:
            raise SystemExit(f"{wheel} does not exist")
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(cache)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        path = cache / WHEEL_NAME
    digest = sha256_file(path)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}; refusing to use it")
    return path


def load_state_dicts(wheel: Path) -> tuple[dict, dict]:
    """{'pnet': state_dict, ...} read from the zip, plus provenance (member sha256s, licence)."""
    import torch

    dicts, members = {}, {}
    with zipfile.ZipFile(wheel) as zf:
        for name, member in WEIGHT_MEMBERS.items():
            raw = zf.read(member)
            members[member] = sha256_bytes(raw)
            dicts[name] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        licence = zf.read(LICENSE_MEMBER).decode("utf-8", "replace")
    return dicts, {"members": members, "licence_text_head": licence.strip().splitlines()[:3]}


# --------------------------------------------------------------------------- networks

def _nets():
    """Torch definitions, built lazily so importing this module does not need torch."""
    import torch
    from torch import nn

    def conv_block(cin, cout, k):
        return nn.Conv2d(cin, cout, kernel_size=k), nn.PReLU(cout)

    def flatten_whc(x):
        # the port flattens (N, C, H, W) feature maps in (W, H, C) order
        return torch.flatten(x.permute(0, 3, 2, 1), 1)

    class PNet(nn.Module):
        """12x12 proposal net, fully convolutional: stride 2, one output per 12x12 window."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = conv_block(3, 10, 3)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = conv_block(10, 16, 3)
            self.conv3, self.prelu3 = conv_block(16, 32, 3)
            self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)   # face / not face
            self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)   # box offsets

        def forward(self, x):  # x: normalised NCHW
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)

    class RNet(nn.Module):
        """24x24 refinement net."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = conv_block(3, 28, 3)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = conv_block(28, 48, 3)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = conv_block(48, 64, 2)
            self.dense4 = nn.Linear(576, 128)
            self.prelu4 = nn.PReLU(128)
            self.dense5_1 = nn.Linear(128, 2)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            x = self.prelu4(self.dense4(flatten_whc(x)))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)

    class ONet(nn.Module):
        """48x48 output net: score, box offsets and five landmarks."""

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = conv_block(3, 32, 3)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = conv_block(32, 64, 3)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = conv_block(64, 64, 3)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = conv_block(64, 128, 2)
            self.dense5 = nn.Linear(1152, 256)
            self.prelu5 = nn.PReLU(256)
            self.dense6_1 = nn.Linear(256, 2)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu5(self.dense5(flatten_whc(self.prelu4(self.conv4(x)))))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)

    class Graph(nn.Module):
        """What gets exported: NHWC 0..255 in, normalisation inside, named outputs."""

        def __init__(self, kind: str, net: nn.Module):
            super().__init__()
            self.kind, self.net = kind, net

        def forward(self, image):
            x = ((image - 127.5) * 0.0078125).permute(0, 3, 1, 2)
            if self.kind == "pnet":
                reg, prob = self.net(x)
                return prob[:, 1], reg.permute(0, 2, 3, 1)
            if self.kind == "rnet":
                reg, prob = self.net(x)
                return prob[:, 1], reg
            reg, landmarks, prob = self.net(x)
            return prob[:, 1], reg, landmarks

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}, Graph


SPECS = {
    "pnet": {"input": [None, None, None, 3], "outputs": ["prob", "reg"], "example": (1, 37, 45, 3)},
    "rnet": {"input": [None, 24, 24, 3], "outputs": ["prob", "reg"], "example": (2, 24, 24, 3)},
    "onet": {"input": [None, 48, 48, 3], "outputs": ["prob", "reg", "landmarks"], "example": (2, 48, 48, 3)},
}


def build_graphs(state_dicts: dict) -> dict:
    """{'pnet': Graph(...)} in eval mode with the wheel's weights loaded strictly."""
    classes, Graph = _nets()
    graphs = {}
    for name, cls in classes.items():
        net = cls()
        net.load_state_dict(state_dicts[name], strict=True)
        graphs[name] = Graph(name, net).eval()
    return graphs


def export_graph(name: str, graph, path: Path) -> None:
    import torch

    spec = SPECS[name]
    dyn = {0: "batch"}
    if name == "pnet":
        dyn = {0: "batch", 1: "height", 2: "width"}
    out_dyn = {o: ({0: "batch", 1: "h", 2: "w"} if name == "pnet" else {0: "batch"}) for o in spec["outputs"]}
    example = torch.rand(*spec["example"]) * 255.0
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=spec["outputs"],
                          dynamic_axes={"image": dyn, **out_dyn}, do_constant_folding=True)


def compare(graphs: dict, folder: Path, seed: int = 0) -> dict:
    """Max |onnxruntime - torch| per output on random 0..255 inputs (several PNet sizes)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    shapes = {"pnet": [(1, 12, 12, 3), (1, 61, 47, 3), (2, 130, 97, 3)],
              "rnet": [(1, 24, 24, 3), (7, 24, 24, 3)],
              "onet": [(1, 48, 48, 3), (5, 48, 48, 3)]}
    report = {}
    for name, graph in graphs.items():
        sess = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        worst = 0.0
        for shape in shapes[name]:
            x = rng.uniform(0, 255, size=shape).astype(np.float32)
            got = sess.run(None, {"image": x})
            with torch.no_grad():
                want = [t.numpy() for t in graph(torch.from_numpy(x))]
            for g, w in zip(got, want):
                assert g.shape == w.shape, (name, g.shape, w.shape)
                worst = max(worst, float(np.abs(g - w).max()))
        report[name] = worst
    return report


def write_manifest(folder: Path, provenance: dict, diffs: dict) -> dict:
    import onnx
    import torch

    files = []
    for name in ("pnet", "rnet", "onet"):
        path = folder / f"{name}.onnx"
        files.append({
            "file": path.name, "role": name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "input": {"name": "image", "dtype": "float32", "layout": "NHWC", "shape": SPECS[name]["input"],
                      "color": "RGB", "range": [0, 255], "normalisation": "(x - 127.5) / 128, inside the graph"},
            "outputs": SPECS[name]["outputs"],
        })
    manifest = {
        "name": "mtcnn",
        "version": folder.name,
        "task": "face detection with 5 landmarks (left eye, right eye, nose, left mouth, right mouth)",
        "files": files,
        "output_semantics": {
            "prob": "face-class softmax probability (pnet: per 12x12 window, stride 2)",
            "reg": "box offsets (dx1, dy1, dx2, dy2) as fractions of the input box width/height",
            "landmarks": "x of left eye, right eye, nose, left mouth, right mouth, then the 5 y; "
                         "fractions of the 48x48 crop (point = x1 + f * width)",
        },
        "defaults": {"min_face_size": 20, "factor": 0.709, "thresholds": [0.6, 0.7, 0.7]},
        "source": {
            "package": PACKAGE, "version": PACKAGE_VERSION, "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
            "url": f"https://pypi.org/project/{PACKAGE}/{PACKAGE_VERSION}/",
            "members_sha256": provenance["members"],
            "upstream": "MTCNN, Zhang et al. 2016 (kpzhang93/MTCNN_face_detection_alignment), "
                        "ported by davidsandberg/facenet, redistributed in timesler/facenet-pytorch",
        },
        "licence": {"spdx": "MIT", "holder": "Copyright (c) 2019 Timothy Esler (facenet-pytorch)",
                    "text_head": provenance["licence_text_head"]},
        "export": {"script": "models/build/export_mtcnn.py", "torch": torch.__version__, "onnx": onnx.__version__,
                   "opset": OPSET, "max_abs_diff_vs_torch": diffs},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help=f"a local {WHEEL_NAME} (default: download into --cache)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import onnx

    wheel = fetch_wheel(args.cache, args.wheel)
    state_dicts, provenance = load_state_dicts(wheel)
    graphs = build_graphs(state_dicts)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        tmp = Path(tmp)
        for name, graph in graphs.items():
            export_graph(name, graph, tmp / f"{name}.onnx")
            onnx.checker.check_model(onnx.load(str(tmp / f"{name}.onnx")), full_check=True)
        diffs = compare(graphs, tmp)
        bad = {k: v for k, v in diffs.items() if v > 1e-4}
        if bad:
            raise SystemExit(f"ONNX differs from torch: {bad}")
        for name in graphs:
            (tmp / f"{name}.onnx").replace(args.out / f"{name}.onnx")
    manifest = write_manifest(args.out, provenance, diffs)
    for f in manifest["files"]:
        print(f"{args.out / f['file']}  {f['bytes']} bytes  sha256 {f['sha256']}")
    print(f"max |onnx - torch|: {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
