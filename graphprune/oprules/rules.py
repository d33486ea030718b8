"""Built-in op rules, written from the ONNX operator spec (one small rule per op)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import tensor_shape
from .base import CostTerm, OpRule, OpRuleRegistry, RewriteContext, RuleContext, WeightLayout, static_size, volume, with_scales

__all__ = ["register_builtin_rules", "UNARY_OPS", "BROADCAST_OPS"]

ROLE_OUT, ROLE_REDUCE, ROLE_PARAM = "out", "reduce", "param"

UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softplus",
    "Softsign", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Swish", "Exp", "Log", "Abs", "Neg",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
    "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Identity", "Cast", "CastLike",
    "Dropout", "Clip", "Shrink", "BitwiseNot",
)
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
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
        return WeightLayout("conv_transpose" if self.transposed else "conv", 1, w_out, w_in, x=0, x_axis=1,
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


class Gemm(OpRule):
    """Y = alpha * A' B' + beta * C with optional transposes."""

    def analyze(self, ctx: RuleContext) -> None:
        a, b, c, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
        ta, tb = int(ctx.attrs.get("transA", 0)), int(ctx.attrs.get("transB", 0))
        a_m, a_k = (1, 0) if ta else (0, 1)
        b_k, b_n = (1, 0) if tb else (0, 1)
        ctx.tie(a, a_k, b, b_k)
        ctx.tie(a, a_m, y, 0)
        ctx.tie(b, b_n, y, 1)
        for t, ax_k, ax_n in ((b, b_k, b_n), (a, a_k, a_m)):
            if ctx.is_const(t):
                ctx.role(t, ax_k, ROLE_REDUCE)
                ctx.role(t, ax_n, ROLE_OUT)
        if c is not None:
            ctx.broadcast([c], [y])

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        return WeightLayout("gemm", 1, 0 if tb else 1, 1 if tb else 0, x=0, x_axis=0 if ta else 1, trans_b=tb,
                            alpha=float(node.attrs.get("alpha", 1.0)), bias=2, bias_scale_attr="beta")

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        a, b = _operands(node)
        if a is None:
            return []
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        m_ax, k_ax = (1, 0) if ta else (0, 1)
        return [CostTerm(node.name or node.outputs[0].name, 1.0, [(a.name, m_ax), (a.name, k_ax), (b.name, 0 if tb else 1)])]


def _operands(node: gs.Node):
    """(A, B) of a matrix product when both are named and shaped, else (None, None)."""
    ins = [t if t.name else None for t in node.inputs]
    if len(ins) < 2 or ins[0] is None or ins[1] is None:
        return None, None
    as_, bs, ys = tensor_shape(ins[0]), tensor_shape(ins[1]), tensor_shape(node.outputs[0])
    if as_ is None or bs is None or ys is None or len(as_) < 1 or len(bs) < 1:
        return None, None
    return ins[0], ins[1]


class MatMul(OpRule):
    """Numpy matmul: A[..., M, K] @ B[..., K, N]; constant operands are weights."""

    def analyze(self, ctx: RuleContext) -> None:
        a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ra, rb, ry = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(y))
        if ra < 2 or rb < 2:
            ctx.pin_all("1-D MatMul operand")
            return
        ctx.tie(a, -1, b, -2)
        ctx.tie(a, -2, y, -1 if False else ry - 2)
        ctx.tie(b, -1, y, ry - 1)
        for t, r in ((a, ra), (b, rb)):
            for k in range(r - 2):
                ctx.tie(t, k, y, ry - r + k)
        if ctx.is_const(b):
            ctx.role(b, -2, ROLE_REDUCE)
            ctx.role(b, -1, ROLE_OUT)
        if ctx.is_const(a):
            ctx.role(a, -1, ROLE_REDUCE)
            ctx.role(a, -2, ROLE_OUT)
        if not ctx.is_const(a) and not ctx.is_const(b) and not ctx.policy("head_dim", False):
            # an activation x activation contraction (Q.K^T) is pruned only when asked for
            # (head_dim): its elements go in both operands at once, like a head dimension
            ctx.pin(a, -1, "contraction between two activations (head dimension: ask for head_dim)")

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        """x[..., K] @ W[..., K, N] (a constant first operand is not a weight view)."""
        return WeightLayout("matmul", 1, -1, -2, x=0, x_axis=-1)

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        a, b = _operands(node)
        if a is None:
            return []
        y = node.outputs[0]
        axes = [(y.name, k) for k in range(len(tensor_shape(y)))] + [(a.name, len(tensor_shape(a)) - 1)]
        return [CostTerm(node.name or y.name, 1.0, axes)]  # numpy matmul: prod(output) * K


class Pool(OpRule):
    """Pooling keeps batch and channels; spatial axes are not channels."""

    def analyze(self, ctx: RuleContext) -> None:
        x = ctx.input(0)
        if len(ctx.node.outputs) > 1 and ctx.output(1) is not None:
            ctx.pin_all("MaxPool indices output")
            return
        for out in ctx.node.outputs:
            if out.name:
                ctx.tie(x, 0, out, 0)
                ctx.tie(x, 1, out, 1)


class GlobalPool(Pool):
    """GlobalAveragePool/GlobalMaxPool/GlobalLpPool: a reduction over every axis after 1. tf2onnx
    writes a mean over the last axis of [N, S, D] this way (Keras LayerNormalization): like
    Reduce*, the reduced axes are pinned, except under prune_hidden, where the statistics are
    taken over the kept elements."""

    def analyze(self, ctx: RuleContext) -> None:
        super().analyze(ctx)
        x = ctx.input(0)
        hidden = ctx.policy("prune_hidden", False)
        for k in range(2, len(ctx.shape(x) or ())):
            if hidden:
                ctx.statistics(x, k)
            else:
                ctx.pin(x, k, "reduced axis: pruning it changes the reduction (--prune-hidden "
                              "takes it over the kept channels)")


def _axes(ctx: RuleContext, attr: str = "axes", input_index: int = 1):
    """Axes from the attribute or (newer opsets) a constant input; None if not constant."""
    if attr in ctx.attrs:
        return [int(a) for a in ctx.attrs[attr]]
    t = ctx.input(input_index)
    if t is None:
        return []
    ctx.skip(t)
    v = ctx.value(t)
    return None if v is None else [int(a) for a in np.atleast_1d(v)]


class Reduce(OpRule):
    """Reduce*: kept axes map one to one (dropped when keepdims=0). A reduced axis is pinned,
    except under prune_hidden, where it may lose elements: the reduction then runs over the
    kept ones (a mean over D' channels, not D), which the oracle reproduces."""

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        axes = _axes(ctx)
        if axes is None:
            ctx.pin_all("reduction axes computed at run time")
            return
        if not axes:
            if int(ctx.attrs.get("noop_with_empty_axes", 0)):
                for k in range(r):
                    ctx.tie(x, k, y, k)
                return
            axes = list(range(r))  # reduces everything
        axes = {a % r for a in axes}
        keep = int(ctx.attrs.get("keepdims", 1))
        hidden = ctx.policy("prune_hidden", False)
        j = 0
        for k in range(r):
            if k in axes:
                if hidden:
                    ctx.statistics(x, k)
                else:
                    ctx.pin(x, k, "reduced axis: pruning it changes the reduction (--prune-hidden "
                                  "takes it over the kept channels)")
                j += keep
                continue
            ctx.tie(x, k, y, j)
            j += 1


class AxisOp(OpRule):
    """Softmax/LogSoftmax/Hardmax/CumSum/LpNormalization: the op axis mixes elements."""

    default_axis = -1

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        r = len(ctx.shape(x))
        default = 1 if (ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13) else self.default_axis
        axis = int(ctx.attrs.get("axis", default)) % r
        coerced = ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13
        for k in range(r):
            if k == axis or (coerced and k > axis):
                continue
            ctx.tie(x, k, y, k)


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


def _blocks(a: list, b: list):
    """Split two shapes (size-1 axes dropped) into blocks of equal element count.

    Blocks are matched from the left, then from the right; whatever is left in the middle
    (dynamic axes merged or split, e.g. [b, s, H] -> [b*s, H]) is returned unmatched.
    """
    ia = [k for k, s in enumerate(a) if s != 1]
    ib = [k for k, s in enumerate(b) if s != 1]
    left, ia_rest, ib_rest = _match(a, b, ia, ib)
    right, ra, rb = _match(a, b, ia_rest[::-1], ib_rest[::-1])
    return left + right, ra[::-1], rb[::-1]


def _match(a: list, b: list, ia: list, ib: list):
    """Greedy blocks over the axis lists ia/ib (in the given order) until a dynamic mismatch."""
    blocks, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        sa, sb = a[ia[i]], b[ib[j]]
        if not isinstance(sa, int) or not isinstance(sb, int):
            if sa == sb and sa is not None:
                blocks.append(([ia[i]], [ib[j]]))
                i, j = i + 1, j + 1
                continue
            break
        ba, bb, pa, pb = [ia[i]], [ib[j]], sa, sb
        ii, jj = i + 1, j + 1
        ok = True
        while pa != pb:
            if pa < pb:
                if ii >= len(ia) or not isinstance(a[ia[ii]], int):
                    ok = False
                    break
                pa *= a[ia[ii]]
                ba.append(ia[ii])
                ii += 1
            else:
                if jj >= len(ib) or not isinstance(b[ib[jj]], int):
                    ok = False
                    break
                pb *= b[ib[jj]]
                bb.append(ib[jj])
                jj += 1
        if not ok:
            break
        blocks.append((sorted(ba), sorted(bb)))
        i, j = ii, jj
    return blocks, ia[i:], ib[j:]


def _parse_dim(d) -> tuple | None:
    """An axis size as (symbols, static factor): 7 -> ((), 7), 'batch' -> (('batch',), 1),
    '4*batch' -> (('batch',), 4); None for unknown sizes (None, unk__N)."""
    if isinstance(d, int):
        return ((), d) if d >= 0 else None
    if not isinstance(d, str) or not d or d.startswith("unk__"):
        return None
    syms, k = [], 1
    for part in d.split("*"):
        part = part.strip()
        if part.isdigit():
            k *= int(part)
        elif part.isidentifier():
            syms.append(part)
        else:
            return None
    return tuple(syms), k


def _input_factors(ctx: RuleContext, x: gs.Tensor, shape) -> list | None:
    out = []
    for ax, d in enumerate(shape):
        dim = ctx.dg.dim(x.name, ax)
        fold = ctx.dg.dim_fold.get(dim) if dim is not None else None
        f = fold or _parse_dim(d)
        if f is None:
            return None
        out.append(f)
    return out


def _target_factors(ctx: RuleContext, xf: list, yshape) -> list | None:
    """The output axes as (symbols, static factor), from the output shape or else from the
    shape input evaluated at two sets of symbol sizes (entry == product(symbols) * k in both)."""
    parsed = [_parse_dim(d) for d in yshape]
    if all(p is not None for p in parsed):
        return parsed
    node = ctx.node
    if node.op != "Reshape" or ctx.input(1) is None:
        return None
    ev = ctx.dg.model.shapes
    runs = ev.runs(ctx.input(1))
    if runs is None or runs[0].ndim != 1 or len(runs[0]) != len(yshape):
        return None
    symbols = [s for syms, _ in xf for s in syms]
    values = {(ev._symbol_value(q, 0), ev._symbol_value(q, 1)) for q in set(symbols)}
    if len(values) != len(set(symbols)):
        return None  # two symbols evaluate alike: their products cannot be told apart
    allowzero = int(node.attrs.get("allowzero", 0))
    out: list = []
    infer = None
    for k, (v0, v1) in enumerate(zip(runs[0].tolist(), runs[1].tolist())):
        if v0 == v1:
            if v0 == -1:
                infer = k
                out.append(None)
            elif v0 == 0 and not allowzero:
                out.append(xf[k] if k < len(xf) else None)
            else:
                out.append(((), int(v0)))
            continue
        found = None
        for n in range(1, min(3, len(symbols)) + 1):  # contiguous runs of the input's symbols
            for i in range(len(symbols) - n + 1):
                sub = tuple(symbols[i:i + n])
                p0 = int(np.prod([ev._symbol_value(q, 0) for q in sub]))
                p1 = int(np.prod([ev._symbol_value(q, 1) for q in sub]))
                if v0 % p0 == 0 and v1 % p1 == 0 and v0 // p0 == v1 // p1 > 0:
                    found = (sub, v0 // p0)
                    break
            if found:
                break
        out.append(found)
    if infer is not None:
        syms = [s for syms_, _ in xf for s in syms_]
        known = int(np.prod([f[1] for f in xf]))
        for f in out:
            if f is None:
                continue
            for s_ in f[0]:
                if s_ not in syms:
                    return None
                syms.remove(s_)
            known, rem = divmod(known, f[1]) if f[1] else (0, 1)
            if rem:
                return None
        out[infer] = (tuple(syms), known)
    return None if any(f is None for f in out) else out


def _symbolic_blocks(xf: list, yf: list, lead: set = frozenset()) -> list | None:
    """Blocks of a reshape over axes (symbols, k): each axis is its symbols (major) then its k
    static units (minor), or the other way round for the axes in `lead` ((side, axis), side 0
    for x); the symbol sequences must match one to one and the static runs between them have
    equal products. Returns [(x axes, y axes, the block holds a static part of a non-folded
    dynamic axis)] for static parts > 1, or None."""
    def runs(fs, side):
        seq_syms, out, cur = [], [], []
        for ax, (syms, k) in enumerate(fs):
            first = (side, ax) in lead
            if first and k != 1:
                cur.append((ax, k))
            for s_ in syms:
                seq_syms.append(s_)
                out.append(cur)
                cur = []
            if not first and k != 1:
                cur.append((ax, k))
        out.append(cur)
        return seq_syms, out
    sa, ra = runs(xf, 0)
    sb, rb = runs(yf, 1)
    if sa != sb:
        return None
    blocks = []
    for a, b in zip(ra, rb):
        if int(np.prod([k for _, k in a])) != int(np.prod([k for _, k in b])):
            return None
        i = j = 0
        while i < len(a) or j < len(b):  # smallest blocks of equal product
            ba, bb, pa, pb = [a[i][0]], [b[j][0]], a[i][1], b[j][1]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    ba.append(a[i][0])
                    pa *= a[i][1]
                    i += 1
                else:
                    bb.append(b[j][0])
                    pb *= b[j][1]
                    j += 1
            mixed = any((0, ax) in lead for ax in ba) or any((1, ax) in lead for ax in bb)
            blocks.append((ba, bb, mixed))
    return blocks


def _lead_choices(xf: list, yf: list, folded_x: set):
    """Which merged axes (symbols and a static factor) take the static factor as the major part:
    none first, then each combination (a value such as 7*batch does not say its order)."""
    cands = [(0, ax) for ax, (syms, k) in enumerate(xf) if syms and k > 1 and ax not in folded_x]
    cands += [(1, ax) for ax, (syms, k) in enumerate(yf) if syms and k > 1]
    cands = cands[:4]
    for mask in range(1 << len(cands)):
        yield {c for i, c in enumerate(cands) if mask >> i & 1}


def _bind_symbol(xf: list, yf: list, folded_x: set):
    """When one symbol appears on one side only, the element counts fix it to a constant (a
    TorchScript export traces k.view(k.shape[0], ...) as [seq, b, E] -> [7, b*H, D]: the graph
    runs only with seq = 7). Returns (xf, yf, symbol, value) with it substituted, or None."""
    from collections import Counter

    ca = Counter(q for syms, _ in xf for q in syms)
    cb = Counter(q for syms, _ in yf for q in syms)
    extra = [(0, q) for q in (ca - cb).elements()] + [(1, q) for q in (cb - ca).elements()]
    if len(extra) != 1:
        return None
    side, sym = extra[0]
    pa, pb = int(np.prod([k for _, k in xf])), int(np.prod([k for _, k in yf]))
    num, den = (pb, pa) if side == 0 else (pa, pb)
    if den <= 0 or num % den or num // den < 1:
        return None
    value = num // den
    fs = xf if side == 0 else yf
    out = []
    for ax, (syms, k) in enumerate(fs):
        if sym in syms:
            if side == 0 and ax in folded_x:
                return None
            syms = tuple(q for q in syms if q != sym)
            k *= value
        out.append((syms, k))
    return (out, yf, sym, value) if side == 0 else (xf, out, sym, value)


class Reshape(OpRule):
    """Reshape/Flatten: blocks of equal element count; multi-axis blocks factor channels.

    An axis that merges dynamic factors (major) with static ones (minor), such as the
    [batch*heads] axis of torch.nn.MultiheadAttention exports, is a *folded* axis: its
    elements are the static units, repeated over the dynamic factor (the reshape is then
    a reshape of the static parts alone, with the symbols kept in place).
    """

    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, y = ctx.input(0), ctx.output(0)
        if ctx.input(1) is not None:
            ctx.skip(ctx.input(1))
        xs, ys = list(ctx.shape(x)), list(ctx.shape(y))
        blocks, rest_a, rest_b = _blocks(xs, ys)
        why = self._folded(ctx, x, y, xs, ys) if (rest_a or rest_b) else ""
        if why is None:
            return
        for ba, bb in blocks:
            if len(ba) == 1 and len(bb) == 1:
                ctx.tie(x, ba[0], y, bb[0])
            else:
                ctx.factor(x, ba, y, bb)
        for k in rest_a:
            ctx.pin(x, k, f"reshape with dynamic axes here{why}")
        for k in rest_b:
            ctx.pin(y, k, f"reshape with dynamic axes here{why}")

    @staticmethod
    def _folded(ctx: RuleContext, x, y, xs: list, ys: list) -> str | None:
        """Relate the static parts of axes that merge dynamic and static factors; None when done,
        else why the shapes cannot be described that way (the caller pins the unmatched axes)."""
        dg = ctx.dg
        xf = _input_factors(ctx, x, xs)
        if xf is None:
            return " (input axis sizes unknown)"
        yf = _target_factors(ctx, xf, ys)
        if yf is None:
            return " (target shape not a product of the input's symbols and constants)"
        folded_x = {ax for ax in range(len(xs)) if dg.dim(x.name, ax) in dg.dim_fold}
        bound = None
        blocks = Reshape._line_up(xf, yf, folded_x)
        if blocks is None and (bound := _bind_symbol(xf, yf, folded_x)) is not None:
            xf, yf = bound[0], bound[1]
            blocks = Reshape._line_up(xf, yf, folded_x)
        if blocks is None:
            def show(fs):
                return "[" + ", ".join("*".join(list(s) + ([str(k)] if k != 1 or not s else [])) for s, k in fs) + "]"
            return f" ({show(xf)} -> {show(yf)}: dynamic factors do not line up)"
        blocks, lead = blocks
        folds = []
        for side, (t, fs) in enumerate(((x, xf), (y, yf))):
            for ax, (syms, k) in enumerate(fs):
                if syms and k > 1 and (side, ax) not in lead:
                    d = dg.dim(t.name, ax)
                    if d is None or not dg.fold(d, syms, k, dry=True):
                        return f" (axis {ax} of {t.name} cannot become a folded axis)"
                    folds.append((d, syms, k))
        for d, syms, k in folds:
            dg.fold(d, syms, k)
        for ba, bb, mixed in blocks:
            dims = [dg.dim(x.name, ax) for ax in ba] + [dg.dim(y.name, ax) for ax in bb]
            if mixed or any(dg.dim_opaque[d] for d in dims):
                # a static factor merged as the major part of a dynamic axis, or a dynamic axis the
                # reshape fixes to a constant (bound): no channels
                why = (f"the reshape fixes {bound[2]} to {bound[3]}" if bound and not mixed
                       else "static factor merged into a dynamic axis (major part)")
                for t, axes in ((x, ba), (y, bb)):
                    for ax in axes:
                        ctx.pin(t, ax, why)
            elif len(ba) == 1 and len(bb) == 1:
                # the static parts are the same elements, whether an axis is folded or not
                da, db = ctx._dim(x, ba[0]), ctx._dim(y, bb[0])
                n = dg.dim_size[da]
                dg.ties.append((da, np.arange(n, dtype=np.int64), db, np.arange(n, dtype=np.int64)))
            else:
                ctx.factor(x, ba, y, bb)
        for t, fs in ((x, xf), (y, yf)):
            for ax, (syms, k) in enumerate(fs):
                if syms and k == 1:
                    ctx.skip(t, ax)  # a purely dynamic axis, pinned as such
        return None

    @staticmethod
    def _line_up(xf: list, yf: list, folded_x: set):
        for lead in _lead_choices(xf, yf, folded_x):
            blocks = _symbolic_blocks(xf, yf, lead)
            if blocks is not None:
                return blocks, lead
        return None

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        if node.op != "Reshape":
            return
        y = node.outputs[0]
        ys = rctx.orig_shape(y)
        changed = [k for k in range(len(ys)) if rctx.kept(y, k) is not None]
        folded = [k for k in changed if rctx.is_folded(y, k)]
        updates = {k: rctx.new_size(y, k) for k in changed if k not in folded}
        after = rctx.runs_after(node.inputs[1]) if rctx.runs_after is not None else None
        if after is not None and len(after[0]) == len(ys):
            # entries read from the shape of a pruned tensor at run time already have the new size
            updates = {k: v for k, v in updates.items() if not (after[0][k] == after[1][k] == v)}
        ratios = {}
        if folded:
            runs = rctx.runs(node.inputs[1]) if rctx.runs is not None else None
            for k in folded:
                static = runs is not None and runs[0][k] == runs[1][k]
                if static and (runs[0][k] == -1 or (runs[0][k] == 0 and not node.attrs.get("allowzero", 0))):
                    continue  # inferred from the (already smaller) input
                n_kept, units = len(rctx.kept(y, k)), rctx.folded[(y.name, k)]
                if runs is not None and after is not None and len(after[0]) == len(runs[0]) and all(
                        int(after[i][k]) * units == int(runs[i][k]) * n_kept for i in (0, 1)):
                    continue  # computed from the shape of a pruned tensor (tf2onnx): already smaller
                ratios[k] = (len(rctx.kept(y, k)), rctx.folded[(y.name, k)])
        updates.update(_pinned_runtime_entries(rctx, node.inputs[1], ys, set(changed) | set(folded)))
        if updates and ratios:
            rctx.set_shape_entries(1, updates)
            rctx.scale_shape_entries(1, ratios)
        elif updates:
            rctx.set_shape_entries(1, updates)
        else:
            rctx.scale_shape_entries(1, ratios)


def _shape_sources(t: gs.Tensor, limit: int = 256) -> list:
    """The tensors whose Shape/Size a run-time shape tensor reads (its producer sub-graph)."""
    seen, stack, sources = set(), [t], []
    while stack and len(seen) < limit:
        cur = stack.pop()
        if isinstance(cur, gs.Constant) or not cur.name or cur.name in seen or not cur.inputs:
            continue
        seen.add(cur.name)
        node = cur.inputs[0]
        if node.op in ("Shape", "Size"):
            sources.append(node.inputs[0])
        else:
            stack.extend(node.inputs)
    return sources


def _pinned_runtime_entries(rctx: RewriteContext, shape: gs.Tensor, ys, skip: set) -> dict[int, int]:
    """A target shape computed at run time from Shape of a tensor whose channels were removed
    (x.view(B, x.shape[1], H, W) with the output's channels coupled to something else) would take
    the new size of that tensor: its static entries become constants at the output's own sizes."""
    if isinstance(shape, gs.Constant) or rctx.runs is None or ys is None:
        return {}
    if not any(rctx.changed(src) for src in _shape_sources(shape)):
        return {}
    runs = rctx.runs(shape)
    if runs is None or runs[0].ndim != 1 or len(runs[0]) != len(ys):
        return {}
    return {k: int(size) for k, size in enumerate(ys)
            if k not in skip and isinstance(size, int) and runs[0][k] == runs[1][k] == size}


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


class ShapeOf(OpRule):
    """Shape/Size read the (possibly pruned) shape at run time: no channel relation."""

    def analyze(self, ctx: RuleContext) -> None:
        ctx.skip(ctx.input(0))


class Flatten(Reshape):
    pass


class Expand(OpRule):
    """Expand: aligned axes of equal size map one to one; axes born by broadcasting are free
    (their size lives in the shape input, which the rewrite updates)."""

    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, shp, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ctx.skip(shp)
        xs, ys = ctx.shape(x), ctx.shape(y)
        off = len(ys) - len(xs)
        born = [j for j in range(len(ys)) if (j < off or xs[j - off] == 1) and isinstance(ys[j], int) and ys[j] > 1]
        for j in range(len(ys)):
            k = j - off
            if k >= 0 and xs[k] == ys[j]:
                ctx.tie(x, k, y, j)
                if born and ctx.policy("gqa_uniform", False) and isinstance(xs[k], int) and xs[k] > 1:
                    # repeat_kv under --gqa-uniform: KV heads stay, query heads go evenly per KV group
                    ctx.pin(x, k, "--gqa-uniform keeps every KV head")
            elif j in born:
                ctx.skip(y, j)

    def rewrite(self, rctx: RewriteContext) -> None:
        y = rctx.node.outputs[0]
        ys = rctx.orig_shape(y)
        # a folded axis (dynamic x units) is tied to the input's: entry 1 keeps the input's size
        updates = {k: 1 if rctx.is_folded(y, k) else rctx.new_size(y, k)
                   for k in range(len(ys)) if rctx.kept(y, k) is not None}
        rctx.set_shape_entries(1, updates)


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


class Gather(OpRule):
    """Gather: an embedding lookup (axis 0) keeps the table's other axes as channels.

    A constant 1-D index list on an activation's axis selects (and may reorder or repeat)
    elements: output element j is input element idx[j]. Removing an input element removes
    the output elements that copy it, and the rewrite renumbers the kept indices."""

    def _selection(self, ctx, data, idx, axis):
        if ctx.is_const(data) or not ctx.is_const(idx):
            return None
        v = ctx.value(idx)
        n = ctx.shape(data)[axis]
        if v is None or np.ndim(v) != 1 or not isinstance(n, int) or len(v) == 0:
            return None
        v = np.asarray(v, dtype=np.int64)
        if v.min() < -n or v.max() >= n:
            return None
        return v % n

    def analyze(self, ctx: RuleContext) -> None:
        data, idx, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ds, is_ = ctx.shape(data), ctx.shape(idx)
        axis = int(ctx.attrs.get("axis", 0)) % len(ds)
        sel = self._selection(ctx, data, idx, axis)
        if sel is not None:
            ctx.skip(idx)
            for k in range(len(ds)):
                if k == axis:
                    ctx.tie(data, k, y, k, sel, np.arange(len(sel)))
                else:
                    ctx.tie(data, k, y, k)
            return
        for k in range(len(ds)):
            if k < axis:
                ctx.tie(data, k, y, k)
            elif k > axis:
                ctx.tie(data, k, y, k - 1 + len(is_))
                if ctx.is_const(data):
                    ctx.role(data, k, ROLE_PARAM)
        for k in range(len(is_)):
            ctx.tie(idx, k, y, axis + k)

    def rewrite(self, rctx: RewriteContext) -> None:
        node = rctx.node
        data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if isinstance(data, gs.Constant) or not isinstance(idx, gs.Constant):
            return
        v = rctx.value(idx)
        shape = rctx.orig_shape(data)
        if v is None or np.ndim(v) != 1 or shape is None:
            return
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        kd, ky = rctx.kept(data, axis), rctx.kept(y, axis)
        if kd is None and ky is None:
            return
        n = shape[axis]
        v = np.asarray(v, dtype=np.int64) % n
        rows = v if ky is None else v[np.asarray(ky)]
        pos = np.full(n, -1, dtype=np.int64)
        keep = np.arange(n) if kd is None else np.asarray(kd)
        pos[keep] = np.arange(len(keep))
        new = pos[rows]
        assert (new >= 0).all(), "Gather selects a removed element"
        node.inputs[1] = rctx.constant(new.astype(np.asarray(idx.values).dtype), "indices")


class Tile(OpRule):
    """Tile: output axis k holds reps[k] copies of input axis k, so output element j is input
    element j mod n. Removing an input element removes it from every copy and the repeat count
    stays valid; the repeats input needs no rewrite."""

    shape_inputs = (1,)

    def analyze(self, ctx: RuleContext) -> None:
        x, reps, y = ctx.input(0), ctx.input(1), ctx.output(0)
        ctx.skip(reps)
        xs = ctx.shape(x)
        rv = ctx.value(reps)
        if rv is None or len(np.atleast_1d(rv)) != len(xs):
            ctx.pin_all("repeats computed at run time")
            return
        for k, rep in enumerate(np.atleast_1d(rv).tolist()):
            if int(rep) == 1:
                ctx.tie(x, k, y, k)
            elif isinstance(xs[k], int) and int(rep) > 1:
                j = np.arange(xs[k] * int(rep))
                ctx.tie(x, k, y, k, j % xs[k], j)


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


class Einsum(OpRule):
    """Einsum: axes with the same label hold the same elements. A label in the output ties its
    input axes to the output axis; a label summed over two or more operands is a contraction
    (pruned like MatMul's K; between two activations only under head_dim); a label summed
    in one operand only is a reduction (pinned). Ellipses and repeated labels pin."""

    def analyze(self, ctx: RuleContext) -> None:
        eq = ctx.attrs.get("equation", "")
        eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
        ins = [t for t in ctx.node.inputs]
        y = ctx.output(0)
        lhs, _, rhs = eq.partition("->")
        terms = lhs.split(",")
        if "." in eq or len(terms) != len(ins) or any(t is None for t in ins):
            ctx.pin_all("Einsum with an ellipsis or operands the rule does not follow")
            return
        if "->" not in eq:
            letters = "".join(terms)
            rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        if any(len(set(t)) != len(t) for t in terms + [rhs]) or \
                any(len(t) != len(ctx.shape(x)) for t, x in zip(terms, ins)) or len(rhs) != len(ctx.shape(y)):
            ctx.pin_all("Einsum with repeated labels (a diagonal) or ranks that do not match")
            return
        where: dict = {}
        for x, term in zip(ins, terms):
            for k, c in enumerate(term):
                where.setdefault(c, []).append((x, k))
        for c, occ in where.items():
            if c in rhs:
                j = rhs.index(c)
                for x, k in occ:
                    ctx.tie(x, k, y, j)
                    if ctx.is_const(x):  # a weight's output axis, or a per-channel parameter
                        contracts = any(d not in rhs for d in terms[ins.index(x)])
                        ctx.role(x, k, ROLE_OUT if contracts else ROLE_PARAM)
                continue
            if len({id(x) for x, _ in occ}) < 2:
                for x, k in occ:
                    ctx.pin(x, k, "Einsum sums this axis within one operand")
                continue
            x0, k0 = occ[0]
            for x, k in occ[1:]:
                ctx.tie(x0, k0, x, k)
            for x, k in occ:
                if ctx.is_const(x):
                    ctx.role(x, k, ROLE_REDUCE)
            if sum(not ctx.is_const(x) for x, _ in occ) >= 2 and not ctx.policy("head_dim", False):
                ctx.pin(x0, k0, "contraction between two activations (head dimension: ask for head_dim)")


class ConvInteger(Conv):
    """ConvInteger: costed like a Conv; its channels are not mapped (every axis pinned)."""

    def analyze(self, ctx: RuleContext) -> None:
        ctx.pin_all(f"no channel mapping for {ctx.op}")

    def weight_layout(self, node: gs.Node) -> WeightLayout | None:
        return None


def register_builtin_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    for op in UNARY_OPS:
        reg.register(op, Unary())
    for op in BROADCAST_OPS:
        reg.register(op, with_scales(Broadcast(), (0, 1)) if op == "Mul" else Broadcast())
    reg.register("Conv", Conv())
    reg.register("ConvTranspose", ConvTranspose())
    reg.register("ConvInteger", ConvInteger())
    reg.register("BatchNormalization", with_scales(BatchNorm(), (1,)))
    reg.register("InstanceNormalization", with_scales(BatchNorm(), (1,)))
    reg.register("Gemm", Gemm())
    reg.register("MatMul", MatMul())
    for op in ("MaxPool", "AveragePool", "LpPool"):
        reg.register(op, Pool())
    for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        reg.register(op, GlobalPool())
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"):
        reg.register(op, Reduce())
    for op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
        reg.register(op, AxisOp())
    reg.register("Concat", Concat())
    reg.register("Split", Split())
    reg.register("Slice", Slice())
    reg.register("Squeeze", Squeeze())
    reg.register("Unsqueeze", Squeeze())
    reg.register("Transpose", Transpose())
    reg.register("Reshape", Reshape())
    reg.register("Flatten", Flatten())
    reg.register("Pad", Pad())
    reg.register("Resize", Resize())
    reg.register("Upsample", Resize())
    reg.register("Shape", ShapeOf())
    reg.register("Size", ShapeOf())
    reg.register("Expand", Expand())
    reg.register("LayerNormalization", with_scales(LayerNorm(), (1,)))
    reg.register("RMSNormalization", LayerNorm())
    reg.register("Gather", Gather())
    reg.register("Tile", Tile())
    reg.register("DepthToSpace", DepthToSpace())
    reg.register("Einsum", Einsum())
    reg.register("SpaceToDepth", DepthToSpace())
    return reg
