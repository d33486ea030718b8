"""Reductions and ops along one axis: Reduce*, Softmax-like axis ops, pooling."""
from __future__ import annotations

import numpy as np

from .base import OpRule, RuleContext

__all__ = ["Pool", "GlobalPool", "Reduce", "AxisOp"]


class Pool(OpRule):
    """Pooling keeps batch and channels; spatial axes are not channels."""

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        if len(ctx.node.outputs) > 1 and ctx.output(1) is not None:
            ctx.pin_all("MaxPool indices output")
            return
        for out in ctx.node.outputs:
            if out.name:
                ctx.tie(x, 0, out, 0)
                ctx.tie(x, 1, out, 1)


class GlobalPool(Pool):
    """GlobalAveragePool/GlobalMaxPool/GlobalLpPool: a reduction over every axis after 1. tf2onnx
    writes a mean over the last axis of [N, S, D] this way (Keras LayerNormalization): like
    Reduce*, the reduced axes are pinned, except under prune_hidden, where the statistics are
    taken over the kept elements."""

    def analyze(self, ctx: RuleContext) -> None:
        super().analyze(ctx)
        x = ctx.input(0)
        hidden = ctx.policy("prune_hidden", False)
        for k in range(2, len(ctx.shape(x) or ())):
            if hidden:
                ctx.statistics(x, k)
            else:
                ctx.pin(x, k, "reduced axis: pruning it changes the reduction (--prune-hidden "
                              "takes it over the kept channels)")


def _axes(ctx: RuleContext, attr: str = "axes", input_index: int = 1):
    """Axes from the attribute or (newer opsets) a constant input; None if not constant."""
    if attr in ctx.attrs:
        return [int(a) for a in ctx.attrs[attr]]
    t = ctx.input(input_index)
    if t is None:
        return []
    ctx.skip(t)
    v = ctx.value(t)
    return None if v is None else [int(a) for a in np.atleast_1d(v)]


class Reduce(OpRule):
    """Reduce*: kept axes map one to one (dropped when keepdims=0). A reduced axis is pinned,
    except under prune_hidden, where it may lose elements: the reduction then runs over the
    kept ones (a mean over D' channels, not D), which the oracle reproduces."""

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        axes = _axes(ctx)
        if axes is None:
            ctx.pin_all("reduction axes computed at run time")
            return
        if not axes:
            if int(ctx.attrs.get("noop_with_empty_axes", 0)):
                for k in range(r):
                    ctx.tie(x, k, y, k)
                return
            axes = list(range(r))  # reduces everything
        axes = {a % r for a in axes}
        keep = int(ctx.attrs.get("keepdims", 1))
        hidden = ctx.policy("prune_hidden", False)
        j = 0
        for k in range(r):
            if k in axes:
                if hidden:
                    ctx.statistics(x, k)
                else:
                    ctx.pin(x, k, "reduced axis: pruning it changes the reduction (--prune-hidden "
                                  "takes it over the kept channels)")
                j += keep
                continue
            ctx.tie(x, k, y, j)
            j += 1


class AxisOp(OpRule):
    """Softmax/LogSoftmax/Hardmax/CumSum/LpNormalization: the op axis mixes elements."""

    default_axis = -1

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        default = 1 if (ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13) else self.default_axis
        axis = int(ctx.attrs.get("axis", default)) % r
        coerced = ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13
        for k in range(r):
            if k == axis or (coerced and k > axis):
                continue
            ctx.tie(x, k, y, k)
