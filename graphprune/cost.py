"""Cost model: multiply-accumulates (MACs) and parameters, per node and in total.

Costs are products of axis sizes, so the allocator can update them as channels go:
a term is `coef * prod(size of each listed dimension)`. Each op's terms come from its rule
(`OpRule.cost_terms`); this module sums them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .dependency import installed_registry
from .graph import Model, tensor_shape

__all__ = ["CostTerm", "static_size", "volume", "node_cost_terms", "param_cost_terms", "model_cost", "CostSummary"]


@dataclass
class CostTerm:
    """coef * prod(sizes of `axes`), axes being (tensor, axis) pairs."""

    node: str
    coef: float
    axes: list = field(default_factory=list)


def static_size(d) -> int:
    """A static axis size, or 1 for a dynamic / unknown one."""
    return d if isinstance(d, int) and d > 0 else 1


def volume(shape) -> float:
    """Product of the static sizes of `shape` (dynamic axes count as 1)."""
    return float(np.prod([static_size(d) for d in shape])) if shape else 1.0


_static = static_size


def _rule(node: gs.Node, opset: int, registry):
    return registry.lookup(node.domain or "", node.op, opset)


# dynamic spatial axes (images of any size: detectors, segmenters, fully convolutional nets) are
# costed at this size, so layers at different strides keep their true MAC ratios
SPATIAL_HINT_SIZE = 224


def spatial_hints(model: Model, registry=None) -> dict[str, tuple]:
    """Conv/ConvTranspose spatial sizes for graphs whose spatial axes are dynamic: shape inference
    with every dynamic non-batch input axis set to SPATIAL_HINT_SIZE. {} when all are static (or
    inference fails). Cached on the model for its current graph."""
    cached = model.__dict__.get("_spatial_hints")
    if cached is not None and cached[0] is model.graph:
        return cached[1]
    names = []
    registry = registry if registry is not None else installed_registry()
    for node in model.graph.nodes:
        rule = _rule(node, model.opset, registry)
        t = rule.spatial_tensor(node) if rule is not None else None
        if t is not None:
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


def node_cost_terms(node: gs.Node, spatial: dict | None = None, *, opset: int = 0, registry=None) -> list[CostTerm]:
    """MACs of one node, as its op rule states them (batch counted as 1; dynamic spatial axes of
    convs at `spatial`'s sizes where given, see spatial_hints; other dynamic axes counted as 1).
    `registry`: the op rules to ask (default: the installed ones; pass it when costing many nodes)."""
    rule = _rule(node, opset, registry if registry is not None else installed_registry())
    return rule.cost_terms(node, spatial) if rule is not None else []


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


def model_cost(model: Model, registry=None) -> CostSummary:
    tensors = model.graph.tensors()

    def size(t, ax):
        s = tensor_shape(tensors[t]) if t in tensors else None
        return _static(s[ax]) if s is not None and ax < len(s) else 1

    per_node = {}
    registry = registry if registry is not None else installed_registry()
    hints = spatial_hints(model, registry)
    for node in model.graph.nodes:
        for term in node_cost_terms(node, hints, opset=model.opset, registry=registry):
            per_node[term.node] = per_node.get(term.node, 0.0) + _term_value(term, size)
    params = sum(_term_value(t, size) for t in param_cost_terms(model))
    return CostSummary(sum(per_node.values()), params, per_node)
