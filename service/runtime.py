"""ONNX Runtime sessions: one place that picks the execution provider and thread settings."""
from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort   # with ORT_DISABLE_TELEMETRY set (service/__init__.py)

log = logging.getLogger("idverify.runtime")
ort.disable_telemetry_events()   # the platform's event tracing too, where it has any


def choose_providers(preference: str = "auto") -> list[str]:
    """CUDA when present (and not disabled), else CPU, saying so in the log."""
    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        log.warning("CUDA provider requested but not available (have %s); falling back to CPU", available)
    else:
        log.info("CUDA provider not available (have %s); using CPU", available)
    return ["CPUExecutionProvider"]


def make_session(path: Path, providers: list[str] | None = None, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # sessions run back to back (detector cascade, then a tower): a spinning pool of one
    # would steal the cores of the next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
