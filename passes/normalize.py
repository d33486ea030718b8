"""Normalize: turn Constant nodes and constant sub-graphs into initializers, infer shapes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from graphprune.graph import Model
from graphprune.oprules.fill import RANDOM_OPS
from graphprune.oprules.quant import QUANTIZE_OPS
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["NormalizePass", "fold_constants"]

_MAX_FOLD_ELEMENTS = 1 << 26
_NOT_FOLDED = set(RANDOM_OPS) | set(QUANTIZE_OPS)  # random draws; quantized weights stay quantized


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def _evaluate(node: gs.Node, opsets: list) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    proto = OnnxExporter.export_node(node)
    inputs = [t for t in node.inputs if t.name]
    graph = onnx.helper.make_graph(
        [proto], "fold",
        [onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(t.values).dtype), None)
         for t in inputs],
        [onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.UNDEFINED, None) for t in node.outputs if t.name],
    )
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    feeds = {t.name: np.asarray(t.values) for t in inputs}
    return ReferenceEvaluator(model).run(None, feeds)


def fold_constants(graph: gs.Graph, opsets: list) -> int:
    """Replace nodes whose inputs are all constant by their (evaluated) outputs."""
    folded = 0
    graph.toposort()
    for node in list(graph.nodes):
        if (node.domain or "") not in ("", "ai.onnx") or node.op in _NOT_FOLDED \
                or _has_subgraph(node):
            continue
        if not node.outputs or any(not isinstance(t, gs.Constant) for t in node.inputs if t.name):
            continue
        if node.op != "Constant" and not node.inputs:
            if node.op not in ("ConstantOfShape",):
                continue
        try:
            values = _evaluate(node, opsets)
        except Exception:
            continue
        if sum(np.asarray(v).size for v in values) > _MAX_FOLD_ELEMENTS:
            continue
        outs = [t for t in node.outputs if t.name]
        graph_outputs = {t.name for t in graph.outputs}
        if any(t.name in graph_outputs for t in outs):
            continue
        for t, v in zip(outs, values):
            t.to_constant(np.asarray(v))
        node.outputs.clear()
        folded += 1
    graph.cleanup()
    return folded


def unshare_small_constants(graph: gs.Graph) -> int:
    """Give each consumer its own copy of a shared 1-D or constant-valued initializer.

    Exporters merge identical initializers (all-zero biases, unit norm scales); left shared
    they would couple unrelated layers. Real tied weights (2-D and up, varied values) stay.
    """
    uses: dict[str, list] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and t.name:
                uses.setdefault(t.name, []).append((node, i, t))
    graph_outputs = {t.name for t in graph.outputs}
    copies = 0
    for name, lst in uses.items():
        if len(lst) < 2 or name in graph_outputs:
            continue
        shape = lst[0][2].shape
        values = lst[0][2].values if len(shape) <= 1 or int(np.prod(shape)) <= 1 << 20 else None
        if values is None:
            continue
        values = np.asarray(values)
        if values.ndim > 1 and not (values.size and np.all(values == values.flat[0])):
            continue
        for k, (node, i, t) in enumerate(lst[1:], start=1):
            node.inputs[i] = gs.Constant(f"{name}__gp{k}", np.array(values, copy=True))
            copies += 1
    return copies


def unshare_dequantized_identities(graph: gs.Graph) -> int:
    """Identity copies of a dequantized constant get their own DequantizeLinear of their own copy.

    TorchScript shares equal parameters through Identity nodes, which constant folding turns into
    separate weights; once a quantizer has put the shared parameter behind a DequantizeLinear
    (kept, so the model stays quantized) the Identity copies would tie unrelated layers (an
    embedding LayerNorm's bias with every attention bias). Each Identity becomes a DQ of its own
    copy of the quantized value, scale and zero point.
    """
    from graphprune.oprules.quant import dequant_source

    count = 0
    for node in list(graph.nodes):
        if node.op != "Identity" or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
            continue
        src = dequant_source(node.inputs[0])
        if src is None or not node.outputs:
            continue
        const, dq = src
        count += 1
        inputs = []
        for k, t in enumerate(dq.inputs):
            if isinstance(t, gs.Constant) and t.name:
                inputs.append(gs.Constant(f"{t.name}__gpq{count}", np.array(t.values, copy=True)))
            else:
                inputs.append(t)
        out = node.outputs[0]
        node.op, node.attrs, node.domain = "DequantizeLinear", dict(dq.attrs), dq.domain
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.outputs = [out]
    if count:
        graph.cleanup()
    return count


class NormalizePass(Pass):
    """Fold constants (so weights held in Constant nodes or constant sub-graphs are weights)."""

    name = "normalize"

    def call(self, ctx: PruneContext) -> PassResult:
        model: Model = ctx.model
        n = fold_constants(model.graph, model.meta.opset_imports)
        u = unshare_small_constants(model.graph) + unshare_dequantized_identities(model.graph)
        if n or u:
            ctx.model = Model.from_proto(model.to_proto(infer=False, materialize_data=False), model.meta)
            # the oracle's reference must name tensors as the analysis will
            ctx.input_model = ctx.input_model or ctx.original
            ctx.original = ctx.model.copy()
        return PassResult(modified=bool(n or u), info={"folded": n, "unshared": u})
