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

from ..quantized import _DOMAINS, _axis, dequant_source, dequant_weight, dequantized, zero_fill
from .base import OpRuleRegistry, RuleContext
from .linear import MatMul

__all__ = ["QDQ_OPS", "QUANTIZE_OPS", "QUANTIZED_OPS", "register_quant_rules", "dequant_source", "dequant_weight",
           "dequantized", "zero_fill",
           "bypass_activation_qdq"]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops that keep values quantized: constant folding leaves them (folding DequantizeLinear(int8 constant)
# would silently turn a QDQ model's weights into float ones)
QUANTIZE_OPS = QDQ_OPS + ("DynamicQuantizeLinear",)
# every op of a quantized graph (onnxruntime fuses them in ways a masked reference can break)
QUANTIZED_OPS = QUANTIZE_OPS + ("MatMulInteger", "ConvInteger")


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


def _dynamic_quantize(ctx: RuleContext) -> None:
    """DynamicQuantizeLinear: y = saturate(round(x / s) + zp) with s and zp from min/max over all
    of x (onnxruntime's dynamic quantization writes it before every MatMulInteger). y is x's
    elementwise; the scalar scale is a statistic over every axis, so an axis that loses channels
    is reduced over the kept ones (the oracle computes it that way)."""
    x, y = ctx.input(0), ctx.output(0)
    if x is None or y is None or ctx.shape(x) is None:
        return
    for k in range(len(ctx.shape(x))):
        ctx.tie(x, k, y, k)
        ctx.statistics(x, k)


class _MatMulInteger(MatMul):
    """MatMulInteger: MatMul on (A - a_zero_point) and (B - b_zero_point); a per-column B zero point
    ([N]) belongs to the output columns, a per-row A zero point ([M]) to A's rows."""

    def analyze(self, ctx: RuleContext) -> None:
        super().analyze(ctx)
        a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
        for zp, t, axis in ((ctx.input(2), a, -2), (ctx.input(3), b, -1)):
            shape = ctx.shape(zp)
            if zp is None or shape is None or int(np.prod(shape, dtype=np.int64)) <= 1:
                continue
            if len(shape) == 1:
                ctx.tie(zp, 0, t, axis)
                ctx.role(zp, 0, "param")
            else:
                ctx.pin(zp, None, "zero point of an unknown layout")

    def weight_layout(self, node: gs.Node):
        return None  # integer operands: costed like a MatMul, no float contraction view


def register_quant_rules(reg: OpRuleRegistry) -> None:
    from .base import FunctionRule

    rule = FunctionRule(_qdq)
    for op in QDQ_OPS:
        for domain in ("", "com.microsoft"):
            reg.register(op, rule, domain=domain)
    reg.register("DynamicQuantizeLinear", FunctionRule(_dynamic_quantize))
    reg.register("MatMulInteger", _MatMulInteger())


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


def exact_integer_matmuls(proto):
    """A copy of `proto` whose MatMulInteger nodes compute in float64 (exact for int8 x int8 sums of
    any practical length) instead of onnxruntime's integer kernels, which saturate u8 x s8 pair
    sums to int16 on AVX2: the saturation depends on which K elements sit side by side, so a
    pruned (shorter) K changes it although the math is unchanged. The oracle compares with this
    form. A per-row A zero point is left to the integer kernel. Returns `proto` itself when
    nothing changes."""
    import onnx
    from onnx import TensorProto, helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    targets = []
    for n in graph.node:
        if n.op_type != "MatMulInteger" or (n.domain or "") not in ("", "ai.onnx"):
            continue
        azp = n.input[2] if len(n.input) > 2 and n.input[2] else ""
        if azp in consts and len(consts[azp].dims) == 1 and consts[azp].dims[0] > 1:
            continue
        targets.append(n)
    if not targets:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names = {o for n in out.graph.node for o in n.output} | {t.name for t in out.graph.initializer}
    counter = iter(range(1 << 30))

    def fresh(base):
        while True:
            name = f"{base}_gpexact{next(counter)}"
            if name not in names:
                names.add(name)
                return name

    target_names = {id(n) for n in targets}
    new_nodes = []
    for orig, n in zip(graph.node, out.graph.node):
        if id(orig) not in target_names:
            new_nodes.append(n)
            continue
        operands = []
        for i, zp_i in ((0, 2), (1, 3)):
            x = fresh(n.input[i])
            new_nodes.append(helper.make_node("Cast", [n.input[i]], [x], to=TensorProto.DOUBLE))
            if len(n.input) > zp_i and n.input[zp_i]:
                z, d = fresh(n.input[zp_i]), fresh(n.input[i])
                new_nodes.append(helper.make_node("Cast", [n.input[zp_i]], [z], to=TensorProto.DOUBLE))
                new_nodes.append(helper.make_node("Sub", [x, z], [d]))
                x = d
            operands.append(x)
        y = fresh(n.output[0])
        new_nodes.append(helper.make_node("MatMul", operands, [y]))
        new_nodes.append(helper.make_node("Cast", [y], [n.output[0]], to=TensorProto.INT32))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out
