"""Families of ONNX ops by how they treat shapes, from the ONNX operator spec (IR layer).

The one home of these lists: shape refinement (graphprune/graph.py), the op rules
(graphprune/oprules) and recovery's anchor rule (passes/recover_match.py) import them, so they
cannot drift apart.
"""
from __future__ import annotations

__all__ = ["BROADCAST_OPS", "GLOBAL_POOL_OPS", "NORM_OPS", "WEIGHTED_OPS"]

# multidirectional (numpy-style) broadcasting of every input; PRelu broadcasts its slope to X
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
)

# normalisations, ONNX and com.microsoft (their output starts a fresh activation scale)
NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "RMSNormalization", "BatchNormalization",
                      "InstanceNormalization", "GroupNormalization"})

# ops that contract an activation with a weight (a "layer" in the sense of a pruner)
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"})

# reductions over every axis after 1 (N, C, ...) -> (N, C, 1, ...)
GLOBAL_POOL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
