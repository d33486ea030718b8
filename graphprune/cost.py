"""Cost model: multiply-accumulates (MACs) and parameters, per node and in total.

Costs are products of axis sizes, so the allocator can update them as channels go:
a term is `coef * prod(size of each listed dimension)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Model, tensor_shape

__all__ = ["CostTerm", "node_cost_terms", "param_cost_terms", "model_cost", "CostSummary"]


@dataclass
class CostTerm:
    """coef * prod(sizes of `axes`), axes being (tensor, axis) pairs."""

    node: str
    coef: float
    axes: list = field(default_factory=list)


def _static(d) -> int:
    return d if isinstance(d, int) and d > 0 else 1


def _vol(shape) -> float:
    return float(np.prod([_static(d) for d in shape])) if shape else 1.0


# dynamic spatial axes (images of any size: detectors, segmenters, fully convolutional nets) are
# costed at this size, so layers at different strides keep their true MAC ratios
SPATIAL_HINT_SIZE = 224


def spatial_hints(model: Model) -> dict[str, tuple]:
    """Conv/ConvTranspose spatial sizes for graphs whose spatial axes are dynamic: shape inference
    with every dynamic non-batch input axis set to SPATIAL_HINT_SIZE. {} when all are static (or
    inference fails). Cached on the model for its current graph."""
    cached = model.__dict__.get("_spatial_hints")
    if cached is not None and cached[0] is model.graph:
        return cached[1]
    names = []
    for node in model.graph.nodes:
        if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
            t = node.outputs[0] if node.op == "Conv" else node.inputs[0]
            shape = tensor_shape(t)
            if shape is not None and not all(isinstance(d, int) and d > 0 for d in shape[2:]):
                names.append(t.name)
    hints: dict[str, tuple] = {}
    if names:
        try:
            proto = model.to_proto(infer=False, materialize_data=False)
            for vi in proto.graph.input:
                for k, d in enumerate(vi.type.tensor_type.shape.dim):
                    if k > 0 and not (d.HasField("dim_value") and d.dim_value > 0):
                        d.Clear()
                        d.dim_value = SPATIAL_HINT_SIZE
            del proto.graph.value_info[:]
            fixed = Model.from_proto(proto, model.meta).graph.tensors()  # refines run-time shapes too
            for name in names:
                shape = tensor_shape(fixed[name]) if name in fixed else None
                if shape is not None and len(shape) > 2 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
                    hints[name] = tuple(shape[2:])
        except Exception:  # no hints: dynamic axes count as 1, as before
            hints = {}
    model.__dict__["_spatial_hints"] = (model.graph, hints)
    return hints


def node_cost_terms(node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
    """MACs of one node (batch counted as 1; dynamic spatial axes of convs at `spatial`'s sizes
    where given, see spatial_hints; other dynamic axes counted as 1)."""
    op = node.op
    name = node.name or node.outputs[0].name
    ins = [t if t.name else None for t in node.inputs]
    if op in ("Conv", "ConvTranspose", "ConvInteger") and len(ins) > 1 and ins[1] is not None:
        x, w, y = ins[0], ins[1], node.outputs[0]
        ws, ys, xs = tensor_shape(w), tensor_shape(y), tensor_shape(x)
        if ws is None or ys is None or xs is None:
            return []
        spatial_t = y if op == "Conv" else x
        spatial = (spatial or {}).get(spatial_t.name) or (ys[2:] if op == "Conv" else xs[2:])
        coef = _vol(spatial) * _static(ys[0]) * _vol(ws[2:])
        return [CostTerm(name, coef, [(w.name, 0), (w.name, 1)])]
    if op in ("LSTM", "GRU", "RNN") and len(ins) > 2 and ins[1] is not None and ins[2] is not None:
        # per time step and direction: x . W^T and h . R^T (sequence and batch counted as 1 when dynamic)
        xs = tensor_shape(ins[0])
        steps = _static(xs[0]) * _static(xs[1]) if xs is not None and len(xs) == 3 else 1.0
        w, r = ins[1], ins[2]
        return [CostTerm(name, steps, [(w.name, 0), (w.name, 1), (w.name, 2)]),
                CostTerm(name, steps, [(r.name, 0), (r.name, 1), (r.name, 2)])]
    if op == "Attention" and (node.domain or "") == "com.microsoft" and len(ins) > 1 and ins[1] is not None:
        x, w = ins[0], ins[1]
        xs = tensor_shape(x)
        if xs is None or len(xs) != 3:
            return []
        return [CostTerm(name, _static(xs[0]) * _static(xs[1]), [(w.name, 0), (w.name, 1)])]
    if op in ("Gemm", "MatMul", "MatMulInteger", "MatMulNBits") and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
        a, b, y = ins[0], ins[1], node.outputs[0]
        as_, bs, ys = tensor_shape(a), tensor_shape(b), tensor_shape(y)
        if as_ is None or bs is None or ys is None or len(as_) < 1 or len(bs) < 1:
            return []
        if op == "Gemm":
            ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
            m_ax, k_ax = (1, 0) if ta else (0, 1)
            n_ax = 0 if tb else 1
            return [CostTerm(name, 1.0, [(a.name, m_ax), (a.name, k_ax), (b.name, n_ax)])]
        # numpy matmul: prod(output) * K
        ry = len(ys)
        axes = [(y.name, k) for k in range(ry)] + [(a.name, len(as_) - 1)]
        return [CostTerm(name, 1.0, axes)]
    return []


def param_cost_terms(model: Model) -> list[CostTerm]:
    """One term per weight initializer (floating point, or an integer weight read by DequantizeLinear)."""
    from .quantized import dequant_weight

    terms = []
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Constant) and t.dtype is not None and (
                np.issubdtype(np.dtype(t.dtype), np.floating) or dequant_weight(t)):
            shape = tensor_shape(t)
            if shape and _used_as_data(t):
                terms.append(CostTerm(t.name, 1.0, [(t.name, k) for k in range(len(shape))]))
    return terms


def _used_as_data(t: gs.Constant) -> bool:
    return True


@dataclass
class CostSummary:
    macs: float
    params: float
    per_node: dict

    def to_dict(self) -> dict:
        return {"macs": int(self.macs), "params": int(self.params)}


def _term_value(term: CostTerm, sizes) -> float:
    v = term.coef
    for t, ax in term.axes:
        v *= sizes(t, ax)
    return v


def model_cost(model: Model) -> CostSummary:
    tensors = model.graph.tensors()

    def size(t, ax):
        s = tensor_shape(tensors[t]) if t in tensors else None
        return _static(s[ax]) if s is not None and ax < len(s) else 1

    per_node = {}
    hints = spatial_hints(model)
    for node in model.graph.nodes:
        for term in node_cost_terms(node, hints):
            per_node[term.node] = per_node.get(term.node, 0.0) + _term_value(term, size)
    params = sum(_term_value(t, size) for t in param_cost_terms(model))
    return CostSummary(sum(per_node.values()), params, per_node)
