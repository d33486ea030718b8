"""QuantizeLinear / DequantizeLinear (QDQ) rules: INT8 models from onnxruntime's quantizer,
TensorRT-style explicit quantization (pytorch-quantization, ModelOpt), TF-Lite converters.

A Q or DQ node is elementwise: every axis of `x` is the same axis of `y`. A per-axis
(1-D) scale and zero point belong to the channels of `axis` and are sliced with them; a
per-tensor (scalar) one is left alone. Blocked quantization (opset 21's `block_size`) pins
its axis: a block's scale covers several channels.

A weight stored as an integer initializer behind a DequantizeLinear is a weight to the rest
of graphprune: the consumer's role for the DQ output (Conv W axis 0 = output channels, ...)
goes to the integer constant (see `RuleContext.role`), criteria read the dequantized values
(:func:`dequantized`) and the oracle zeroes a removed channel by writing its zero point
(:func:`zero_fill`), so the model stays quantized and the removed channels contribute nothing.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import OpRuleRegistry, RuleContext

__all__ = ["register_quant_rules", "dequant_source", "dequant_weight", "dequantized", "zero_fill",
           "bypass_activation_qdq"]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _axis(node: gs.Node, rank: int) -> int:
    axis = int(node.attrs.get("axis", 1))
    return axis + rank if axis < 0 else axis


def _qdq(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    if x is None or y is None or ctx.shape(y) is None:
        return
    rank = len(ctx.shape(y))
    for k in range(rank):
        ctx.tie(x, k, y, k)
    axis = _axis(ctx.node, rank) if rank else 0
    blocked = int(ctx.attrs.get("block_size", 0) or 0) > 0
    dequant = ctx.op == "DequantizeLinear"
    for p in (ctx.input(1), ctx.input(2)):
        shape = ctx.shape(p)
        if p is None or shape is None or int(np.prod(shape, dtype=np.int64)) <= 1:
            continue
        if blocked and len(shape) == rank:
            # opset 21 blocked form: the scale has x's rank; along `axis` one entry covers block_size
            # channels (pinned), every other axis is x's own
            reason = f"blocked quantization (block_size {ctx.attrs.get('block_size')}): one scale covers " \
                     "several channels"
            for k in range(rank):
                if k == axis:
                    ctx.pin(y, k, reason)
                    ctx.pin(p, k, reason)
                else:
                    ctx.tie(p, k, y, k)
                    if dequant:
                        ctx.role(p, k, "param")
            continue
        if len(shape) != 1:
            ctx.pin(y, None, f"quantization parameters of shape {list(shape)}")
            ctx.pin(p, None, "quantization parameters of an unknown layout")
            continue
        ctx.tie(p, 0, y, axis)
        if dequant:  # zeroing a DQ scale zeroes the channel; a Q scale is a divisor and keeps no role
            ctx.role(p, 0, "param")


def register_quant_rules(reg: OpRuleRegistry) -> None:
    from .base import FunctionRule

    rule = FunctionRule(_qdq)
    for op in QDQ_OPS:
        for domain in ("", "com.microsoft"):
            reg.register(op, rule, domain=domain)


# --------------------------------------------------------------------------- quantized weights


def dequant_source(t: gs.Tensor) -> "tuple[gs.Constant, gs.Node] | None":
    """(integer constant, DequantizeLinear node) when `t` is the output of a DQ of a constant."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "DequantizeLinear" or (node.domain or "") not in _DOMAINS or not node.inputs:
        return None
    src = node.inputs[0]
    return (src, node) if isinstance(src, gs.Constant) else None


def _dq_consumer(c: gs.Constant) -> gs.Node | None:
    """The DequantizeLinear that reads `c` as its quantized input, if every use of `c` is one."""
    users = [n for n in c.outputs]
    if not users or any(n.op != "DequantizeLinear" or (n.domain or "") not in _DOMAINS or n.inputs[0] is not c
                        for n in users):
        return None
    return users[0]


def dequant_weight(c: gs.Constant) -> bool:
    """Whether `c` is an integer weight that only DequantizeLinear reads (a quantized parameter)."""
    return np.dtype(c.dtype).kind in "iub" and _dq_consumer(c) is not None


def _params(node: gs.Node, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a DQ node, shaped to broadcast against its rank-`rank` input."""
    def get(i, default):
        if i < len(node.inputs) and node.inputs[i].name and isinstance(node.inputs[i], gs.Constant):
            return np.asarray(node.inputs[i].values)
        return np.asarray(default)

    scale = get(1, 1.0).astype(np.float64)
    zp = get(2, 0).astype(np.float64)
    shape = [1] * rank
    if scale.ndim == 1 and scale.size > 1 and rank:
        shape[_axis(node, rank)] = scale.size
        scale = scale.reshape(shape)
    if zp.ndim == 1 and zp.size > 1 and rank:
        shape = [1] * rank
        shape[_axis(node, rank)] = zp.size
        zp = zp.reshape(shape)
    return scale, zp


def dequantized(c: gs.Tensor) -> np.ndarray | None:
    """The float values an integer constant stands for, when it is only read by DequantizeLinear
    (per-tensor or per-axis scale); None otherwise."""
    if not isinstance(c, gs.Constant) or np.asarray(c.values).dtype.kind not in "iub":
        return None
    node = _dq_consumer(c)
    if node is None or int(node.attrs.get("block_size", 0) or 0) > 0:
        return None
    v = np.asarray(c.values)
    scale, zp = _params(node, v.ndim)
    return ((v.astype(np.float64) - zp) * scale).astype(np.float32)


def zero_fill(c: gs.Constant, axis: int, idx: np.ndarray) -> np.ndarray:
    """`c`'s values with elements `idx` of `axis` set to what means 0: the zero point when `c` is
    a quantized weight read by DequantizeLinear, else 0."""
    values = np.array(c.values, copy=True)
    sl = [slice(None)] * values.ndim
    sl[axis] = idx
    node = _dq_consumer(c) if values.dtype.kind in "iub" else None
    if node is None:
        values[tuple(sl)] = 0
        return values
    _, zp = _params(node, values.ndim)
    full = np.broadcast_to(zp, values.shape).astype(values.dtype)
    values[tuple(sl)] = full[tuple(sl)]
    return values


def bypass_activation_qdq(proto):
    """A copy of `proto` with every activation QuantizeLinear -> DequantizeLinear pair removed
    (the DQ outputs read the Q input directly); weight and bias constants keep their DQ.

    The oracle compares a pruned quantized model with its masked original this way: fake
    quantization rounds each activation to a grid, so float32 summation-order differences of
    1e-7 between two exactly equivalent graphs flip values by a whole quantum. Without the
    activation rounding the comparison is exact again and still covers every sliced weight,
    scale and zero point. Returns `proto` itself when it has no such pair.
    """
    import onnx

    graph = proto.graph
    consts = {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop = set()
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or (n.domain or "") not in _DOMAINS or n.input[0] in consts:
            continue
        dqs = users.get(n.output[0], [])
        if not dqs or n.output[0] in outputs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        drop.add(id(n))
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = n.input[0]
    if not drop:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    kept = [n for n, orig in zip(g.node, graph.node) if id(orig) not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    for o in g.output:
        if o.name in rename:  # a DQ output that is a graph output: keep its name through an Identity
            kept.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name]))
    del g.node[:]
    g.node.extend(kept)
    return out
