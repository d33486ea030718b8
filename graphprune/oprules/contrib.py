"""Rules for onnxruntime contrib ops (com.microsoft) written by onnxruntime.transformers' optimizer."""
from __future__ import annotations

import numpy as np

import onnx_graphsurgeon as gs

from ..cost import CostTerm, concrete_shape, static_size
from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext
from .elementwise import Broadcast, Unary
from .norm import LayerNorm

__all__ = ["register_contrib_rules"]

MS = "com.microsoft"


class SkipLayerNorm(LayerNorm):
    """SkipLayerNormalization (and the simplified, RMS form): LayerNorm(input + skip + bias)
    over the last axis. The hidden axis is pinned, except under prune_hidden: then input,
    skip, gamma, beta, bias and the outputs share its channels, and the statistics are
    taken over the kept ones."""

    def analyze(self, ctx: RuleContext) -> None:
        x, skip = ctx.input(0), ctx.input(1)
        r = len(ctx.shape(x))
        full = [out for out in ctx.node.outputs if out.name and len(ctx.shape(out) or ()) == r]
        for out in full:  # output and input_skip_bias_sum; mean and inv_std_var end in size 1
            for k in range(r - 1):
                ctx.tie(x, k, out, k)
                if skip is not None and len(ctx.shape(skip)) == r:
                    ctx.tie(skip, k, out, k)
        if ctx.policy("prune_hidden", False):
            for out in full:
                ctx.tie(x, r - 1, out, r - 1)
            ctx.statistics(x, r - 1)
            ctx.broadcast([t for t in ctx.node.inputs[1:] if t.name], [x])
            return
        reason = "normalized axis: hidden width is pinned (ask for --prune-hidden to prune it)"
        for t in list(ctx.node.inputs) + list(ctx.node.outputs):
            if t.name and ctx.shape(t):
                ctx.pin(t, len(ctx.shape(t)) - 1, reason)


class Attention(OpRule):
    """com.microsoft Attention with packed QKV weights: whole heads are the units.

    Head h owns columns h*d..(h+1)*d of the Q, K and V sections of the weight (and bias)
    and the same slice of the output; the rewrite lowers num_heads. The past/present state
    ([2, batch, heads, seq, head_size]) follows its heads (it reaches graph inputs/outputs, so
    it is pinned unless prune_kv_cache is set). Unequal qkv_hidden_sizes, a run-time weight,
    a per-head attention bias or a state of another layout pin everything.
    """

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        """The packed QKV projection x . W (batch and sequence as 1 when dynamic)."""
        if len(node.inputs) < 2 or not node.inputs[1].name or not node.inputs[0].name:
            return []
        xs = concrete_shape(node.inputs[0], spatial)
        if xs is None or len(xs) != 3:
            return []
        w, y = node.inputs[1], node.outputs[0]
        terms = [CostTerm(node.name or y.name, static_size(xs[0]) * static_size(xs[1]), [(w.name, 0), (w.name, 1)])]
        # Q.K^T + scores.V over the total key length: present's ([2, B, N, T, d]) where written,
        # else the sequence plus past's; the query hidden is a third of the packed weight
        # (unequal qkv_hidden_sizes pin the op, so the thirds agree whenever heads are pruned)
        ws, ys = concrete_shape(w, spatial), concrete_shape(y, spatial)
        if ws is None or ys is None or len(ws) != 2 or len(ys) != 3:
            return terms
        sizes = node.attrs.get("qkv_hidden_sizes")
        present = concrete_shape(node.outputs[1], spatial) if len(node.outputs) > 1 and node.outputs[1].name else None
        past = concrete_shape(node.inputs[4], spatial) if len(node.inputs) > 4 and node.inputs[4].name else None
        total = static_size(present[3]) if present is not None and len(present) == 5 else \
            static_size(xs[1]) + (static_size(past[3]) if past is not None and len(past) == 5 else 0)
        q_share = (float(sizes[0]) / float(sum(sizes))) if sizes else 1.0 / 3.0
        name = node.name or y.name
        terms += [CostTerm(name, total * q_share, [(y.name, 0), (y.name, 1), (w.name, 1)]),
                  CostTerm(name, float(total), [(y.name, a) for a in range(3)])]
        return terms

    def analyze(self, ctx: RuleContext) -> None:
        x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
        heads = int(ctx.attrs.get("num_heads", 0))
        sizes = ctx.attrs.get("qkv_hidden_sizes")
        states = [t for t in (ctx.input(4), ctx.output(1)) if t is not None]
        bias = ctx.input(5)
        ws = ctx.shape(w)
        if not ctx.is_const(w) or heads <= 0 or len(ws) != 2 or ws[1] % 3 \
                or (sizes and len(set(sizes)) != 1) \
                or any(len(ctx.shape(t) or ()) != 5 or ctx.shape(t)[2] != heads for t in states) \
                or (bias is not None and len(ctx.shape(bias) or ()) == 4 and ctx.shape(bias)[1] != 1):
            ctx.pin_all("Attention with unequal qkv sizes, a run-time weight, a per-head attention bias or an "
                        "unknown past layout is kept whole")
            return
        hidden = ws[1] // 3
        d = hidden // heads
        for i in (3, 5, 6):  # mask index, attention bias, past sequence length: not channels
            ctx.skip(ctx.input(i))
        h = np.arange(heads)
        for t in states:  # [2 (key, value), batch, heads, seq, head_size]: whole heads
            ctx.tie(t, 2, y, 2, h, h * d)
            for ax in (0, 1, 3, 4):
                ctx.skip(t, ax)
        ctx.tie(x, 0, y, 0)
        ctx.tie(x, 1, y, 1)
        ctx.tie(x, 2, w, 0)
        ctx.role(w, 0, "reduce")
        e = np.arange(hidden)
        for section in range(3):
            ctx.tie(w, 1, y, 2, section * hidden + e, e)
            if b is not None:
                ctx.tie(b, 0, y, 2, section * hidden + e, e)
        ctx.role(w, 1, "out")
        if b is not None:
            ctx.role(b, 0, "param")
        ctx.tie(y, 2, y, 2, e, (e // d) * d)  # a head goes whole
        ctx.units(y, 2)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        y = node.outputs[0]
        kept = rctx.kept(y, 2)
        if kept is None:
            return
        hidden = rctx.orig_shape(y)[2]
        d = hidden // int(node.attrs["num_heads"])
        node.attrs["num_heads"] = len(kept) // d
        if node.attrs.get("qkv_hidden_sizes"):
            node.attrs["qkv_hidden_sizes"] = [len(kept)] * 3


def register_contrib_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    for op in ("BiasGelu", "FastGelu", "BiasAdd", "BiasSplitGelu"):
        if op != "BiasSplitGelu":
            reg.register(op, Broadcast(), domain=MS)
    for op in ("Gelu", "QuickGelu"):
        reg.register(op, Unary(), domain=MS)
    reg.register("SkipLayerNormalization", SkipLayerNorm(), domain=MS)
    reg.register("SkipSimplifiedLayerNormalization", SkipLayerNorm(), domain=MS)
    reg.register("Attention", Attention(), domain=MS)
    return reg
