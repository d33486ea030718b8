"""LSTM / GRU / RNN: hidden units are channels.

Hidden unit j owns row j of every gate block of W [dirs, G*H, I], R [dirs, G*H, H] and
B [dirs, 2*G*H] (G = 4 for LSTM in gate order i, o, f, c; 3 for GRU z, r, h; 1 for RNN), column j
of R (the recurrent input), entry j of the peepholes P [dirs, 3*H], and element j of the last
axis of Y [seq, dirs, batch, H], Y_h / Y_c and initial_h / initial_c [dirs, batch, H]. Both
directions of a bidirectional layer keep the same units. W's axis 2 is the input size: it
reduces the previous layer's channels like a Linear layer.

Removing a unit zeroes its gate rows and its recurrent column in the mask-equivalence reference:
its gates then see only their (zeroed) bias, so with a zero initial state its cell and hidden
state stay 0 (i, f, o = sigmoid(0) = 0.5, candidate tanh(0) = 0) and nothing else reads it:
the pruned layer computes exactly the kept units. The rewrite sets `hidden_size`.
"""
from __future__ import annotations

import numpy as np

import onnx_graphsurgeon as gs

from ..cost import CostTerm, static_size
from ..graph import tensor_shape
from .base import OpRule, OpRuleRegistry, RewriteContext, RuleContext

__all__ = ["register_recurrent_rules"]

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class Recurrent(OpRule):
    def __init__(self, gates: int):
        self.gates = gates

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        """Per time step and direction: x . W^T and h . R^T (sequence and batch as 1 when dynamic)."""
        ins = [t if t.name else None for t in node.inputs]
        if len(ins) <= 2 or ins[1] is None or ins[2] is None:
            return []
        xs = tensor_shape(ins[0]) if ins[0] is not None else None
        steps = static_size(xs[0]) * static_size(xs[1]) if xs is not None and len(xs) == 3 else 1.0
        name = node.name or node.outputs[0].name
        w, r = ins[1], ins[2]
        return [CostTerm(name, steps, [(w.name, 0), (w.name, 1), (w.name, 2)]),
                CostTerm(name, steps, [(r.name, 0), (r.name, 1), (r.name, 2)])]

    def analyze(self, ctx: RuleContext) -> None:
        x, w, r = ctx.input(0), ctx.input(1), ctx.input(2)
        b = ctx.input(3)
        h0 = ctx.input(5)
        c0 = ctx.input(6) if ctx.op == "LSTM" else None
        p = ctx.input(7) if ctx.op == "LSTM" else None
        ws, rs = ctx.shape(w), ctx.shape(r)
        if int(ctx.attrs.get("layout", 0)) != 0:
            ctx.pin_all(f"{ctx.op} with layout=1 (batch-major) is not supported")
            return
        hidden = int(ctx.attrs.get("hidden_size", 0) or 0)
        if ws is None or rs is None or len(ws) != 3 or not isinstance(rs[2], int) or hidden != rs[2]:
            ctx.pin_all(f"{ctx.op}: weight shapes unknown")
            return
        if not (ctx.is_const(w) and ctx.is_const(r)):
            ctx.pin_all(f"{ctx.op}: weights computed at run time")
            return
        g, h = self.gates, hidden
        units = np.tile(np.arange(h), g)       # gate-block row k -> unit k % h
        rows = np.arange(g * h)
        # a representative of the hidden units: R's columns (the recurrent input)
        anchor = (r, 2)
        ctx.tie(w, 0, r, 0)
        ctx.tie(r, 1, *anchor, rows, units)
        ctx.tie(w, 1, *anchor, rows, units)
        ctx.role(w, 1, "out")
        ctx.role(r, 1, "out")
        ctx.role(r, 2, "reduce")
        # input size: W axis 2 reduces x's features
        ctx.tie(x, 2, w, 2)
        ctx.role(w, 2, "reduce")
        ctx.tie(x, 0, x, 0)  # sequence axis: not a channel (auto-pinned if static)
        if b is not None and ctx.shape(b) is not None:
            ctx.tie(b, 0, w, 0)
            brows = np.arange(2 * g * h)
            ctx.tie(b, 1, *anchor, brows, np.tile(np.arange(h), 2 * g))
            ctx.role(b, 1, "param")
        if p is not None and ctx.shape(p) is not None:
            ctx.tie(p, 0, w, 0)
            ctx.tie(p, 1, *anchor, np.arange(3 * h), np.tile(np.arange(h), 3))
            ctx.role(p, 1, "param")
        for state in (h0, c0):
            if state is not None and ctx.shape(state) is not None:
                ctx.tie(state, 0, w, 0)
                ctx.tie(state, 1, x, 1)
                ctx.tie(state, 2, *anchor)
        outs = [ctx.output(i) for i in range(len(ctx.node.outputs))]
        if outs and outs[0] is not None and ctx.shape(outs[0]) is not None:  # Y [seq, dirs, batch, H]
            y = outs[0]
            ctx.tie(y, 0, x, 0)
            ctx.tie(y, 1, w, 0)
            ctx.tie(y, 2, x, 1)
            ctx.tie(y, 3, *anchor)
        for o in outs[1:]:  # Y_h, Y_c [dirs, batch, H]
            if o is not None and ctx.shape(o) is not None:
                ctx.tie(o, 0, w, 0)
                ctx.tie(o, 1, x, 1)
                ctx.tie(o, 2, *anchor)
        ctx.skip(ctx.input(4))  # sequence_lens [batch]: values, not channels
        if ctx.input(4) is not None:
            ctx.tie(ctx.input(4), 0, x, 1)

    def rewrite(self, rctx: RewriteContext) -> None:
        r = rctx.node.inputs[2]
        new = rctx.new_size(r, 2)
        if new is not None:
            rctx.node.attrs["hidden_size"] = int(new)


def register_recurrent_rules(reg: OpRuleRegistry) -> None:
    for op, g in GATES.items():
        reg.register(op, Recurrent(g))
