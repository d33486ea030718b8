"""Layer sub-models: a group's own Conv/ConvTranspose/Gemm/MatMul layers in isolation, at the input shapes
they see in the model, with a given number of channels removed (what the latency table times)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..oprules import WeightLayout, rule_for
from ..pipeline import PruneContext
from ..roles import WEIGHT_ROLES

__all__: list[str] = []


_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.float64): TensorProto.DOUBLE}


@dataclass
class _Layer:
    """One weighted node of a group, as it appears in the model with concrete shapes."""

    name: str
    op: str
    attrs: dict
    x_shape: list
    w_shape: list
    w_dtype: np.dtype
    axes: dict  # weight axis -> elements per channel of the group
    layout: WeightLayout = None  # from the op rule

    def shapes_at(self, removed: int) -> "tuple[list, list, dict] | None":
        """(x shape, weight shape, attrs) with `removed` channels of the group gone."""
        w = list(self.w_shape)
        for axis, per in self.axes.items():
            w[axis] = int(round(w[axis] - removed * per))
        if any(d < 1 for d in w):
            return None
        x, attrs = list(self.x_shape), dict(self.attrs)
        lay = self.layout
        if lay.groups > 1:  # the op rule's weight layout: which axis counts channels per group
            groups = lay.groups
            if lay.is_depthwise(self.w_shape, self.x_shape[lay.x_axis]):
                groups = w[lay.out_axis] if lay.in_per_group else w[lay.in_axis]
                if lay.in_per_group:
                    w[lay.in_axis] = 1
                attrs["group"] = groups
            x[lay.x_axis] = w[lay.in_axis] * groups if lay.in_per_group else w[lay.in_axis]
            if lay.in_per_group and w[lay.out_axis] % groups:
                return None
        else:
            x[lay.x_axis] = w[lay.in_axis]
        return x, w, attrs


def _concrete(shape, symbols: dict, batch: int, seq: int) -> list | None:
    if shape is None:
        return None
    out = []
    for k, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d > 0:
            out.append(int(d))
        elif isinstance(d, str) and d in symbols:
            out.append(int(symbols[d]))
        else:
            out.append(batch if k == 0 else seq)
    return out


def _group_layers(ctx: PruneContext, group, symbols: dict, batch: int, seq: int) -> tuple[list, list]:
    """The group's weighted layers (Conv/ConvTranspose/Gemm/MatMul) and what was skipped, why."""
    import onnx_graphsurgeon as gs

    from ..graph import tensor_shape

    tensors = ctx.model.graph.tensors()
    by_node: dict[str, _Layer] = {}
    skipped = []
    for m in group.members:
        if not m.is_weight or m.role not in WEIGHT_ROLES:
            continue
        t = tensors.get(m.tensor)
        if not isinstance(t, gs.Constant):
            continue
        per = float(np.mean([len(ix) for ix in m.indices])) if m.indices else 0.0
        for node in t.outputs:
            rule = rule_for(node, ctx.model.opset)
            lay = rule.weight_layout(node) if rule is not None else None
            if lay is None or len(node.inputs) <= lay.weight or node.inputs[lay.weight] is not t:
                if rule is None or rule.cost_terms(node):  # per-channel parameters (BN, Add, Mul): no MACs
                    skipped.append(f"{node.name or node.op}: {node.op} not timed")
                continue
            node_key = node.name or f"{node.op}->{node.outputs[0].name}"
            layer = by_node.get(node_key)
            if layer is None:
                x_shape = _concrete(tensor_shape(node.inputs[0]), symbols, batch, seq)
                w_shape = list(np.asarray(t.values).shape) if t.values is not None else None
                if x_shape is None or w_shape is None:
                    skipped.append(f"{node.name}: shape unknown")
                    continue
                if len(w_shape) != 2 + len(lay.kernel_axes):
                    skipped.append(f"{node.name}: batched {node.op} weight not timed")
                    continue
                dtype = np.dtype(np.asarray(t.values).dtype)
                if dtype not in _NP_TO_ONNX:
                    skipped.append(f"{node.name}: {dtype} weight not timed")
                    continue
                attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, (gs.Tensor, gs.Graph))}
                layer = by_node[node_key] = _Layer(node_key, node.op, attrs, x_shape, w_shape, dtype, {}, lay)
            layer.axes[m.axis % len(layer.w_shape)] = layer.axes.get(m.axis % len(layer.w_shape), 0.0) + per
    return list(by_node.values()), sorted(set(skipped))


def _layers_model(layers: list, removed: int, opset: int, seed: int = 0) -> "tuple[onnx.ModelProto, dict] | None":
    """One graph holding every layer side by side (own input, weight, output) and its feeds."""
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits, feeds = [], [], [], [], {}
    for i, layer in enumerate(layers):
        shapes = layer.shapes_at(removed)
        if shapes is None:
            continue
        x_shape, w_shape, attrs = shapes
        elem = _NP_TO_ONNX[layer.w_dtype]
        x, w, y = f"x{i}", f"w{i}", f"y{i}"
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(w_shape) * 0.05).astype(layer.w_dtype), w))
        inputs.append(helper.make_tensor_value_info(x, elem, x_shape))
        outputs.append(helper.make_tensor_value_info(y, elem, [None] * len(x_shape)))
        nodes.append(helper.make_node(layer.op, [x, w], [y], name=layer.name, **attrs))
        feeds[x] = rng.standard_normal(x_shape).astype(layer.w_dtype)
    if not nodes:
        return None
    graph = helper.make_graph(nodes, "latency_probe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return model, feeds


def _symbols(proto: onnx.ModelProto, feeds: dict) -> dict:
    """Symbolic dim names of the graph inputs -> the sizes the feeds give them."""
    out = {}
    for vi in proto.graph.input:
        if vi.name not in feeds:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param and k < feeds[vi.name].ndim:
                out.setdefault(d.dim_param, int(feeds[vi.name].shape[k]))
    return out
