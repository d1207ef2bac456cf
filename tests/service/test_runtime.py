"""service/runtime.py: provider choice and session options; no ONNX Runtime telemetry."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from service import runtime

DETECTOR = Path(__file__).resolve().parents[2] / "models" / "repository" / "mtcnn" / "1" / "pnet.onnx"


def test_cpu_when_asked_or_when_cuda_is_absent(monkeypatch, caplog):
    assert runtime.choose_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("INFO", logger="idverify.runtime"):
        assert runtime.choose_providers("auto") == ["CPUExecutionProvider"]
        assert runtime.choose_providers("cuda") == ["CPUExecutionProvider"]
    assert any("falling back to CPU" in r.message for r in caplog.records)


def test_cuda_first_when_present(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.choose_providers("cpu") == ["CPUExecutionProvider"]


def test_session_on_cpu_with_threads():
    s = runtime.make_session(DETECTOR, threads=1)
    assert s.get_providers() == ["CPUExecutionProvider"]
    opts = s.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# --- no telemetry ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
SERVE_ONE_PAIR = """
import sys
from service.face.loader import load_models
from service.settings import Settings
models = load_models(Settings())
models.warmup()
photo = open(sys.argv[1], "rb").read()
side = models.pipeline.analyse(photo, "live_photo", {})
assert side.embedding is not None
"""


def _written_by(code: str, tmp_path: Path, *args: str) -> list[str]:
    """Run `code` in a fresh interpreter whose HOME, TMPDIR and working directory are empty
    folders, without ORT_DISABLE_TELEMETRY in its environment; the files it left there."""
    import os
    import subprocess
    import sys

    home, tmp, cwd = (tmp_path / name for name in ("home", "tmp", "cwd"))
    for d in (home, tmp, cwd):
        d.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return sorted(str(p.relative_to(tmp_path)) for d in (home, tmp, cwd) for p in d.rglob("*"))


def test_the_service_writes_no_onnxruntime_telemetry(tmp_path, bundled_images):
    """The served models, loaded and run on a photo in a process of their own, leave nothing in
    HOME, TMPDIR or the working directory; onnxruntime imported on its own (the control) does,
    so the check can see telemetry when it is there."""
    photo = str(bundled_images / "Tom_Hanks_54745.png")
    assert _written_by(SERVE_ONE_PAIR, tmp_path / "service", photo) == []
    control = _written_by("import onnxruntime", tmp_path / "control")
    if not control:
        pytest.skip("this onnxruntime writes no telemetry even when left alone: nothing to stop")
    assert any("onnxruntime" in p or p.endswith(".ses") for p in control), control
