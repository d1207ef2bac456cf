"""service/runtime.py: provider choice and session options."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

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
