"""Families of ONNX ops by how they treat shapes, from the ONNX operator spec (IR layer).

The one home of these lists: shape refinement (graphprune/graph.py) and the op rules
(graphprune/oprules) import them, so the two cannot drift apart.
"""
from __future__ import annotations

__all__ = ["BROADCAST_OPS"]

# multidirectional (numpy-style) broadcasting of every input; PRelu broadcasts its slope to X
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
    "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor",
)
