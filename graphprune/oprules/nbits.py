"""com.microsoft MatMulNBits: block-quantized weights (2-8 bits) of onnxruntime-genai's int4 folders.

Spec: Y[..., N] = A[..., K] x dequant(B)^T with B uint8 [N, k_blocks, block_size * bits / 8]
(each block's values packed low bits first), scales [N, k_blocks] (or flat [N * k_blocks]),
optional zero_points (uint8 packed [N, ceil(k_blocks * bits / 8)], or [N, k_blocks] of the
scales' type), g_idx [K], bias [N]; attributes K, N, bits, block_size.

- Output rows (N) are free: row n of B, scales, zero points and bias goes with output channel n.
- Input columns (K) go only in whole quantization blocks (so no weight is re-quantized and the
  pruned op computes exactly what the masked original does); a packed uint8 zero-point byte holds
  8 / bits blocks, which then go together. With g_idx (act-order) or flat scales K is pinned.

The oracle zeroes a removed channel through the scales (scale 0 dequantizes any code to 0);
criteria read the dequantized weight (graphprune.quantized.dequantize_nbits).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext
from .linear import matmul_cost_terms

__all__ = ["MatMulNBits", "GatherBlockQuantized", "float_activation_nbits", "register_nbits_rules"]

MS = "com.microsoft"


class MatMulNBits(OpRule):
    def cost_terms(self, node: gs.Node, spatial: dict | None = None):
        return matmul_cost_terms(node)  # A[..., K] @ dequantized B[K, N]

    def analyze(self, ctx: RuleContext) -> None:
        a, b, scales, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
        zp, g_idx, bias = ctx.input(3), ctx.input(4), ctx.input(5)
        a_s, b_s, y_s = ctx.shape(a), ctx.shape(b), ctx.shape(y)
        bits, bs = int(ctx.attrs.get("bits", 4)), int(ctx.attrs.get("block_size", 0))
        k, n = int(ctx.attrs.get("K", 0)), int(ctx.attrs.get("N", 0))
        if (a_s is None or y_s is None or b_s is None or len(b_s) != 3 or b_s[0] != n or bs <= 0
                or not ctx.is_const(b) or not ctx.is_const(scales) or bits not in (1, 2, 4, 8)
                or (zp is not None and not ctx.is_const(zp)) or a_s[-1] != k or y_s[-1] != n):
            ctx.pin_all(f"MatMulNBits {ctx.node.name}: run-time or unexpected weight layout is kept whole")
            return
        kb = b_s[1]
        for j in range(len(a_s) - 1):
            ctx.tie(a, j, y, j)
        # output rows: B, scales, zero points, bias follow output channel n
        ctx.tie(b, 0, y, -1)
        ctx.role(b, 0, "out")
        ctx.skip(b, 2)
        s_s = ctx.shape(scales)
        e = np.arange(n * kb)
        if len(s_s) == 1:
            ctx.tie(scales, 0, y, -1, e, e // kb)
        else:
            ctx.tie(scales, 0, y, -1)
        ctx.role(scales, 0, "out")
        if zp is not None:
            if len(ctx.shape(zp)) == 2:
                ctx.tie(zp, 0, y, -1)
                ctx.role(zp, 0, "param")
            else:
                ctx.pin(zp, 0, "flat zero points")
        if bias is not None:
            ctx.tie(bias, 0, y, -1)
            ctx.role(bias, 0, "param")
        # input columns: whole quantization blocks (and the blocks sharing a zero-point byte)
        if g_idx is not None:
            ctx.skip(g_idx)
            ctx.pin(a, -1, "MatMulNBits with g_idx: input columns are kept (act-order blocks)")
            ctx.skip(b, 1)
            if len(s_s) == 2:
                ctx.skip(scales, 1)
            if zp is not None:
                ctx.skip(zp, 1)
            return
        cols = np.arange(k)
        block = cols // bs
        unit = block
        if zp is not None and np.asarray(ctx.value(zp)).dtype == np.uint8 and bits < 8:
            unit = block // (8 // bits)  # blocks sharing a zero-point byte go together
            ctx.tie(a, -1, zp, 1, cols, unit)
        elif zp is not None:
            ctx.tie(a, -1, zp, 1, cols, block)
        first = np.searchsorted(unit, unit)  # the first column of each unit
        ctx.tie(a, -1, a, -1, cols, first)
        ctx.tie(a, -1, b, 1, cols, block)
        ctx.role(b, 1, "reduce")
        if len(s_s) == 2:
            ctx.tie(a, -1, scales, 1, cols, block)
            ctx.role(scales, 1, "reduce")
        else:
            ctx.pin(a, -1, "MatMulNBits with flat scales: input columns are kept")

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        a, y = node.inputs[0], node.outputs[0]
        kept_k, kept_n = rctx.kept(a, -1), rctx.kept(y, -1)
        if kept_k is not None:
            node.attrs["K"] = int(len(kept_k))
        if kept_n is not None:  # flat scales are sliced elementwise by their tie (n * k_blocks + j)
            node.attrs["N"] = int(len(kept_n))


class GatherBlockQuantized(OpRule):
    """com.microsoft GatherBlockQuantized: a block-quantized embedding table. With gather_axis 0 and
    quantize_axis the table's last axis (the builder's layout: data [vocab, hidden * bits / 8] uint8,
    scales [vocab, hidden / block_size]), the output's last axis (hidden) is a channel axis in whole
    quantization blocks (and the blocks sharing a packed zero-point byte); anything else, or a table
    computed at run time (a Reshape of a tied LM head's MatMulNBits weight), is kept whole."""

    def analyze(self, ctx: RuleContext) -> None:
        data, idx, scales, zp, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.input(3), ctx.output(0)
        ds, ys, ss = ctx.shape(data), ctx.shape(y), ctx.shape(scales)
        bits, bs = int(ctx.attrs.get("bits", 4)), int(ctx.attrs.get("block_size", 128))
        ga, qa = int(ctx.attrs.get("gather_axis", 0)), int(ctx.attrs.get("quantize_axis", 1))
        ok = (isinstance(data, gs.Constant) and isinstance(scales, gs.Constant) and ds is not None
              and len(ds) == 2 and ga == 0 and qa in (1, -1) and ys is not None and bits in (4, 8)
              and (zp is None or isinstance(zp, gs.Constant)) and ss is not None and len(ss) == 2
              and isinstance(ys[-1], int) and ds[1] * 8 // bits == ys[-1])
        if not ok:
            ctx.pin_all(f"GatherBlockQuantized {ctx.node.name}: a run-time or unexpected table layout is kept whole")
            return
        hidden, per = ys[-1], 8 // bits
        ctx.skip(idx)
        ctx.skip(data, 0)
        ctx.skip(scales, 0)
        for k, _ in enumerate(ctx.shape(idx) or ()):
            ctx.tie(idx, k, y, k)
        h = np.arange(hidden)
        unit = h // bs
        if zp is not None and np.asarray(ctx.value(zp)).dtype == np.uint8 and per > 1:
            unit = unit // per
            ctx.tie(y, -1, zp, 1, h, unit)
            ctx.skip(zp, 0)
        elif zp is not None:
            ctx.tie(y, -1, zp, 1, h, h // bs)
            ctx.skip(zp, 0)
        ctx.tie(y, -1, y, -1, h, np.searchsorted(unit, unit))  # whole blocks
        ctx.tie(y, -1, data, 1, h, h // per)
        ctx.tie(y, -1, scales, 1, h, h // bs)
        ctx.role(data, 1, "out")  # the table produces the hidden channels, as an embedding does
        ctx.role(scales, 1, "param")


def register_nbits_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    reg.register("MatMulNBits", MatMulNBits(), domain=MS)
    reg.register("GatherBlockQuantized", GatherBlockQuantized(), domain=MS)
    return reg


def float_activation_nbits(proto):
    """A copy of `proto` whose MatMulNBits nodes compute with float activations (accuracy_level 0),
    or `proto` itself when none quantizes them. accuracy_level 4 quantizes each row of A to int8 on
    the fly; the oracle's masked original still holds values in the removed columns (zeroed only
    through the weight), which would change that rounding, so both sides are compared unquantized."""
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"
             and any(a.name == "accuracy_level" and a.i != 0 for a in n.attribute)]
    if not nodes:
        return proto
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for n in out.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    return out
