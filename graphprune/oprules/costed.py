"""Ops whose channels graphprune does not map but whose MACs count: fused and quantized forms
of Conv, Gemm and MatMul (onnxruntime's graph optimizer writes the com.microsoft ones).

Each keeps every channel (pinned, with the reason) and states its MACs from the spec, so a model
optimized by onnxruntime is not costed as if these layers were free: the allocation's target is a
fraction of all the model's MACs, pinned layers included.

- FusedConv (com.microsoft): a Conv with an activation: Conv's count.
- FusedGemm (com.microsoft): a Gemm with an activation: Gemm's count.
- FusedMatMul (com.microsoft): alpha * op(A) @ op(B), transA/transB on the last two axes: every
  output element is a K-long dot product, K being A's last axis (its second last under transA).
- QLinearConv: x, x_scale, x_zero_point, w, ...: Conv's count with the weight at input 3.
- QLinearMatMul, MatMulIntegerToFloat, DynamicQuantizeMatMul (com.microsoft): MatMul's count,
  A being input 0.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..cost import CostTerm, concrete_shape, static_size, volume
from .base import OpRule, OpRuleRegistry, RuleContext
from .conv import Conv

__all__ = ["PinnedCosted", "register_costed_rules"]

MS = "com.microsoft"


def _matmul_terms(node: gs.Node, spatial, k_axis: int) -> list[CostTerm]:
    if not node.inputs or not node.inputs[0].name or not node.outputs or not node.outputs[0].name:
        return []
    a, y = node.inputs[0], node.outputs[0]
    as_, ys = concrete_shape(a, spatial), concrete_shape(y, spatial)
    if as_ is None or ys is None or len(as_) < 1:
        return []
    k = k_axis if len(as_) >= -k_axis else -1
    return [CostTerm(node.name or y.name, 1.0, [(y.name, j) for j in range(len(ys))] + [(a.name, len(as_) + k)])]


def _gemm_terms(node: gs.Node, spatial) -> list[CostTerm]:
    """M x K x N of op(A) [M, K] @ op(B) [K, N] (shapes read at the concrete input shape)."""
    if len(node.inputs) < 2 or not node.inputs[0].name or not node.inputs[1].name:
        return []
    a, b = node.inputs[0], node.inputs[1]
    if concrete_shape(a, spatial) is None or concrete_shape(b, spatial) is None:
        return []
    ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    m_ax, k_ax = (1, 0) if ta else (0, 1)
    return [CostTerm(node.name or node.outputs[0].name, 1.0, [(a.name, m_ax), (a.name, k_ax), (b.name, 0 if tb else 1)])]


def _qlinear_conv_terms(node: gs.Node, spatial) -> list[CostTerm]:
    if len(node.inputs) < 4 or not node.inputs[3].name:
        return []
    x, w, y = node.inputs[0], node.inputs[3], node.outputs[0]
    ws, ys, xs = (concrete_shape(t, spatial) for t in (w, y, x))
    if ws is None or ys is None or xs is None:
        return []
    coef = volume(ys[2:]) * static_size(ys[0]) * volume(ws[2:])
    return [CostTerm(node.name or y.name, coef, [(w.name, 0), (w.name, 1)])]


class PinnedCosted(OpRule):
    """Keeps every channel of the op; MACs from `kind`: conv, gemm, matmul, fused_matmul, qlinear_conv."""

    def __init__(self, kind: str):
        self.kind = kind

    def analyze(self, ctx: RuleContext) -> None:
        ctx.pin_all(f"no channel mapping for {ctx.op} (kept whole; its MACs count)")

    def cost_terms(self, node: gs.Node, spatial: dict | None = None) -> list[CostTerm]:
        if self.kind == "conv":
            return Conv().cost_terms(node, spatial)
        if self.kind == "gemm":
            return _gemm_terms(node, spatial)
        if self.kind == "qlinear_conv":
            return _qlinear_conv_terms(node, spatial)
        trans_a = self.kind == "fused_matmul" and int(node.attrs.get("transA", 0))
        return _matmul_terms(node, spatial, -2 if trans_a else -1)


def register_costed_rules(reg: OpRuleRegistry) -> OpRuleRegistry:
    reg.register("FusedConv", PinnedCosted("conv"), domain=MS)
    reg.register("FusedGemm", PinnedCosted("gemm"), domain=MS)
    reg.register("FusedMatMul", PinnedCosted("fused_matmul"), domain=MS)
    reg.register("MatMulIntegerToFloat", PinnedCosted("matmul"), domain=MS)
    reg.register("DynamicQuantizeMatMul", PinnedCosted("matmul"), domain=MS)
    reg.register("QLinearConv", PinnedCosted("qlinear_conv"))
    reg.register("QLinearMatMul", PinnedCosted("matmul"))
    return reg
