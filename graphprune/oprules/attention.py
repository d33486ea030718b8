"""Fused attention ops: whole heads (or whole KV groups) are the units.

The ONNX opset-23 ``Attention`` op (3-D inputs with q_num_heads/kv_num_heads, or 4-D
[batch, heads, seq, head_size]) and onnxruntime's com.microsoft ``MultiHeadAttention``
and ``GroupQueryAttention``. A query head h reads KV head h // (q_heads / kv_heads),
so a KV head and the query heads sharing it go together; the past/present caches'
head axis follows its KV head (the caches reach graph inputs/outputs, so they stay
pinned unless ``prune_kv_cache`` is set). Anything the rules cannot follow (packed QKV,
per-head masks or biases, QK outputs, 4-D keys in the 3-D form) pins the whole op.
"""
from __future__ import annotations

import math

import numpy as np

from ..cost import CostTerm, concrete_shape, static_size
from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext

__all__ = ["OnnxAttention", "FlatHeadsAttention", "tie_flat_heads", "register_attention_rules", "attention_core_terms"]


def _input(node, i: int):
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


def _output(node, i: int):
    return node.outputs[i] if i < len(node.outputs) and node.outputs[i].name else None


def attention_core_terms(node, spatial, q_axes: list, y_axes: list, total) -> list[CostTerm]:
    """Q.K^T and scores.V of a fused attention op: every query position meets `total` key
    positions, once per query-hidden element (Q.K^T) and once per value-hidden element of the
    output (scores.V). `q_axes`/`y_axes`: (tensor, axis) pairs whose sizes multiply to the query's
    and the output's element counts; `total`: the total key length (a concrete shape's size; 1 when
    unknown, as for other dynamic axes)."""
    name = node.name or node.outputs[0].name
    t = static_size(total)
    return [CostTerm(name, float(t), list(q_axes)), CostTerm(name, float(t), list(y_axes))]


def _seq_len(t, spatial, axis: int) -> int:
    s = concrete_shape(t, spatial) if t is not None else None
    return static_size(s[axis]) if s is not None and len(s) > axis else 0


def _rank(ctx: RuleContext, t) -> int:
    return len(ctx.shape(t) or ())


def _static(n) -> bool:
    return isinstance(n, int) and n > 0


