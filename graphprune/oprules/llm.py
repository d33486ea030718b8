"""Contrib ops of onnxruntime-genai's model builder: packed GroupQueryAttention, RotaryEmbedding,
SimplifiedLayerNormalization.

GroupQueryAttention with packed QKV (com.microsoft spec: `key` and `value` absent, `query` is
[batch, seq, (num_heads + 2 * kv_num_heads) * head_size] with the Q heads, then the K heads,
then the V heads): KV head g, its K and V columns and the query heads g*rep .. (g+1)*rep - 1
(rep = num_heads / kv_num_heads) are one unit, so whole KV groups go and head_size stays (the
rotary cos/sin caches, [max_seq, rotary_dim / 2], do not change). The rewrite lowers num_heads
and kv_num_heads; the past/present caches ([batch, kv_heads, seq, head_size]) follow their KV
head (they reach graph inputs/outputs: pinned unless prune_kv_cache). Separate Q/K/V are the
existing :class:`FlatHeadsAttention` rule.

RotaryEmbedding (com.microsoft, and ONNX opset 23): elementwise over whole heads; 3-D input
[batch, seq, heads * head_size] keeps head_size and the rewrite lowers num_heads; 4-D input
[batch, heads, seq, head_size] prunes the head axis freely.

SimplifiedLayerNormalization (RMS norm, ONNX domain in onnxruntime): as LayerNormalization.
"""
from __future__ import annotations

import numpy as np

from .attention import FlatHeadsAttention
from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext
from .norm import LayerNorm

__all__ = ["PackedGroupQueryAttention", "RotaryEmbedding", "register_llm_rules"]

MS = "com.microsoft"


def packed_head_size(width, hq: int, hkv: int) -> int | None:
    """head_size of a packed QKV axis of `width` = (hq + 2 hkv) * head_size, or None."""
    n = hq + 2 * hkv
    if not isinstance(width, int) or width <= 0 or hq <= 0 or hkv <= 0 or hq % hkv or width % n:
        return None
    return width // n


