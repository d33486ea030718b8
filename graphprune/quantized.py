"""Quantized weights (IR level): an integer initializer read through DequantizeLinear, or the B
operand of MatMulInteger, stands for float values.

The rest of graphprune treats such a constant as a weight: criteria read :func:`dequantized`
values, the cost model counts it as a parameter (:func:`dequant_weight`), the rule context gives
the consumer's role to the integer constant behind the DQ (:func:`dequant_source`) and the oracle
zeroes a removed channel by writing its zero point (:func:`zero_fill`). The QDQ op rules live in
graphprune/oprules/quant.py.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["dequant_source", "dequant_weight", "dequantized", "zero_fill", "unpack_bits", "dequantize_nbits",
           "gather_table_magnitudes", "quantize_nbits"]

_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _axis(node: gs.Node, rank: int) -> int:
    axis = int(node.attrs.get("axis", 1))
    return axis + rank if axis < 0 else axis


def dequant_source(t: gs.Tensor) -> "tuple[gs.Constant, gs.Node] | None":
    """(integer constant, DequantizeLinear node) when `t` is the output of a DQ of a constant."""
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "DequantizeLinear" or (node.domain or "") not in _DOMAINS or not node.inputs:
        return None
    src = node.inputs[0]
    return (src, node) if isinstance(src, gs.Constant) else None


def _dq_consumer(c: gs.Constant) -> gs.Node | None:
    """The DequantizeLinear that reads `c` as its quantized input, if every use of `c` is one."""
    users = [n for n in c.outputs]
    if not users or any(n.op != "DequantizeLinear" or (n.domain or "") not in _DOMAINS or n.inputs[0] is not c
                        for n in users):
        return None
    return users[0]


def dequant_weight(c: gs.Constant) -> bool:
    """Whether `c` is a quantized weight: an integer constant that only DequantizeLinear reads, or
    the B operand of MatMulInteger (onnxruntime's dynamic quantization)."""
    return np.dtype(c.dtype).kind in "iub" and (_dq_consumer(c) is not None or
                                                 _integer_matmul_zero_point(c) is not None)


def _params(node: gs.Node, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a DQ node, shaped to broadcast against its rank-`rank` input."""
    def get(i, default):
        if i < len(node.inputs) and node.inputs[i].name and isinstance(node.inputs[i], gs.Constant):
            return np.asarray(node.inputs[i].values)
        return np.asarray(default)

    scale = get(1, 1.0).astype(np.float64)
    zp = get(2, 0).astype(np.float64)
    shape = [1] * rank
    if scale.ndim == 1 and scale.size > 1 and rank:
        shape[_axis(node, rank)] = scale.size
        scale = scale.reshape(shape)
    if zp.ndim == 1 and zp.size > 1 and rank:
        shape = [1] * rank
        shape[_axis(node, rank)] = zp.size
        zp = zp.reshape(shape)
    return scale, zp


def dequantized(c: gs.Tensor) -> np.ndarray | None:
    """The float values an integer constant stands for, when it is only read by DequantizeLinear
    (per-tensor or per-axis scale); None otherwise."""
    if not isinstance(c, gs.Constant) or np.asarray(c.values).dtype.kind not in "iub":
        return None
    users = list(c.outputs)
    if users and all(n.op == "MatMulNBits" and n.inputs[1] is c for n in users):  # block-quantized B
        return dequantize_nbits(users[0])
    if users and all(n.op == "GatherBlockQuantized" and n.inputs[0] is c for n in users):  # quantized embedding
        return gather_table_magnitudes(users[0])
    node = _dq_consumer(c)
    if node is None or int(node.attrs.get("block_size", 0) or 0) > 0:
        return None
    v = np.asarray(c.values)
    scale, zp = _params(node, v.ndim)
    return ((v.astype(np.float64) - zp) * scale).astype(np.float32)


def _integer_matmul_zero_point(c: gs.Constant) -> np.ndarray | None:
    """The zero point of `c` when every use is as B of MatMulInteger with the same constant
    b_zero_point (scalar, or [N] per column), shaped to broadcast against `c`."""
    users = list(c.outputs)
    if not users or any(n.op != "MatMulInteger" or len(n.inputs) < 2 or n.inputs[1] is not c for n in users):
        return None
    zps = [n.inputs[3] if len(n.inputs) > 3 and n.inputs[3].name else None for n in users]
    if zps[0] is None:
        return np.zeros(1)
    if not isinstance(zps[0], gs.Constant) or any(z is not zps[0] for z in zps):
        return None
    zp = np.asarray(zps[0].values).astype(np.float64)
    return zp.reshape([1] * (np.ndim(c.values) - 1) + [-1]) if zp.ndim == 1 else zp


def zero_fill(c: gs.Constant, axis: int, idx: np.ndarray) -> np.ndarray:
    """`c`'s values with elements `idx` of `axis` set to what means 0: the zero point when `c` is
    a quantized weight read by DequantizeLinear, else 0."""
    values = np.array(c.values, copy=True)
    sl = [slice(None)] * values.ndim
    sl[axis] = idx
    node = _dq_consumer(c) if values.dtype.kind in "iub" else None
    if node is None:
        zp = _integer_matmul_zero_point(c) if values.dtype.kind in "iub" else None
        if zp is None:
            values[tuple(sl)] = 0
            return values
    else:
        _, zp = _params(node, values.ndim)
    full = np.broadcast_to(zp, values.shape).astype(values.dtype)
    values[tuple(sl)] = full[tuple(sl)]
    return values


# --------------------------------------------------------------- MatMulNBits / GatherBlockQuantized
# Block-quantized weights of onnxruntime's contrib ops (com.microsoft): codes of `bits` bits packed
# low bits first into uint8, one scale (and zero point) per block of `block_size` values.


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes of `bits` bits packed low bits first along the last axis -> [..., count] uint8."""
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_nbits(node: gs.Node) -> np.ndarray | None:
    """The float weight of a MatMulNBits node as [N, k_blocks, block_size] (None if not constant)."""
    b, scales = node.inputs[1], node.inputs[2]
    if not isinstance(b, gs.Constant) or not isinstance(scales, gs.Constant):
        return None
    bits, bs = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
    q = np.asarray(b.values)
    n, kb = q.shape[0], q.shape[1]
    codes = unpack_bits(q, bits, bs).astype(np.float32)
    s = np.asarray(scales.values, dtype=np.float32).reshape(n, kb)
    zp_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_t is None:
        zp = np.full((n, kb), float(1 << (bits - 1)), np.float32)
    elif not isinstance(zp_t, gs.Constant):
        return None
    else:
        z = np.asarray(zp_t.values)
        zp = (unpack_bits(z.reshape(n, -1), bits, kb) if z.dtype == np.uint8 else z.reshape(n, kb)).astype(np.float32)
    return (codes - zp[..., None]) * s[..., None]


def gather_table_magnitudes(node: gs.Node) -> np.ndarray | None:
    """|dequantized values| of a GatherBlockQuantized table summed per stored byte ([vocab, bytes],
    the data's own shape), for criteria that read a weight's values."""
    data, scales = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    if not isinstance(data, gs.Constant) or not isinstance(scales, gs.Constant):
        return None
    bits, bs = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 128))
    q = np.asarray(data.values)
    if q.ndim != 2 or q.dtype != np.uint8 or bits not in (4, 8):
        return None
    per = 8 // bits
    hidden = q.shape[1] * per
    codes = unpack_bits(q, bits, hidden).astype(np.float32)
    kb = -(-hidden // bs)
    zp_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_t is None:
        zp = np.full((q.shape[0], kb), float(1 << (bits - 1)), np.float32)
    elif isinstance(zp_t, gs.Constant):
        z = np.asarray(zp_t.values)
        zp = (unpack_bits(z, bits, kb) if z.dtype == np.uint8 else z).astype(np.float32)
    else:
        return None
    s = np.asarray(scales.values, np.float32)
    deq = (codes - np.repeat(zp, bs, axis=1)[:, :hidden]) * np.repeat(s, bs, axis=1)[:, :hidden]
    return np.abs(deq).reshape(q.shape[0], q.shape[1], per).sum(-1)


def quantize_nbits(w: np.ndarray, bits: int, block_size: int, zero_point: str = "packed"):
    """Block-quantize a float weight w [K, N] (MatMul layout) the way MatMulNBits stores it.

    Returns (B uint8 [N, k_blocks, block_size * bits / 8], scales [N, k_blocks], zero_points or None):
    `zero_point` "packed" (uint8, asymmetric), "float" (the scales' type, asymmetric) or "none"
    (symmetric, implicit zero point 2^(bits-1)). K is padded to whole blocks with zeros.
    """
    k, n = w.shape
    kb = -(-k // block_size)
    wt = np.zeros((n, kb * block_size), np.float32)
    wt[:, :k] = w.T
    blocks = wt.reshape(n, kb, block_size)
    top = (1 << bits) - 1
    if zero_point == "none":
        mid = 1 << (bits - 1)
        scale = np.abs(blocks).max(-1) / max(mid - 1, 1)
        scale[scale == 0] = 1.0
        zp = np.full((n, kb), mid, np.float32)
    else:
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scale = (hi - lo) / top
        scale[scale == 0] = 1.0
        zp = np.clip(np.round(-lo / scale), 0, top)
    codes = np.clip(np.round(blocks / scale[..., None] + zp[..., None]), 0, top).astype(np.uint8)
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    packed = (codes.reshape(n, kb, -1, per) << shifts).sum(-1).astype(np.uint8)
    if zero_point == "packed":
        zpad = np.zeros((n, -(-kb // per) * per), np.uint8)
        zpad[:, :kb] = zp.astype(np.uint8)
        zps = (zpad.reshape(n, -1, per) << shifts).sum(-1).astype(np.uint8)
    elif zero_point == "float":
        zps = zp.astype(np.float32)
    else:
        zps = None
    return packed, scale.astype(np.float32), zps
