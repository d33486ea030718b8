"""Matrix products: Gemm, MatMul, Einsum (channels, weight layout, MAC cost)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..cost import CostTerm
from ..graph import tensor_shape
from ..roles import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE
from .base import OpRule, RuleContext, WeightLayout

__all__ = ["Gemm", "MatMul", "Einsum", "matmul_cost_terms"]


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
        return matmul_cost_terms(node)


def matmul_cost_terms(node: gs.Node) -> list[CostTerm]:
    """numpy matmul A[..., K] @ B: prod(output) * K (also for MatMulInteger / MatMulNBits)."""
    a, b = _operands(node)
    if a is None:
        return []
    y = node.outputs[0]
    axes = [(y.name, k) for k in range(len(tensor_shape(y)))] + [(a.name, len(tensor_shape(a)) - 1)]
    return [CostTerm(node.name or y.name, 1.0, axes)]


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
