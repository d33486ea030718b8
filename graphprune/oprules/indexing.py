"""Shape/Size, Expand, Gather and Tile."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..roles import ROLE_PARAM
from .base import OpRule, RewriteContext, RuleContext

__all__ = ["ShapeOf", "Expand", "Gather", "Tile"]


class ShapeOf(OpRule):
    """Shape/Size read the (possibly pruned) shape at run time: no channel relation."""

    def analyze(self, ctx: RuleContext) -> None:
        ctx.skip(ctx.input(0))


class Expand(OpRule):
    """Expand: aligned axes of equal size map one to one; axes born by broadcasting are free
    (their size lives in the shape input, which the rewrite updates)."""

    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, shp, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ctx.skip(shp)
        xs, ys = ctx.shape(x), ctx.shape(y)
        off = len(ys) - len(xs)
        born = [j for j in range(len(ys)) if (j < off or xs[j - off] == 1) and isinstance(ys[j], int) and ys[j] > 1]
        for j in range(len(ys)):
            k = j - off
            if k >= 0 and xs[k] == ys[j]:
                ctx.tie(x, k, y, j)
                if born and ctx.policy("gqa_uniform", False) and isinstance(xs[k], int) and xs[k] > 1:
                    # repeat_kv under --gqa-uniform: KV heads stay, query heads go evenly per KV group
                    ctx.pin(x, k, "--gqa-uniform keeps every KV head")
            elif j in born:
                ctx.skip(y, j)

    def rewrite(self, rctx: RewriteContext) -> None:
        y = rctx.node.outputs[0]
        ys = rctx.orig_shape(y)
        # a folded axis (dynamic x units) is tied to the input's: entry 1 keeps the input's size
        updates = {k: 1 if rctx.is_folded(y, k) else rctx.new_size(y, k)
                   for k in range(len(ys)) if rctx.kept(y, k) is not None}
        rctx.set_shape_entries(1, updates)


class Gather(OpRule):
    """Gather: an embedding lookup (axis 0) keeps the table's other axes as channels.

    A constant 1-D index list on an activation's axis selects (and may reorder or repeat)
    elements: output element j is input element idx[j]. Removing an input element removes
    the output elements that copy it, and the rewrite renumbers the kept indices."""

    def _selection(self, ctx, data, idx, axis):
        if ctx.is_const(data) or not ctx.is_const(idx):
            return None
        v = ctx.value(idx)
        n = ctx.shape(data)[axis]
        if v is None or np.ndim(v) != 1 or not isinstance(n, int) or len(v) == 0:
            return None
        v = np.asarray(v, dtype=np.int64)
        if v.min() < -n or v.max() >= n:
            return None
        return v % n

    def analyze(self, ctx: RuleContext) -> None:
        data, idx, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ds, is_ = ctx.shape(data), ctx.shape(idx)
        axis = int(ctx.attrs.get("axis", 0)) % len(ds)
        sel = self._selection(ctx, data, idx, axis)
        if sel is not None:
            ctx.skip(idx)
            for k in range(len(ds)):
                if k == axis:
                    ctx.tie(data, k, y, k, sel, np.arange(len(sel)))
                else:
                    ctx.tie(data, k, y, k)
            return
        for k in range(len(ds)):
            if k < axis:
                ctx.tie(data, k, y, k)
            elif k > axis:
                ctx.tie(data, k, y, k - 1 + len(is_))
                if ctx.is_const(data):
                    ctx.role(data, k, ROLE_PARAM)
        for k in range(len(is_)):
            ctx.tie(idx, k, y, axis + k)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if isinstance(data, gs.Constant) or not isinstance(idx, gs.Constant):
            return
        v = rctx.value(idx)
        shape = rctx.orig_shape(data)
        if v is None or np.ndim(v) != 1 or shape is None:
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        kd, ky = rctx.kept(data, axis), rctx.kept(y, axis)
        if kd is None and ky is None:
            return
        n = shape[axis]
        v = np.asarray(v, dtype=np.int64) % n
        rows = v if ky is None else v[np.asarray(ky)]
        pos = np.full(n, -1, dtype=np.int64)
        keep = np.arange(n) if kd is None else np.asarray(kd)
        pos[keep] = np.arange(len(keep))
        new = pos[rows]
        assert (new >= 0).all(), "Gather selects a removed element"
        node.inputs[1] = rctx.constant(new.astype(np.asarray(idx.values).dtype), "indices")


class Tile(OpRule):
    """Tile: output axis k holds reps[k] copies of input axis k, so output element j is input
    element j mod n. Removing an input element removes it from every copy and the repeat count
    stays valid; the repeats input needs no rewrite."""

    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, reps, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ctx.skip(reps)
        xs = ctx.shape(x)
        rv = ctx.value(reps)
        if rv is None or len(np.atleast_1d(rv)) != len(xs):
            ctx.pin_all("repeats computed at run time")
            return
        for k, rep in enumerate(np.atleast_1d(rv).tolist()):
            if int(rep) == 1:
                ctx.tie(x, k, y, k)
            elif isinstance(xs[k], int) and int(rep) > 1:
                j = np.arange(xs[k] * int(rep))
                ctx.tie(x, k, y, k, j % xs[k], j)
