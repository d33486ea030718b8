"""onnxruntime access: imported lazily, with a one-line message when it is missing."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import BadInputError

__all__ = ["require_onnxruntime", "run_model", "synthetic_inputs", "model_source", "new_session"]

_INSTALL = "pip install 'graphprune[cpu]' (onnxruntime) or 'graphprune[gpu]' (onnxruntime-gpu), not both"


def require_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInputError(f"this needs onnxruntime, which is not installed: {_INSTALL}") from None
    return ort


def session(model: onnx.ModelProto | str, threads: int = 0, optimize: bool = True):
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors come back as exceptions; onnxruntime's own log would repeat them
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return new_session(ort, model, opts, ["CPUExecutionProvider"])


def new_session(ort, model: onnx.ModelProto | str, opts, providers: list):
    """An InferenceSession of `model` (a path, or a proto: see :func:`model_source`)."""
    src, keep = model_source(model, opts)
    sess = ort.InferenceSession(src, opts, providers=providers)
    sess._graphprune_weights = keep  # onnxruntime reads these buffers; they live as long as the session
    return sess


def model_source(model: onnx.ModelProto | str, opts) -> tuple:
    """(what to hand onnxruntime, what must outlive the session) for `model`: a path as is; a
    proto's bytes, or for a big model a scratch copy's path (see model_io.session_payload)."""
    if isinstance(model, str):
        return model, None
    from .model_io import session_payload

    return session_payload(model)


def run_model(model: onnx.ModelProto | str, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    sess = session(model, optimize=optimize)
    return sess.run(None, feeds)


_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
}


def synthetic_inputs(model: onnx.ModelProto, batch: int = 1, seq: int = 8, seed: int = 0,
                     shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Random inputs: the first dynamic axis gets `batch`, other dynamic axes `seq`."""
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        if shapes and vi.name in shapes:
            dims = list(shapes[vi.name])
        else:
            dims = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(d.dim_value)
                else:
                    dims.append(batch if k == 0 else seq)
        dtype = _NP.get(tt.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(dims, dtype=bool)
        else:
            feeds[vi.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feeds
