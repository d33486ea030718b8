"""Ops that make a tensor from a shape: ConstantOfShape (e.g. the zero initial state an exporter
builds for an LSTM as ConstantOfShape(Concat(dirs, batch, hidden))).

The output's axes are free: their sizes live in the shape input, so whatever the output is tied
to downstream decides its channels, and the rewrite updates the shape entries (constant or
computed at run time) of the axes that lost elements."""
from __future__ import annotations

from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext

__all__ = ["register_fill_rules", "RANDOM_OPS"]

# ops that draw random values: never evaluated ahead of time (constant folding leaves them)
RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


class ConstantOfShape(OpRule):
    shape_inputs = (0,)

    def analyze(self, ctx: RuleContext) -> None:
        ctx.skip(ctx.input(0))
        y = ctx.output(0)
        for k in range(len(ctx.shape(y) or ())):
            ctx.skip(y, k)

    def rewrite(self, rctx: RewriteContext) -> None:
        y = rctx.node.outputs[0]
        ys = rctx.orig_shape(y) or ()
        updates = {k: rctx.new_size(y, k) for k in range(len(ys)) if rctx.kept(y, k) is not None}
        if updates:
            rctx.set_shape_entries(0, updates)


def register_fill_rules(reg: OpRuleRegistry) -> None:
    reg.register("ConstantOfShape", ConstantOfShape(), since=9)