class PackedGroupQueryAttention(FlatHeadsAttention):
    """GroupQueryAttention: packed QKV here, separate Q/K/V in :class:`FlatHeadsAttention`."""

    def __init__(self):
        # query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        # position_ids, attention_bias, head_sink -> output, present_key, present_value, output_qk
        super().__init__(past=(3, 4), present=(1, 2), skipped=(5, 6, 7, 8, 9), per_head=(10, 11), bias=None,
                         kv_attr="kv_num_heads")

    @staticmethod
    def _packed(ctx_or_node) -> bool:
        node = getattr(ctx_or_node, "node", ctx_or_node)
        return not any(i < len(node.inputs) and node.inputs[i].name for i in (1, 2))

    def analyze(self, ctx: RuleContext) -> None:
        if not self._packed(ctx):
            super().analyze(ctx)
            return
        why = self._tie_packed(ctx)
        if why is not None:
            ctx.pin_all(f"{ctx.op} {ctx.node.name}: {why} is kept whole")
            return
        for i in self.skipped:
            ctx.skip(ctx.input(i))

    def _tie_packed(self, ctx: RuleContext) -> str | None:
        qkv, y = ctx.input(0), ctx.output(0)
        hq, hkv = self._heads(ctx.attrs)
        qs, ys = ctx.shape(qkv), ctx.shape(y)
        if qs is None or ys is None or len(qs) != 3 or len(ys) != 3:
            return "packed QKV that is not 3-D"
        if any(ctx.input(i) is not None for i in self.per_head) or any(
                ctx.output(i) is not None for i in range(3, len(ctx.node.outputs))):
            return "a per-head input (attention bias, head sink) or a QK output"
        d = packed_head_size(qs[2], hq, hkv)
        if d is None or ys[2] != hq * d:
            return "packed QKV width that is not (num_heads + 2 kv_num_heads) x head_size"
        rep = hq // hkv
        e = np.arange(qs[2])
        head = e // d  # Q heads 0..hq-1, then K heads, then V heads
        group = np.where(head < hq, head // rep, np.where(head < hq + hkv, head - hq, head - hq - hkv))
        ctx.tie(qkv, 2, qkv, 2, e, group * rep * d)  # a KV group (its K, V and query heads) goes whole
        ey = np.arange(ys[2])
        ctx.tie(y, 2, qkv, 2, ey, (ey // d // rep) * rep * d)
        ctx.units(qkv, 2)
        ctx.units(y, 2)
        ctx.tie(qkv, 0, y, 0)
        ctx.tie(qkv, 1, y, 1)
        g = np.arange(hkv)
        for cache in [ctx.input(i) for i in self.past] + [ctx.output(i) for i in self.present]:
            if cache is None:
                continue
            cs = ctx.shape(cache)
            if cs is None or len(cs) != 4 or cs[1] != hkv or (isinstance(cs[3], int) and cs[3] != d):
                return "cache that is not [batch, kv_heads, seq, head_size]"
            ctx.tie(cache, 1, qkv, 2, g, g * rep * d)
            for ax in (0, 2, 3):  # batch, sequence; head_size stays (whole heads only)
                ctx.skip(cache, ax)
        return None

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        if not self._packed(node):
            super().rewrite(rctx)
            return
        qkv = node.inputs[0]
        kept = rctx.kept(qkv, 2)
        if kept is None:
            return
        hq, hkv = self._heads(node.attrs)
        d = packed_head_size(rctx.orig_shape(qkv)[2], hq, hkv)
        head = kept // d
        node.attrs["num_heads"] = int(np.count_nonzero(head < hq)) // d
        node.attrs["kv_num_heads"] = int(np.count_nonzero((head >= hq) & (head < hq + hkv))) // d


class RotaryEmbedding(OpRule):
    """RotaryEmbedding: input [batch, seq, heads * head_size] or [batch, heads, seq, head_size],
    position_ids, cos_cache, sin_cache -> output of the input's shape. Heads are independent;
    head_size is pinned (the rotation pairs its elements and the caches are per head_size)."""

    def __init__(self, order: tuple = (0, 1, 2, 3)):
        # positions of (input, position_ids, cos_cache, sin_cache): the contrib op and ONNX differ
        self.order = order

    def _num_heads(self, ctx_or_rctx, width: int) -> int:
        return int(ctx_or_rctx.node.attrs.get("num_heads", 0) or 0)

    def _head_size(self, ctx: RuleContext, width) -> int | None:
        heads = self._num_heads(ctx, width)
        if heads > 0 and isinstance(width, int) and width % heads == 0:
            return width // heads
        rot = int(ctx.attrs.get("rotary_embedding_dim", 0) or 0)
        cos = ctx.shape(ctx.input(self.order[2]))
        if rot == 0 and cos is not None and isinstance(cos[-1], int):
            return 2 * cos[-1]  # full rotary: head_size = 2 x the cache's last axis
        return None

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(self.order[0]), ctx.output(0)
        xs = ctx.shape(x)
        for i in self.order[1:]:
            ctx.skip(ctx.input(i))
        if xs is None or len(xs) not in (3, 4):
            ctx.pin_all(f"RotaryEmbedding {ctx.node.name}: input of unknown rank is kept whole")
            return
        for k in range(len(xs)):
            ctx.tie(x, k, y, k)
        if len(xs) == 4:
            ctx.pin(x, 3, "rotary head_size (the rotation pairs its elements)")
            ctx.units(x, 1)
            return
        d = self._head_size(ctx, xs[2])
        if d is None or not isinstance(xs[2], int) or xs[2] % d:
            ctx.pin(x, 2, "rotary input whose head size is unknown")
            return
        e = np.arange(xs[2])
        ctx.tie(x, 2, x, 2, e, (e // d) * d)  # whole heads
        ctx.units(x, 2)

    def rewrite(self, rctx: RewriteContext) -> None:
        x = rctx.node.inputs[self.order[0]]
        shape = rctx.orig_shape(x)
        kept = rctx.kept(x, 2)
        heads = int(rctx.node.attrs.get("num_heads", 0) or 0)
        if kept is None or shape is None or len(shape) != 3 or heads <= 0:
            return
        rctx.node.attrs["num_heads"] = len(kept) // (shape[2] // heads)


def register_llm_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    reg.register("GroupQueryAttention", PackedGroupQueryAttention(), domain=MS)
    reg.register("RotaryEmbedding", RotaryEmbedding((0, 1, 2, 3)), domain=MS)
    reg.register("RotaryEmbedding", RotaryEmbedding((0, 3, 1, 2)), since=23)  # X, cos, sin, position_ids
    for domain in ("", MS):
        reg.register("SimplifiedLayerNormalization", LayerNorm(), domain=domain)
    return reg
