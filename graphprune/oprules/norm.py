"""Normalizations: BatchNormalization / InstanceNormalization and LayerNormalization / RMSNormalization
(per-channel parameters), GroupNormalization and MeanVarianceNormalization.

GroupNormalization normalizes each of `num_groups` consecutive channel blocks over the block
and the spatial axes. Channels prune in step across the groups (channel j of every group is one
element, as for a grouped Conv), so each group keeps C'/G channels in order and `num_groups`
stays; the statistics are then taken over the kept channels, which is what the pruned op
computes and what the oracle reproduces. Opset 21's per-channel scale and bias follow the
channels; opset 18's per-group ones do not change.

MeanVarianceNormalization takes its statistics over `axes` (default N, H, W): the other axes
(the channels, by default) are elementwise.
"""
from __future__ import annotations

import numpy as np

from ..roles import ROLE_PARAM
from .base import OpRule, OpRuleRegistry, RuleContext, with_scales

__all__ = ["register_norm_rules", "BatchNorm", "LayerNorm"]


class BatchNorm(OpRule):
    """BatchNormalization / InstanceNormalization: per-channel params on axis 1."""

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        rank = len(ctx.shape(x))
        for out in ctx.node.outputs:
            if not out.name:
                continue
            if len(ctx.shape(out) or ()) == rank:
                for k in range(rank):
                    ctx.tie(x, k, out, k)
            else:  # training-mode running stats outputs
                ctx.tie(x, 1, out, 0)
        for i in range(1, len(ctx.node.inputs)):
            p = ctx.input(i)
            if p is not None:
                ctx.tie(p, 0, x, 1)
                ctx.role(p, 0, ROLE_PARAM)


class LayerNorm(OpRule):
    """LayerNormalization / RMSNormalization: leading axes map one to one; the normalized axes
    mix their elements (mean and variance), so they are pinned, except under prune_hidden:
    then they are channels (scale and bias per channel) and the statistics are taken over the
    kept ones, which is what the pruned op computes and what the oracle reproduces."""

    reason = "normalized axis: hidden width is pinned (ask for --prune-hidden to prune it)"

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        r = len(ctx.shape(x))
        axis = int(ctx.attrs.get("axis", -1)) % r
        outs = [o for o in ctx.node.outputs if o.name]
        for out in outs:
            for k in range(axis):
                ctx.tie(x, k, out, k)
        y = ctx.output(0)
        if ctx.policy("prune_hidden", False):
            for k in range(axis, r):
                ctx.tie(x, k, y, k)
                ctx.statistics(x, k)
            for i in range(1, len(ctx.node.inputs)):
                p = ctx.input(i)
                if p is not None:
                    ctx.broadcast([p], [y])
            return
        for k in range(axis, r):
            ctx.pin(x, k, self.reason)
            ctx.pin(y, k, self.reason)


class GroupNorm(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        xs = ctx.shape(x)
        if xs is None or len(xs) < 2:
            ctx.pin_all("GroupNormalization of unknown rank")
            return
        for k in range(len(xs)):
            ctx.tie(x, k, y, k)
        c, g = xs[1], int(ctx.attrs.get("num_groups", 1))
        if not isinstance(c, int) or g < 1 or c % g:
            ctx.pin(x, 1, "GroupNormalization: channel count unknown or not a multiple of num_groups")
            return
        per = c // g
        if g > 1 and per > 1:
            j = np.arange(per, c)
            ctx.tie(x, 1, x, 1, j, j % per)  # channel j of every group is one element
        elif g > 1:
            ctx.pin(x, 1, "GroupNormalization with one channel per group")
            return
        for k in range(1, len(xs)):
            ctx.statistics(x, k)
        for p in (ctx.input(1), ctx.input(2)):
            shape = ctx.shape(p)
            if p is None or shape is None:
                continue
            if len(shape) == 1 and shape[0] == c and c != g:  # opset 21: per channel
                ctx.tie(p, 0, y, 1)
                ctx.role(p, 0, "param")
            elif len(shape) == 1 and shape[0] == g:  # opset 18: per group, unchanged
                ctx.skip(p, 0)
            else:
                ctx.pin(p, None, "GroupNormalization parameters of an unknown layout")


class MeanVarianceNorm(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        xs = ctx.shape(x)
        if xs is None:
            return
        rank = len(xs)
        axes = [int(a) % rank for a in ctx.attrs.get("axes", [0, 2, 3])]
        for k in range(rank):
            ctx.tie(x, k, y, k)
            if k in axes:
                ctx.statistics(x, k)


def register_norm_rules(reg: OpRuleRegistry) -> None:
    reg.register("GroupNormalization", with_scales(GroupNorm(), (1,)), since=18)
    reg.register("MeanVarianceNormalization", MeanVarianceNorm(), since=9)