def tie_flat_heads(ctx: RuleContext, q, k, v, y, hq: int, hkv: int, past=(), present=()) -> str | None:
    """Tie [B, S, heads*D] query/key/value/output axes head by head; a KV group is one unit.

    `past`/`present` are (key, value) pairs of [B, kv_heads, seq, D] caches (or None).
    Returns why the op cannot be followed, or None when it is tied.
    """
    qs, ks, vs, ys = (ctx.shape(t) for t in (q, k, v, y))
    if any(s is None or len(s) != 3 for s in (qs, ks, vs, ys)):
        return "needs 3-D query, key, value and output"
    if not all(_static(s[2]) for s in (qs, ks, vs, ys)) or hq <= 0 or hkv <= 0 or hq % hkv:
        return "head counts do not divide the hidden sizes"
    d, dk, dv = qs[2] // hq, ks[2] // hkv, vs[2] // hkv
    if d * hq != qs[2] or dk != d or dv * hkv != vs[2] or ys[2] != hq * dv:
        return "head sizes do not match"
    rep = hq // hkv
    eq, ey = np.arange(hq * d), np.arange(hq * dv)
    ctx.tie(q, 2, k, 2, eq, (eq // d // rep) * d + eq % d)
    ctx.tie(y, 2, v, 2, ey, (ey // dv // rep) * dv + ey % dv)
    ctx.tie(y, 2, q, 2, ey, (ey // dv) * d)
    ctx.tie(q, 2, q, 2, eq, (eq // (rep * d)) * rep * d)  # a KV group goes whole
    ctx.units(q, 2)
    ctx.units(y, 2)
    ctx.tie(q, 0, y, 0)
    ctx.tie(q, 1, y, 1)
    for t in (k, v):
        ctx.skip(t, 0)
        ctx.skip(t, 1)
    g = np.arange(hkv)
    for pair in (past, present):
        for cache, src, width in zip(pair, (k, v), (d, dv)):
            if cache is None:
                continue
            cs = ctx.shape(cache)
            if len(cs or ()) != 4 or cs[1] != hkv:
                return "cache is not [batch, kv_heads, seq, head_size]"
            ctx.tie(cache, 1, src, 2, g, g * width)
            for ax in (0, 2, 3):  # batch, sequence; head_size stays (whole heads only)
                ctx.skip(cache, ax)
    return None


def _lower_heads(rctx: RewriteContext, t, attr: str, width: int) -> None:
    kept = rctx.kept(t, 2)
    if kept is not None:
        rctx.node.attrs[attr] = len(kept) // width


class FlatHeadsAttention(OpRule):
    """com.microsoft MultiHeadAttention / GroupQueryAttention with separate 3-D Q, K, V.

    Input/output positions follow the contrib op spec; `kv_attr` is the attribute holding
    the KV head count (None: as many as query heads).
    """

    def __init__(self, past: tuple, present: tuple, skipped: tuple, per_head: tuple, bias: int | None,
                 kv_attr: str | None):
        self.past, self.present, self.skipped = past, present, skipped
        self.per_head, self.bias, self.kv_attr = per_head, bias, kv_attr

    def cost_terms(self, node, spatial=None) -> list[CostTerm]:
        """Q.K^T + scores.V over the total key length: the past's length (past_key [B, kv_heads, P, d])
        plus the new keys' (key [B, L, D] or [B, N, L, d]; with QKV packed in the query, the query's
        own length), as the contrib op specs define total_sequence_length."""
        q, y = _input(node, 0), _output(node, 0)
        ys = concrete_shape(y, spatial) if y is not None else None
        qs = concrete_shape(q, spatial) if q is not None else None
        if ys is None or qs is None or len(ys) != 3:
            return []
        k = _input(node, 1)
        ks = concrete_shape(k, spatial) if k is not None else None
        new = static_size(ks[1]) if ks is not None and len(ks) == 3 else \
            static_size(ks[2]) if ks is not None and len(ks) == 4 else static_size(ys[1])
        total = new + _seq_len(_input(node, self.past[0]), spatial, 2)
        y_axes = [(y.name, a) for a in range(3)]
        separate_q = len(qs) == 3 and k is not None
        q_axes = [(y.name, 0), (y.name, 1), (q.name, 2)] if separate_q else y_axes  # packed: head sizes agree
        return attention_core_terms(node, spatial, q_axes, y_axes, total)

    def _heads(self, attrs) -> tuple[int, int]:
        hq = int(attrs.get("num_heads", 0))
        return hq, int(attrs.get(self.kv_attr, 0)) if self.kv_attr else hq

    def analyze(self, ctx: RuleContext) -> None:
        q, k, v, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
        hq, hkv = self._heads(ctx.attrs)
        why = None
        if k is None or v is None or _rank(ctx, q) != 3 or _rank(ctx, k) != 3:
            why = "packed QKV or 4-D key/value"
        elif any(ctx.input(i) is not None for i in self.per_head) or any(
                ctx.output(i) is not None for i in range(3, len(ctx.node.outputs))):
            why = "a per-head input (attention bias, head sink) or a QK output"
        if why is None:
            why = tie_flat_heads(ctx, q, k, v, y, hq, hkv,
                                 past=[ctx.input(i) for i in self.past],
                                 present=[ctx.output(i) for i in self.present])
        if why is None and self.bias is not None and ctx.input(self.bias) is not None:
            b = ctx.input(self.bias)
            nq, nk = ctx.shape(q)[2], ctx.shape(k)[2]
            if ctx.shape(b) != (nq + nk + ctx.shape(v)[2],):
                why = "bias is not [q + k + v hidden]"
            else:
                for off, src, n in ((0, q, nq), (nq, k, nk), (nq + nk, v, ctx.shape(v)[2])):
                    e = np.arange(n)
                    ctx.tie(b, 0, src, 2, off + e, e)
                ctx.role(b, 0, "param")
        if why is not None:
            ctx.pin_all(f"{ctx.op} {ctx.node.name}: {why} is kept whole")
            return
        for i in self.skipped:
            ctx.skip(ctx.input(i))

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        hq, hkv = self._heads(node.attrs)
        q, k = node.inputs[0], node.inputs[1]
        _lower_heads(rctx, q, "num_heads", rctx.orig_shape(q)[2] // hq)
        if self.kv_attr:
            _lower_heads(rctx, k, self.kv_attr, rctx.orig_shape(k)[2] // hkv)


class OnnxAttention(OpRule):
    """ONNX Attention (opset 23): 3-D inputs with q_num_heads/kv_num_heads, or 4-D
    [batch, heads, seq, head_size] inputs where the head axis is explicit."""

    def cost_terms(self, node, spatial=None) -> list[CostTerm]:
        """Q.K^T + scores.V over the total key length: present_key's sequence axis where the op
        writes it, else the key's plus past_key's."""
        q, k, y = _input(node, 0), _input(node, 1), _output(node, 0)
        if q is None or k is None or y is None:
            return []
        qs, ks, ys = (concrete_shape(t, spatial) for t in (q, k, y))
        if qs is None or ks is None or ys is None or len(qs) != len(ys) or len(ks) not in (3, 4):
            return []
        seq_axis = 2 if len(ks) == 4 else 1
        total = _seq_len(_output(node, 1), spatial, 2) or (
            static_size(ks[seq_axis]) + _seq_len(_input(node, 4), spatial, 2))
        return attention_core_terms(node, spatial, [(q.name, a) for a in range(len(qs))],
                                    [(y.name, a) for a in range(len(ys))], total)

    def analyze(self, ctx: RuleContext) -> None:
        q, k, v, mask = ctx.input(0), ctx.input(1), ctx.input(2), ctx.input(3)
        y = ctx.output(0)
        past, present = (ctx.input(4), ctx.input(5)), (ctx.output(1), ctx.output(2))
        why = None
        if ctx.output(3) is not None:
            why = "a QK output"
        elif mask is not None and _rank(ctx, mask) == 4 and ctx.shape(mask)[1] != 1:
            why = "a per-head attention mask"
        elif _rank(ctx, q) == 3:
            why = tie_flat_heads(ctx, q, k, v, y, int(ctx.attrs.get("q_num_heads", 0)),
                                 int(ctx.attrs.get("kv_num_heads", 0)), past, present)
        elif _rank(ctx, q) == 4 and _rank(ctx, k) == 4 and _rank(ctx, v) == 4:
            why = self._tie_4d(ctx, q, k, v, y, past, present)
        else:
            why = "mixed 3-D/4-D inputs"
        if why is not None:
            ctx.pin_all(f"Attention {ctx.node.name}: {why} is kept whole")
            return
        for t in (mask, ctx.input(6)):
            ctx.skip(t)

    @staticmethod
    def _tie_4d(ctx, q, k, v, y, past, present) -> str | None:
        hq, hkv = ctx.shape(q)[1], ctx.shape(k)[1]
        if not (_static(hq) and _static(hkv)) or hq % hkv or ctx.shape(v)[1] != hkv:
            return "head counts are not static multiples"
        h = np.arange(hq)
        ctx.tie(q, 1, y, 1)
        ctx.tie(q, 1, k, 1, h, h // (hq // hkv))  # a KV head and its query heads go together
        ctx.tie(k, 1, v, 1)
        ctx.tie(q, 3, k, 3)  # head_size: contracted in Q.K^T, pruned only when asked (as for MatMul)
        if not ctx.policy("head_dim", False):
            ctx.pin(q, 3, "contraction between two activations (head dimension: ask for head_dim)")
        ctx.tie(v, 3, y, 3)
        ctx.tie(q, 0, y, 0)
        ctx.tie(q, 2, y, 2)
        for t in (k, v):
            ctx.skip(t, 0)
            ctx.skip(t, 2)
        for pair in (past, present):
            for cache, src in zip(pair, (k, v)):
                if cache is None:
                    continue
                if _rank(ctx, cache) != 4:
                    return "cache is not 4-D"
                ctx.tie(cache, 1, src, 1)
                ctx.tie(cache, 3, src, 3)
                ctx.skip(cache, 0)
                ctx.skip(cache, 2)
        return None

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        q, k = node.inputs[0], node.inputs[1]
        shape = rctx.orig_shape(q)
        if len(shape) == 3:
            hq, hkv = int(node.attrs["q_num_heads"]), int(node.attrs["kv_num_heads"])
            _lower_heads(rctx, q, "q_num_heads", shape[2] // hq)
            _lower_heads(rctx, k, "kv_num_heads", rctx.orig_shape(k)[2] // hkv)
        elif rctx.kept(q, 3) is not None and "scale" not in node.attrs:
            node.attrs["scale"] = 1.0 / math.sqrt(shape[3])  # the default scale follows head_size


def register_attention_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    ms = "com.microsoft"
    reg.register("Attention", OnnxAttention(), since=23)
    # MultiHeadAttention: query, key, value, bias, key_padding_mask, attention_bias, past_key,
    # past_value, past_sequence_length, cache_indirection -> output, present_key, present_value, qk
    reg.register("MultiHeadAttention", FlatHeadsAttention(past=(6, 7), present=(1, 2), skipped=(4, 8, 9),
                                                          per_head=(5,), bias=3, kv_attr=None), domain=ms)
    # GroupQueryAttention: query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
    # cos_cache, sin_cache, position_ids, attention_bias, head_sink -> output, present_key, present_value, qk
    reg.register("GroupQueryAttention", FlatHeadsAttention(past=(3, 4), present=(1, 2), skipped=(5, 6, 7, 8, 9),
                                                           per_head=(10, 11), bias=None, kv_attr="kv_num_heads"),
                 domain=ms)
    return reg
