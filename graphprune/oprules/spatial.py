"""Ops that move or select along some axes and keep the others elementwise: GridSample,
RoiAlign / MaxRoiPool, TopK, ArgMax / ArgMin and CumSum (ONNX spec semantics).

- GridSample(X [N, C, *in], grid [N, *out, r]) -> Y [N, C, *out]: each channel is sampled on its
  own, so X's channels are Y's; the grid's coordinate axis is not a channel.
- RoiAlign / MaxRoiPool(X [N, C, H, W], rois [R, 4|5], ...) -> Y [R, C, oh, ow]: per-channel pooling.
- TopK along `axis`: the other axes are elementwise for both outputs; the selected axis is pinned.
- ArgMax / ArgMin along `axis`: the other axes are elementwise; the reduced axis is pinned.
- CumSum along the (constant) axis input: the other axes are elementwise; the summed axis is pinned.
"""
from __future__ import annotations

import numpy as np

from .base import OpRule, OpRuleRegistry, RuleContext

__all__ = ["register_spatial_rules"]


class GridSample(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        x, grid, y = ctx.input(0), ctx.input(1), ctx.output(0)
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None or len(xs) != len(ys) or len(xs) < 3:
            ctx.pin_all("GridSample of unknown rank")
            return
        ctx.tie(x, 0, y, 0)
        ctx.tie(x, 1, y, 1)
        gs_ = ctx.shape(grid)
        if gs_ is not None and len(gs_) == len(ys):
            ctx.tie(grid, 0, y, 0)
            for k in range(1, len(gs_) - 1):  # grid [N, *out, r]: output positions
                ctx.tie(grid, k, y, k + 1)
            ctx.pin(grid, len(gs_) - 1, "GridSample: coordinate axis")
        for k in range(2, len(xs)):
            ctx.pin(x, k, "GridSample: sampled spatial axis")
            ctx.pin(y, k, "GridSample: sampled spatial axis")


class RoiPool(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        if ctx.shape(x) is None or ctx.shape(y) is None or len(ctx.shape(x)) != 4:
            ctx.pin_all(f"{ctx.op} of unknown rank")
            return
        ctx.tie(x, 1, y, 1)
        for t in (ctx.input(1), ctx.input(2)):
            if t is not None:
                ctx.pin(t, None, f"{ctx.op}: region coordinates and indices are not channels")
        for k in (2, 3):
            ctx.pin(x, k, f"{ctx.op}: pooled spatial axis")
            ctx.pin(y, k, f"{ctx.op}: pooled spatial axis")
        ctx.pin(x, 0, f"{ctx.op}: images are read through region indices")
        ctx.pin(y, 0, f"{ctx.op}: one row per region")


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class AlongAxis(OpRule):
    """TopK / ArgMax / ArgMin / CumSum: the op acts along one axis; the others are elementwise."""

    def __init__(self, what: str):
        self.what = what

    def _axis(self, ctx: RuleContext, rank: int) -> int | None:
        if ctx.op == "CumSum":
            v = ctx.value(ctx.input(1))
            return None if v is None else _norm_axis(int(np.asarray(v).reshape(-1)[0]), rank)
        return _norm_axis(int(ctx.attrs.get("axis", -1 if ctx.op == "TopK" else 0)), rank)

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        xs = ctx.shape(x)
        if xs is None:
            return
        rank = len(xs)
        axis = self._axis(ctx, rank) if rank else None
        if axis is None:
            ctx.pin_all(f"{ctx.op}: axis computed at run time")
            return
        if ctx.op == "TopK" or ctx.op == "CumSum":
            ctx.skip(ctx.input(1))
        outs = [o for o in ctx.node.outputs if o.name]
        keep = ctx.op in ("TopK", "CumSum") or int(ctx.attrs.get("keepdims", 1))
        for out in outs:
            os_ = ctx.shape(out)
            if os_ is None:
                continue
            for k in range(rank):
                if k == axis:
                    if keep:
                        ctx.pin(out, k, f"{ctx.op}: the axis it {self.what}")
                    continue
                ctx.tie(x, k, out, k if (keep or k < axis) else k - 1)
        ctx.pin(x, axis, f"{ctx.op}: the axis it {self.what}")


def register_spatial_rules(reg: OpRuleRegistry) -> None:
    reg.register("GridSample", GridSample(), since=16)
    reg.register("RoiAlign", RoiPool(), since=10)
    reg.register("MaxRoiPool", RoiPool())
    reg.register("TopK", AlongAxis("selects along"))
    reg.register("ArgMax", AlongAxis("reduces"))
    reg.register("ArgMin", AlongAxis("reduces"))
    reg.register("CumSum", AlongAxis("sums along"), since=11)
