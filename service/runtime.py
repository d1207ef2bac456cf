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


def make_session(path: Path | bytes, providers: list[str] | None = None, threads: int = 0,
                 fold_dequantize: bool = False) -> ort.InferenceSession:
    """`fold_dequantize` (a manifest's `runtime.fold_dequantize`): DequantizeLinear nodes on
    constant weights are folded into float32 initializers when the session is built, so a graph
    stored with block-quantised weights (small on disk) runs as fast as its float32 form instead
    of dequantising at every call. Only for graphs without quantized kernels to fuse (QDQ models
    such as the int8 towers need those nodes kept)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # sessions run back to back (detector cascade, then a tower): a spinning pool of one
    # would steal the cores of the next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if fold_dequantize:
        # QDQ handling off: constant folding then treats DequantizeLinear(constant) as foldable
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    model = path if isinstance(path, bytes) else str(path)   # a file, or a serialised graph
    return ort.InferenceSession(model, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
