"""An independent MAC count: run the model in onnxruntime and read every costed node's real shapes.

graphprune's cost model (cost.py) counts MACs from op rules' cost terms over shapes it infers;
this module counts them without it, as a check. The model runs once in onnxruntime (graph
optimizations off) at a concrete input shape with the inputs and outputs of every Conv,
ConvTranspose, Gemm, MatMul (and their integer / quantized / contrib forms) and attention op
exposed as graph outputs, so dynamic and folded axes (heads or windows merged into the batch
axis, a dynamic image width) count at their run-time sizes. MACs per op, from the ONNX and
com.microsoft specs:

- Conv (ConvInteger, QLinearConv, FusedConv): every output element is a C_in/group x kernel dot product;
- ConvTranspose: every input element scatters into C_out/group x kernel outputs;
- Gemm: M x K x N; MatMul (MatMulInteger, QLinearMatMul, MatMulNBits, FusedMatMul, ...):
  every output element is a K-long dot product;
- attention (com.microsoft Attention, MultiHeadAttention, GroupQueryAttention; ONNX Attention):
  the packed QKV projection where the op holds it, then Q.K^T (query length x total key length x
  query hidden) and scores.V (query length x total key length x value hidden).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["COSTED_OPS", "ort_macs", "ort_macs_per_node"]

_MS = "com.microsoft"
# (domain, op) -> how its MACs are read from the real shapes
_CONV = {("", "Conv"), ("", "ConvInteger"), (_MS, "FusedConv")}
_QCONV = {("", "QLinearConv")}  # weight is input 3
_CONVT = {("", "ConvTranspose")}
_GEMM = {("", "Gemm"), (_MS, "FusedGemm")}
_MATMUL = {("", "MatMul"), ("", "MatMulInteger"), (_MS, "MatMulIntegerToFloat"), (_MS, "DynamicQuantizeMatMul"),
           (_MS, "MatMulNBits"), (_MS, "MatMulBnb4")}
_QMATMUL = {("", "QLinearMatMul")}  # A is input 0, as for MatMul
_FUSED_MATMUL = {(_MS, "FusedMatMul")}
_ATTENTION = {(_MS, "Attention"), (_MS, "MultiHeadAttention"), (_MS, "GroupQueryAttention"), ("", "Attention")}
_PROTO_LIMIT = (1 << 31) - (1 << 20)  # protobuf's 2 GB, less a margin: larger models go through a file
COSTED_OPS = frozenset(_CONV | _QCONV | _CONVT | _GEMM | _MATMUL | _QMATMUL | _FUSED_MATMUL | _ATTENTION)


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    domain = node.domain or ""
    return ("" if domain == "ai.onnx" else domain, node.op_type)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _io(node: onnx.NodeProto, i: int, outputs: bool = False) -> str:
    names = node.output if outputs else node.input
    return names[i] if i < len(names) else ""


def _attention_macs(node: onnx.NodeProto, real: dict) -> int:
    """Projection (com.microsoft Attention's packed weight) + Q.K^T + scores.V at the real shapes."""
    kind = _key(node)
    attrs = _attrs(node)

    def shape(i, out=False):
        name = _io(node, i, out)
        return tuple(real[name]) if name and name in real else None

    y = shape(0, True)
    if kind == (_MS, "Attention"):  # x [B, S, D_in] . W [D_in, q+k+v hidden]; past/present [2, B, N, L, d]
        x, w = shape(0), shape(1)
        b, s = x[0], x[1]
        proj = b * s * w[0] * w[1]
        sizes = attrs.get("qkv_hidden_sizes")
        q_hidden = int(sizes[0]) if sizes else w[1] // 3
        present, past = shape(1, True), shape(4)
        total = present[3] if present else s + (past[3] if past else 0)
        return int(proj + b * s * total * (q_hidden + y[-1]))
    if kind == (_MS, "MultiHeadAttention"):  # query [B, S, Dq] (or packed [B, S, N, 3, d]); output [B, S, Dv]
        q, k = shape(0), shape(1)
        b, s = y[0], y[1]
        present = shape(1, True)
        if present is not None:  # [B, N, L, d]
            total = present[2]
        elif k is not None and len(k) == 3:
            total = k[1]
        elif k is not None and len(k) == 4:  # [B, N, L, d]
            total = k[2]
        else:  # packed QKV in the query
            total = s
        q_hidden = q[-1] if len(q) == 3 else y[-1]
        return int(b * s * total * (q_hidden + y[-1]))
    if kind == (_MS, "GroupQueryAttention"):  # output [B, S, N*d]; present_key [B, kvN, L, d]
        b, s = y[0], y[1]
        present = shape(1, True)
        total = present[2] if present is not None else s
        return int(b * s * total * 2 * y[-1])
    # ONNX Attention (opset 23): Q [B, H, S, d] or [B, S, H*d]; K likewise; present_key [B, kvH, T, d]
    q, k = shape(0), shape(1)
    present = shape(1, True)
    total = present[2] if present is not None else (k[2] if len(k) == 4 else k[1])
    past = shape(4)
    if present is None and past is not None:
        total += past[2]
    return int(total * (_prod(q) + _prod(y)))


def _node_macs(node: onnx.NodeProto, real: dict) -> int:
    kind = _key(node)
    attrs = _attrs(node)
    if kind in _ATTENTION:
        return _attention_macs(node, real)
    y = real[node.output[0]]
    if kind in _CONV or kind in _QCONV:  # every output element: C_in/group x kernel
        w = real[node.input[3 if kind in _QCONV else 1]]
        return _prod(y) * _prod(w[1:])
    if kind in _CONVT:  # every input element: C_out/group x kernel
        return _prod(real[node.input[0]]) * _prod(real[node.input[1]][1:])
    a = real[node.input[0]]
    if kind in _GEMM:
        b = real[node.input[1]]
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        return m * k * (b[0] if attrs.get("transB", 0) else b[1])
    if kind in _FUSED_MATMUL:
        return _prod(y) * (a[-2] if attrs.get("transA", 0) and len(a) > 1 else a[-1])
    if kind == (_MS, "MatMulNBits") or kind == (_MS, "MatMulBnb4"):
        return _prod(y) * int(attrs["K"])
    return _prod(y) * a[-1]  # a matrix product: every output element is a K-long dot product


def _needed(node: onnx.NodeProto) -> list[str]:
    kind = _key(node)
    if kind in _ATTENTION:
        return [n for n in (*node.input[:5], *node.output[:2]) if n]
    if kind in _QCONV:
        return [node.input[0], node.input[3], node.output[0]]
    return [n for n in (*node.input[:2], node.output[0]) if n]


def ort_macs_per_node(model: "onnx.ModelProto | str", shapes: dict, *, seed: int = 0,
                      feeds: dict | None = None) -> dict[str, int]:
    """{node name (or first output): MACs} of every costed node (COSTED_OPS), measured by one
    onnxruntime run at `shapes` ({input: dims}; floating inputs N(0, 1), others zeros; `feeds`:
    arrays to use instead for some inputs, such as sequence lengths). Nodes inside control-flow
    sub-graphs are not counted. Independent of graphprune's cost model."""
    import onnxruntime as ort

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = onnx.load(str(model))
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # no serialization: works past 2 GB
        model = copy
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model over 2 GB or one inference rejects: types from the graph alone
        typed = model
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in (*typed.graph.value_info, *typed.graph.input, *typed.graph.output)}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    elem.setdefault(n.output[0], a.t.data_type)
    costed = [n for n in model.graph.node if _key(n) in COSTED_OPS]
    have = {o.name for o in model.graph.output}
    for n in costed:
        for name in _needed(n):
            if name not in inits and name not in have:
                if elem.get(name, TensorProto.UNDEFINED) == TensorProto.UNDEFINED:
                    model.graph.output.add().name = name  # onnxruntime types an output declared by name only
                else:
                    model.graph.output.append(helper.make_tensor_value_info(name, elem[name], None))
                have.add(name)
    rng = np.random.default_rng(seed)
    given, feeds = dict(feeds or {}), {}
    for vi in model.graph.input:
        if vi.name in given:
            feeds[vi.name] = given[vi.name]
            continue
        if vi.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = tuple(shapes[vi.name])
        feeds[vi.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                          else np.zeros(shape, dtype))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        if model.ByteSize() < _PROTO_LIMIT:
            source = model.SerializeToString()
        else:  # over protobuf's 2 GB: weights in a data file beside a temporary copy
            source = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, source, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        real = dict(inits)
        real.update(zip(names, (tuple(v.shape) for v in sess.run(names, feeds))))
    return {n.name or n.output[0]: int(_node_macs(n, real)) for n in costed}


def ort_macs(model: "onnx.ModelProto | str", shapes: dict, *, seed: int = 0, feeds: dict | None = None) -> int:
    """Total MACs of `model` at `shapes` by one onnxruntime run (see ort_macs_per_node)."""
    return int(sum(ort_macs_per_node(model, shapes, seed=seed, feeds=feeds).values()))
