"""Per-channel normalizations: BatchNormalization / InstanceNormalization, LayerNormalization / RMSNormalization."""
from __future__ import annotations

from .base import ROLE_PARAM, OpRule, RuleContext

__all__ = ["BatchNorm", "LayerNorm"]


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
