"""Axis layout ops: Squeeze/Unsqueeze, Transpose, DepthToSpace/SpaceToDepth."""
from __future__ import annotations

import numpy as np

from .base import OpRule, RuleContext
from .reduce import _axes

__all__ = ["Squeeze", "Transpose", "DepthToSpace"]


def _squeeze_axes(ctx, r_in, r_out, squeeze: bool):
    axes = _axes(ctx)
    if axes is None:
        return None
    r = r_out if not squeeze else r_in
    if not axes and squeeze:
        axes = [k for k, s in enumerate(ctx.shape(ctx.input(0))) if s == 1]
    return {a % r for a in axes}


class Squeeze(OpRule):
    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        rx, ry = len(ctx.shape(x)), len(ctx.shape(y))
        squeeze = ctx.op == "Squeeze"
        axes = _squeeze_axes(ctx, rx, ry, squeeze)
        if axes is None:
            ctx.pin_all("axes computed at run time")
            return
        big, small = (x, y) if squeeze else (y, x)
        j = 0
        for k in range(max(rx, ry)):
            if k in axes:
                continue
            ctx.tie(big, k, small, j)
            j += 1


class Transpose(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        perm = ctx.attrs.get("perm", list(range(r))[::-1])
        for j, k in enumerate(perm):
            ctx.tie(x, int(k), y, j)


class DepthToSpace(OpRule):
    """DepthToSpace / SpaceToDepth (pixel shuffle): each of the C small-side channels owns
    bs*bs big-side channels, at b*C + c (DCR, and SpaceToDepth) or c*bs*bs + b (CRD).
    Removing a channel removes its whole block on the other side; the layout of the kept
    channels stays the same, so blocksize needs no rewrite. Spatial axes are not channels."""

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        xs, ys = ctx.shape(x), ctx.shape(y)
        bs = int(ctx.attrs.get("blocksize", 0))
        ctx.tie(x, 0, y, 0)
        to_space = ctx.op == "DepthToSpace"
        big, small = (x, y) if to_space else (y, x)
        c = (ys if to_space else xs)[1]
        if bs < 1 or not isinstance(c, int) or len(xs) != 4:
            ctx.pin_all("channel count or blocksize unknown")
            return
        mode = ctx.attrs.get("mode", "DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        b, ch = np.meshgrid(np.arange(bs * bs), np.arange(c), indexing="ij")
        b, ch = b.ravel(), ch.ravel()
        big_idx = ch * bs * bs + b if (to_space and mode == "CRD") else b * c + ch
        ctx.tie(big, 1, small, 1, big_idx, ch)
