"""What onnx2torch needs before it converts a graph: newer op versions aliased to converters whose ONNX
signature did not change, and graph patches for what it cannot convert as exported."""
from __future__ import annotations

import numpy as np
import onnx

from .base import _TWO_GB

__all__: list[str] = []


_ALIASED = False


def _signature(schema) -> tuple:
    return (tuple(i.name for i in schema.inputs), tuple(o.name for o in schema.outputs),
            tuple(sorted(schema.attributes)))


def _alias_onnx2torch_versions() -> None:
    """Let onnx2torch convert newer versions of ops whose ONNX signature did not change.

    onnx2torch looks converters up by the op's exact since-version, so e.g. GreaterOrEqual-16 or
    Where-16 (which only added types) are "not implemented". For each registered op, a later
    version with the same input, output and attribute names in the ONNX schema reuses the
    nearest earlier converter; versions whose signature changed (ReduceMean-18's axes input)
    are left unconverted, and their error names the op.
    """
    global _ALIASED
    if _ALIASED:
        return
    _ALIASED = True
    try:
        from onnx import defs
        from onnx2torch.node_converters import registry
    except ImportError:
        return
    table = registry._CONVERTER_REGISTRY
    history: dict = {}
    for schema in defs.get_all_schemas_with_history():
        history.setdefault((schema.domain, schema.name), []).append(schema)
    for (domain, op), schemas in history.items():
        known = {d.version: conv for d, conv in table.items() if d.operation_type == op and d.domain == domain}
        if not known:
            continue
        schemas.sort(key=lambda sc: sc.since_version)
        previous = None  # (schema, converter) of the nearest earlier version that converts
        for sc in schemas:
            if sc.since_version in known:
                previous = (sc, known[sc.since_version])
            elif previous is not None and _signature(sc) == _signature(previous[0]):
                table[registry.OperationDescription(domain, op, sc.since_version)] = previous[1]
                previous = (sc, previous[1])
            else:
                previous = None


def _for_onnx2torch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` that onnx2torch converts faithfully (same function).

    - Identity nodes of initializers (TorchScript shares equal weights that way) become
      initializers: onnx2torch reads Conv/Gemm weights and biases from the initializer list only.
    - Flatten with axis equal to the input's rank (output [N, 1]) becomes Reshape to [-1, 1]:
      onnx2torch's Flatten fails on it.
    - Dropout whose mask output is unused becomes Identity (inference: the output is the input);
      onnx2torch has no converter for the old versions (Caffe2 exports use Dropout-7).
    """
    from onnx import helper, numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
             and n.input and n.input[0] in init]
    flattens = [n for n in proto.graph.node if n.op_type == "Flatten" and n.domain in ("", "ai.onnx")]
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    dropouts = [n for n in proto.graph.node if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")
                and not (len(n.output) > 1 and n.output[1] and n.output[1] in used)]
    if not nodes and not flattens and not dropouts:
        return proto
    proto = onnx.ModelProto.FromString(proto.SerializeToString()) if proto.ByteSize() < _TWO_GB else proto
    for n in proto.graph.node:
        if n.op_type == "Dropout" and n.domain in ("", "ai.onnx") and \
                not (len(n.output) > 1 and n.output[1] and n.output[1] in used):
            n.CopyFrom(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    if flattens:
        try:
            from ..model_io import without_weights  # ranks need no weight: none is serialized

            inferred = onnx.shape_inference.infer_shapes(without_weights(proto)[0], strict_mode=False)
            ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
                     [*inferred.graph.value_info, *inferred.graph.input]
                     if vi.type.tensor_type.HasField("shape")}
        except Exception:
            ranks = {}
        for n in proto.graph.node:
            if n.op_type != "Flatten" or n.domain not in ("", "ai.onnx"):
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            rank = ranks.get(n.input[0])
            if rank is not None and axis == rank:
                shape_name = f"{n.output[0]}__graphprune_flatten_shape"
                proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), shape_name))
                n.CopyFrom(helper.make_node("Reshape", [n.input[0], shape_name], list(n.output), name=n.name))
    if not nodes:
        return proto
    drop = {n.output[0] for n in nodes}
    kept = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in drop
                                                 and n.input and n.input[0] in init)]
    for n in nodes:
        copy = onnx.TensorProto()
        copy.CopyFrom(init[n.input[0]])
        copy.name = n.output[0]
        proto.graph.initializer.append(copy)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto
