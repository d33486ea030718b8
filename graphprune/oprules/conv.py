"""Conv, ConvTranspose (and ConvInteger's cost): channels, weight layout, MAC cost."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import CostTerm, static_size, volume
from ..graph import tensor_shape
from ..roles import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE
from .base import OpRule, RewriteContext, RuleContext, WeightLayout

__all__ = ["Conv", "ConvTranspose", "ConvInteger"]


class Conv(OpRule):
    """Conv: W axis 0 produces Y's channels, W axis 1 reduces X's (per group)."""

    transposed = False

    def weight_axes(self) -> tuple[int, int]:
        """(output-channel axis, input-channel axis) of the weight: the one place that knows them.
        Conv W[Cout, Cin/g, k...]; ConvTranspose W[Cin, Cout/g, k...]."""
        return (1, 0) if self.transposed else (0, 1)

    def analyze(self, ctx: RuleContext) -> None:
        x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
        g = int(ctx.attrs.get("group", 1))
        cin = ctx.shape(x)[1]
        cout = ctx.shape(y)[1]
        ctx.tie(x, 0, y, 0)
        if not isinstance(cin, int) or not isinstance(cout, int):
            ctx.pin(x, 1, "dynamic channel count")
            return
        w_out, w_in = self.weight_axes()
        if self.transposed:
            og = cout // g
            ctx.tie(x, 1, w, w_in)
            ctx.role(w, w_in, ROLE_REDUCE)
            if g == 1:
                ctx.tie(w, w_out, y, 1)
                ctx.role(w, w_out, ROLE_OUT)
            elif g == cin:  # depthwise transposed, channel multiplier og
                j = np.arange(cout)
                ctx.tie(x, 1, y, 1, j // og, j)
                ctx.skip(w, w_out)
            else:
                self._balance(ctx, x, 1, cin, g)
                self._balance(ctx, y, 1, cout, g)
                j = np.arange(cout)
                ctx.tie(w, w_out, y, 1, j % og, j)
                ctx.role(w, w_out, ROLE_OUT)
        else:
            ctx.tie(w, w_out, y, 1)
            ctx.role(w, w_out, ROLE_OUT)
            cg = cin // g
            if g == 1:
                ctx.tie(x, 1, w, w_in)
                ctx.role(w, w_in, ROLE_REDUCE)
            elif cg == 1:  # depthwise, channel multiplier m = cout / cin
                m = cout // cin
                c = np.arange(cout)
                ctx.tie(x, 1, y, 1, c // m, c)
            else:  # grouped: keep groups balanced (channel j of every group together)
                self._balance(ctx, x, 1, cin, g)
                self._balance(ctx, y, 1, cout, g)
                c = np.arange(cin)
                ctx.tie(x, 1, w, w_in, c, c % cg)
                ctx.role(w, w_in, ROLE_REDUCE)
        if b is not None:
            ctx.tie(b, 0, y, 1)
            ctx.role(b, 0, ROLE_PARAM)

    @staticmethod
    def _balance(ctx, t, axis, n, g):
        per = n // g
        if per * g != n or g == 1:
            return
        c = np.arange(per, n)
        ctx.tie(t, axis, t, axis, c, c % per)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        g = int(node.attrs.get("group", 1))
        x = node.inputs[0]
        cin = rctx.orig_shape(x)[1]
        if g > 1 and g == cin and rctx.kept(x, 1) is not None:
            node.attrs["group"] = len(rctx.kept(x, 1))

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        if len(node.inputs) < 2 or not node.inputs[1].name:
            return None
        w_out, w_in = self.weight_axes()
        rank = len(node.inputs[1].shape or ())
        return WeightLayout("conv_transpose" if self.transposed else "conv", 1, w_out, w_in, x=0, x_axis=1, y_axis=1,
                            groups=int(node.attrs.get("group", 1)), in_per_group=not self.transposed,
                            kernel_axes=tuple(range(2, rank)), bias=2)

    def spatial_tensor(self, node: gs.Node) -> gs.Tensor | None:
        """MACs follow the output positions of a Conv, the input positions of a ConvTranspose."""
        if len(node.inputs) < 2:
            return None
        return node.inputs[0] if self.transposed else node.outputs[0]

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        if len(node.inputs) < 2 or not node.inputs[1].name:
            return []
        w, y = node.inputs[1], node.outputs[0]
        ws, ys, xs = tensor_shape(w), tensor_shape(y), tensor_shape(node.inputs[0])
        if ws is None or ys is None or xs is None:
            return []
        t = self.spatial_tensor(node)
        sizes = (spatial or {}).get(t.name) or (xs[2:] if self.transposed else ys[2:])
        coef = volume(sizes) * static_size(ys[0]) * volume(ws[2:])
        return [CostTerm(node.name or y.name, coef, [(w.name, 0), (w.name, 1)])]


class ConvTranspose(Conv):
    transposed = True


class ConvInteger(Conv):
    """ConvInteger: costed like a Conv; its channels are not mapped (every axis pinned)."""

    def analyze(self, ctx: RuleContext) -> None:
        ctx.pin_all(f"no channel mapping for {ctx.op}")

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        return None
