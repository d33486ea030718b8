"""onnxruntime access: imported lazily, with a one-line message when it is missing."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import BadInputError

__all__ = ["require_onnxruntime", "run_model", "synthetic_inputs", "model_source", "new_session", "decoder_sizes",
           "PAST_TOKENS", "SYNTHETIC_INPUT_BYTES", "load_verify_inputs", "cache_head_size"]

SYNTHETIC_INPUT_BYTES = 1 << 30  # synthetic inputs larger than this are refused in one line, never allocated
PAST_TOKENS = 3  # synthetic decoder inputs: a past of this many tokens, then `seq` new ones

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
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.STRING: np.object_,  # onnxruntime takes str objects for string tensors
}
_WORDS = np.array(["cat", "dog", "", "a b", "0", "\u00e9t\u00e9"], dtype=object)


def _input_dtype(vi: onnx.ValueInfoProto, why: str = "--verify"):
    """The numpy type of a graph input; an element type no synthetic value can be made for (or that is
    not a tensor at all): one line saying to give the inputs instead."""
    if not vi.type.HasField("tensor_type"):
        raise BadInputError(f"{why}: graph input {vi.name!r} is not a tensor ({vi.type.WhichOneof('value')}); "
                            f"synthetic inputs cannot be made for it: give them with --verify-inputs FILE.npz")
    elem = vi.type.tensor_type.elem_type
    if elem not in _NP:
        name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise BadInputError(f"{why}: graph input {vi.name!r} is of type {name.lower()}, for which synthetic values "
                            f"cannot be made: give the inputs with --verify-inputs FILE.npz")
    return _NP[elem]


def cache_head_size(model: onnx.ModelProto, cache: str, widths: dict | None = None) -> int | None:
    """head_size of a cache input whose last axis is symbolic (onnxruntime-genai's `kv_cache_dim`):
    read from the attention op that takes it (packed QKV width / (num_heads + 2 kv_num_heads), or
    the key width / kv_num_heads), or from the new keys/values a Concat appends to it, with the
    widths from onnx shape inference."""
    widths = _static_last_dims(model) if widths is None else widths
    for node in model.graph.node:
        if cache not in node.input:
            continue
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention"):
            hq = int(proto_attr(node, "num_heads", 0))
            hkv = int(proto_attr(node, "kv_num_heads", hq))
            packed = len(node.input) < 3 or not node.input[1]
            src, n = (node.input[0], hq + 2 * hkv) if packed else (node.input[1], hkv)
            width = widths.get(src)
            if width and n > 0 and width % n == 0:
                return width // n
        elif node.op_type == "Concat":  # past -> Concat(past, new) -> present: the new part's head size
            for other in node.input:
                if other != cache and widths.get(other):
                    return widths[other]
    return None


def proto_attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _static_last_dims(model: onnx.ModelProto) -> dict[str, int]:
    """{tensor: static last axis size} from onnx shape inference (weights left out)."""
    from .model_io import without_weights

    try:
        light, _ = without_weights(model)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # an op onnx cannot infer: no sizes from here
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
            out[vi.name] = int(dims[-1].dim_value)
    return out


def decoder_sizes(model: onnx.ModelProto, batch: int, seq: int, past: int = PAST_TOKENS) -> dict[str, int] | None:
    """Sizes of the symbolic axes of a decoder with past keys/values, or None for other models.

    The past holds `past` tokens (PAST_TOKENS unless given) and `seq` new tokens follow: a symbolic axis named like a
    past length gets PAST_TOKENS, a total length (or an expression such as `past + 1`) past + new,
    the batch axis `batch`, a cache's symbolic head axis the attention op's head_size, any other
    `seq`; the attention mask then spans past + new and position ids continue the past.
    """
    from .kv_cache import CACHE_NAME

    init = {t.name for t in model.graph.initializer}
    caches = [vi for vi in model.graph.input if vi.name not in init and CACHE_NAME.search(vi.name)
              and len(vi.type.tensor_type.shape.dim) >= 3]
    if not caches:
        return None
    if batch > 1 and any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        seq = 1  # GroupQueryAttention takes a past with several new tokens at batch 1 only
    sizes: dict[str, int] = {}
    widths = None
    for vi in caches:
        dims = vi.type.tensor_type.shape.dim
        last = dims[-1]
        if last.dim_param and last.dim_param not in sizes:
            widths = _static_last_dims(model) if widths is None else widths
            d = cache_head_size(model, vi.name, widths)
            if d:
                sizes[last.dim_param] = d
    for vi in model.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            name = d.dim_param
            if not name or name in sizes or d.HasField("dim_value"):
                continue
            low = name.lower()
            if k == 0 and "batch" in low or low in ("n", "b"):
                sizes[name] = batch
            elif "total" in low or "+" in name or "all" in low:
                sizes[name] = past + seq
            elif "past" in low or "cache" in low:
                sizes[name] = past
            elif k == 0:
                sizes[name] = batch
            else:
                sizes[name] = seq
    return sizes


def synthetic_inputs(model: onnx.ModelProto, batch: int = 1, seq: int = 8, seed: int = 0,
                     shapes: dict | None = None) -> dict[str, np.ndarray]:
    """Random inputs: the first dynamic axis gets `batch`, other dynamic axes `seq`.

    A decoder with past keys/values (see :func:`decoder_sizes`) gets a consistent set: a past of
    PAST_TOKENS tokens, `seq` new tokens, an all-ones mask over past + new, position ids that
    continue the past.
    """
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    named = decoder_sizes(model, batch, seq)
    # GroupQueryAttention's seqlens_k (input 5: total length - 1 per sequence) and total_sequence_length (6)
    gqa_len = {n.input[i]: i for n in model.graph.node if n.op_type == "GroupQueryAttention"
               for i in (5, 6) if i < len(n.input) and n.input[i]}
    feeds = {}
    total = 0
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
                elif named is not None and d.dim_param in named:
                    dims.append(named[d.dim_param])
                else:
                    dims.append(batch if k == 0 else seq)
        dtype = _input_dtype(vi)
        total += int(np.prod(dims, dtype=object)) * (8 if dtype is np.object_ else np.dtype(dtype).itemsize)
        if total > SYNTHETIC_INPUT_BYTES:  # a declared size too large to run (an image height of 2^24)
            raise BadInputError(f"synthetic inputs would take {total / 2**30:.1f} GiB ({vi.name} {dims}); the model "
                                f"declares sizes too large to run: give smaller inputs (--verify-inputs FILE.npz "
                                f"for --verify)")
        low = vi.name.lower()
        if named is not None and vi.name in gqa_len:
            new = 1 if batch > 1 else seq
            total = PAST_TOKENS + new
            feeds[vi.name] = np.full(dims, total - 1 if gqa_len[vi.name] == 5 else total, dtype=dtype)
        elif named is not None and "position" in low and np.issubdtype(dtype, np.integer) and dims:
            start = PAST_TOKENS if dims[-1] < PAST_TOKENS + 1 or "total" not in low else 0
            pos = np.arange(start, start + dims[-1], dtype=dtype)
            feeds[vi.name] = np.broadcast_to(pos, dims).copy()
        elif named is not None and "mask" in low and not np.issubdtype(dtype, np.floating):
            feeds[vi.name] = np.ones(dims, dtype=dtype)
        elif dtype is np.object_:  # strings: a few words, the empty string and non-ASCII text among them
            feeds[vi.name] = rng.choice(_WORDS, size=dims).astype(object)
        elif np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(dims, dtype=bool)
        else:
            feeds[vi.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feeds


def load_verify_inputs(source, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Feeds for --verify from a .npz file (one array per graph input, by name) or a dict.

    Every graph input must be given, with its rank and static sizes; arrays are cast to the input's
    element type when that loses nothing (float64 -> float32, int32 -> int64). Anything else is a
    one-line BadInputError naming the input."""
    if isinstance(source, dict):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        label = "verify_inputs"
    else:
        label = str(source)
        try:
            with np.load(label, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise BadInputError(f"--verify-inputs {label}: no such file") from None
        except Exception as exc:  # not an npz, pickled objects, truncated
            raise BadInputError(f"--verify-inputs {label}: not a readable .npz file ({type(exc).__name__})") from None
    init = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init]
    names = {vi.name for vi in inputs}
    unknown = sorted(set(arrays) - names)
    if unknown:
        raise BadInputError(f"--verify-inputs {label}: {', '.join(unknown)} is not a graph input "
                            f"(inputs: {', '.join(sorted(names))})")
    missing = [vi.name for vi in inputs if vi.name not in arrays]
    if missing:
        raise BadInputError(f"--verify-inputs {label}: no array for graph input {', '.join(missing)}")
    feeds = {}
    for vi in inputs:
        a = arrays[vi.name]
        dims = vi.type.tensor_type.shape.dim
        want = _input_dtype(vi, f"--verify-inputs {label}")
        if a.ndim != len(dims) or any(d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n
                                      for d, n in zip(dims, a.shape)):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise BadInputError(f"--verify-inputs {label}: {vi.name} has shape {list(a.shape)}, the model "
                                f"takes {shape}")
        if want is np.object_ and a.dtype.kind not in "OUS":
            raise BadInputError(f"--verify-inputs {label}: {vi.name} is {a.dtype}, the model takes strings")
        if a.dtype != want:
            if np.can_cast(a.dtype, want, casting="same_kind") or (a.dtype.kind == want().dtype.kind):
                a = a.astype(want)
            else:
                raise BadInputError(f"--verify-inputs {label}: {vi.name} is {a.dtype}, the model takes "
                                    f"{np.dtype(want)}")
        feeds[vi.name] = a
    return feeds
