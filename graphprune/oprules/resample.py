"""Pad and Resize/Upsample: spatial axes change size, channels pass through."""
from __future__ import annotations

import numpy as np

from .base import OpRule, RewriteContext, RuleContext

__all__ = ["Pad", "Resize"]


class Pad(OpRule):
    shape_inputs = (1, 2, 3)

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        for i in range(1, len(ctx.node.inputs)):
            if ctx.input(i) is not None:
                ctx.skip(ctx.input(i))
        if "pads" in ctx.attrs:
            pads, axes = list(ctx.attrs["pads"]), list(range(r))
        else:
            pads = ctx.value(ctx.input(1))
            at = ctx.input(3)
            axes = list(range(r)) if at is None else ctx.value(at)
            if pads is None or axes is None:
                ctx.pin_all("pads computed at run time")
                return
            pads, axes = pads.tolist(), [int(a) % r for a in np.atleast_1d(axes)]
        n = len(axes)
        padded = {axes[i] for i in range(n) if pads[i] != 0 or pads[i + n] != 0}
        for k in range(r):
            if k not in padded:
                ctx.tie(x, k, y, k)


class Resize(OpRule):
    """Resize/Upsample: axes whose size does not change map one to one."""

    shape_inputs = (1, 2, 3)

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        for i in range(1, len(ctx.node.inputs)):
            if ctx.input(i) is not None:
                ctx.skip(ctx.input(i))
        xs, ys = ctx.shape(x), ctx.shape(y)
        sizes = ctx.input(3) if ctx.op == "Resize" else None
        if sizes is not None and ctx.value(sizes) is None:
            ctx.pin_all("sizes computed at run time")
            return
        for k in range(len(xs)):
            if xs[k] == ys[k]:
                ctx.tie(x, k, y, k)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        if node.op != "Resize" or len(node.inputs) < 4 or not node.inputs[3].name:
            return
        y = node.outputs[0]
        ys = rctx.orig_shape(y)
        updates = {k: rctx.new_size(y, k) for k in range(len(ys)) if rctx.kept(y, k) is not None}
        if "axes" in node.attrs:  # opset 18: sizes lists only the given axes, in that order
            axes = [int(a) % len(ys) for a in node.attrs["axes"]]
            updates = {axes.index(k): v for k, v in updates.items() if k in axes}
        rctx.set_shape_entries(3, updates)
