"""Concat, Split and Slice: offsets of the elements along one axis."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import OpRule, RewriteContext, RuleContext

__all__ = ["Concat", "Split", "Slice"]


class Concat(OpRule):
    def analyze(self, ctx: RuleContext) -> None:
        y = ctx.output(0)
        r = len(ctx.shape(y))
        axis = int(ctx.attrs["axis"]) % r
        for t in ctx.node.inputs:  # every input, also when the concat axis is dynamic (a KV cache)
            for k in range(r):
                if k != axis:
                    ctx.tie(t, k, y, k)
        off = 0
        for t in ctx.node.inputs:
            s = ctx.shape(t)
            n = s[axis]
            if not isinstance(n, int):
                for u in list(ctx.node.inputs) + [y]:
                    ctx.pin(u, axis, "dynamic concat size")
                return
            if n:
                ctx.tie(t, axis, y, axis, np.arange(n), off + np.arange(n))
            off += n


class Split(OpRule):
    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        r = len(ctx.shape(x))
        axis = int(ctx.attrs.get("axis", 0)) % r
        if ctx.input(1) is not None:
            ctx.skip(ctx.input(1))
            if ctx.value(ctx.input(1)) is None:
                ctx.pin_all("split sizes computed at run time")
                return
        off = 0
        for out in ctx.node.outputs:
            s = ctx.shape(out)
            for k in range(r):
                if k != axis:
                    ctx.tie(x, k, out, k)
            n = s[axis]
            if not isinstance(n, int):
                ctx.pin_all("dynamic split size")
                return
            ctx.tie(x, axis, out, axis, off + np.arange(n), np.arange(n))
            off += n

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        x = node.inputs[0]
        axis = int(node.attrs.get("axis", 0)) % len(rctx.orig_shape(x))
        if rctx.kept(x, axis) is None:
            return
        sizes = np.array([rctx.new_size(o, axis) for o in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs:
            node.attrs["split"] = [int(s) for s in sizes]
        elif len(node.inputs) > 1 and node.inputs[1].name:
            node.inputs[1] = rctx.constant(sizes, "split")
        elif rctx.graph_opset >= 13:
            node.inputs.append(rctx.constant(sizes, "split"))
        else:
            node.attrs["split"] = [int(s) for s in sizes]


class Slice(OpRule):
    shape_inputs = (1, 2, 3, 4)

    def _params(self, ctx_or_node, values):
        pass

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        if ctx.opset < 10:
            starts, ends = ctx.attrs["starts"], ctx.attrs["ends"]
            axes = ctx.attrs.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            vals = []
            for i in range(1, 5):
                t = ctx.input(i)
                if t is not None:
                    ctx.skip(t)
                vals.append(None if t is None else ctx.value(t))
            if vals[0] is None or vals[1] is None or (ctx.input(3) is not None and vals[2] is None) \
                    or (ctx.input(4) is not None and vals[3] is None):
                ctx.pin_all("slice bounds computed at run time")
                return
            starts, ends = vals[0].tolist(), vals[1].tolist()
            axes = vals[2].tolist() if vals[2] is not None else list(range(len(starts)))
            steps = vals[3].tolist() if vals[3] is not None else [1] * len(starts)
        sliced = {}
        for s, e, a, st in zip(starts, ends, axes, steps):
            sliced[int(a) % r] = (int(s), int(e), int(st))
        xs = ctx.shape(x)
        for k in range(r):
            if k not in sliced:
                ctx.tie(x, k, y, k)
                continue
            s, e, st = sliced[k]
            n = xs[k]
            if not isinstance(n, int) or st == 0:
                continue  # left untouched: pinned
            idx = np.arange(n)[slice(s, e, st)]
            if len(idx):
                ctx.tie(x, k, y, k, idx, np.arange(len(idx)))
            # elements outside the slice are unrelated to the output; keep them fixed
            rest = np.setdiff1d(np.arange(n), idx)
            if len(rest):
                ctx.tie(x, k, x, k, rest, rest)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        x = node.inputs[0]
        xs = rctx.orig_shape(x)
        r = len(xs)
        changed = {k: rctx.kept(x, k) for k in range(r) if rctx.kept(x, k) is not None}
        if not changed:
            return
        if rctx.graph_opset < 10:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs.get("axes", range(len(starts))))
        else:
            starts = np.asarray(rctx.value(node.inputs[1])).tolist()
            ends = np.asarray(rctx.value(node.inputs[2])).tolist()
            has_axes = len(node.inputs) > 3 and node.inputs[3].name
            axes = np.asarray(rctx.value(node.inputs[3])).tolist() if has_axes else list(range(len(starts)))
        has_steps = rctx.graph_opset >= 10 and len(node.inputs) > 4 and node.inputs[4].name
        steps = rctx.value(node.inputs[4]) if has_steps else None
        has_steps = steps is not None
        steps = np.asarray(steps).tolist() if has_steps else [1] * len(starts)
        for i, a in enumerate(axes):
            k = int(a) % r
            if k not in changed:
                continue
            n = xs[k]
            if int(steps[i]) != 1:
                # the kept elements of a strided slice are no longer evenly spaced: select them
                # with a Gather (in slice order) and let the Slice pass that axis whole
                idx = np.arange(n)[slice(int(starts[i]), int(ends[i]), int(steps[i]))]
                pos = np.full(n, -1, dtype=np.int64)
                pos[changed[k]] = np.arange(len(changed[k]))
                sel = pos[idx]
                sel = sel[sel >= 0]
                base = node.name or node.op
                g = gs.Variable(rctx._namer(f"{base}_select"), dtype=x.dtype)
                rctx.graph.nodes.append(gs.Node("Gather", name=rctx._namer(f"{base}_gather"), attrs={"axis": k},
                                                inputs=[node.inputs[0], rctx.constant(sel, "select")], outputs=[g]))
                node.inputs[0] = g
                starts[i], ends[i], steps[i] = 0, len(sel), 1
                continue
            idx = np.arange(n)[slice(int(starts[i]), int(ends[i]), 1)]
            kept = changed[k]
            lo = int(np.searchsorted(kept, idx[0])) if len(idx) else 0
            hi = lo + int(np.isin(kept, idx).sum())
            starts[i], ends[i] = lo, hi
        if rctx.graph_opset < 10:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            node.inputs[1] = rctx.constant(np.array(starts, dtype=np.asarray(rctx.value(node.inputs[1])).dtype), "starts")
            node.inputs[2] = rctx.constant(np.array(ends, dtype=np.asarray(rctx.value(node.inputs[2])).dtype), "ends")
            if has_steps:
                node.inputs[4] = rctx.constant(np.array(steps, dtype=np.asarray(rctx.value(node.inputs[4])).dtype),
                                               "steps")
