"""Built-in op rules, written from the ONNX operator spec (one small rule per op), registered here.

The rules live in family modules: elementwise, conv, linear (Gemm/MatMul/Einsum), norm,
reduce (reductions, axis ops, pooling), concat_split, layout (Squeeze/Transpose/DepthToSpace),
reshape (Reshape/Flatten), resample (Pad/Resize), indexing (Shape/Expand/Gather/Tile).
"""
from __future__ import annotations

from ..op_families import GLOBAL_POOL_OPS
from ..roles import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE
from .base import OpRuleRegistry, with_scales
from .concat_split import Concat, Slice, Split
from .conv import Conv, ConvInteger, ConvTranspose
from .elementwise import BROADCAST_OPS, UNARY_OPS, Broadcast, Unary
from .indexing import Expand, Gather, ShapeOf, Tile
from .layout import DepthToSpace, Squeeze, Transpose
from .linear import Einsum, Gemm, MatMul
from .norm import BatchNorm, LayerNorm
from .reduce import AxisOp, GlobalPool, Pool, Reduce
from .resample import Pad, Resize
from .reshape import Flatten, Reshape

__all__ = ["register_builtin_rules", "UNARY_OPS", "BROADCAST_OPS", "ROLE_OUT", "ROLE_REDUCE", "ROLE_PARAM",
           "Unary", "Broadcast", "Conv", "ConvTranspose", "ConvInteger", "BatchNorm", "LayerNorm", "Gemm",
           "MatMul", "Einsum", "Pool", "GlobalPool", "Reduce", "AxisOp", "Concat", "Split", "Slice", "Squeeze",
           "Transpose", "DepthToSpace", "Reshape", "Flatten", "Pad", "Resize", "ShapeOf", "Expand", "Gather",
           "Tile"]


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
    for op in GLOBAL_POOL_OPS:
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
