"""Elementwise ops: unary ops (every axis the identity) and n-ary ops with numpy broadcasting."""
from __future__ import annotations

from ..op_families import BROADCAST_OPS
from .base import OpRule, RuleContext

__all__ = ["UNARY_OPS", "BROADCAST_OPS", "Unary", "Broadcast"]


UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus",
    "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Swish", "Exp", "Log", "Abs", "Neg",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
    "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike",
    "Dropout", "Clip", "Shrink", "BitwiseNot",
)


class Unary(OpRule):
    """Elementwise on the data input: every axis is the identity; extra inputs are scalars."""

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        for i in range(1, len(ctx.node.inputs)):
            t = ctx.input(i)
            if t is not None:
                if len(ctx.shape(t) or ()) > 0 and ctx.op not in ("CastLike",):
                    ctx.pin(t, None, "non-scalar parameter")
                ctx.skip(t)
        for out in ctx.node.outputs:
            if out.name:
                for k in range(len(ctx.shape(x))):
                    ctx.tie(x, k, out, k)


class Broadcast(OpRule):
    """N-ary elementwise with numpy broadcasting; constants become per-channel params."""

    def analyze(self, ctx: RuleContext) -> None:
        ctx.broadcast([t for t in ctx.node.inputs if t.name], [ctx.output(0)])
