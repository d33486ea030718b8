"""Run an ONNX graph in PyTorch, node by node, with its float weights as trainable parameters.

This is the engine of ``--recover`` (distillation of the pruned graph against the original). It is
a thin interpreter, not a converter, for three reasons (onnx2torch, the converter graphprune's
``torch-cuda`` backend uses, falls short on each):

- onnx2torch imports torchvision at import time and requires it; torchvision needs a different
  torch build than the CPU wheel CI installs, so recovery could not be tested there;
- a converter turns ``Conv(x, W, B)`` into an ``nn.Conv2d`` holding a *copy* of ``W``: writing the
  trained weights back means mapping modules to initializers again, and an initializer shared by
  two nodes becomes two parameters that drift apart. Here every float initializer is one
  ``nn.Parameter`` keyed by its initializer name, so write-back is by name and sharing is kept;
- the interpreter follows the ONNX spec of each op directly (opset-dependent attributes versus
  inputs included) and names an op it does not know in one line.

Shapes are computed at run time from the inputs, so dynamic axes stay dynamic. Integer tensors
(shapes, indices) run in torch too, and never carry gradients.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInputError

__all__ = ["TorchGraph", "supported_ops", "unsupported_ops", "TRAINABLE_INPUTS"]

# which inputs of which ops are weights worth training (float initializers with more than one
# element there become trainable parameters; every other initializer stays a constant)
TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "PRelu": (1,),
}

_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}


def _torch():
    try:
        import torch
    except ImportError:
        raise BadInputError("--recover needs PyTorch: pip install torch") from None
    return torch


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _str(v, default: str) -> str:
    """A string attribute (onnx gives bytes), or `default` when absent."""
    v = default if v is None else v
    return v.decode() if isinstance(v, bytes) else v


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


# --------------------------------------------------------------------------- op implementations
# each takes (torch, inputs: list[Tensor | None], attrs: dict, opset: int) and returns a list of outputs

def _binary(fn_name: str):
    def op(torch, xs, a, opset):
        x, y = xs
        if fn_name == "div" and not x.is_floating_point():
            return [torch.div(x, y, rounding_mode="trunc")]
        return [getattr(torch, fn_name)(x, y)]
    return op


def _unary(fn: Callable):
    return lambda torch, xs, a, opset: [fn(torch, xs[0], a)]


def _variadic(fn_name: str):
    def op(torch, xs, a, opset):
        out = xs[0]
        for y in xs[1:]:
            out = getattr(torch, fn_name)(out, y)
        return [out]
    return op


def _pads(a: dict, x, extents: list, strides: list) -> list:
    """ONNX pads [begin..., end...] of a Conv/pool over `x`'s spatial axes, auto_pad resolved
    (`extents`: the effective kernel size per axis)."""
    nd = len(extents)
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto = _str(a.get("auto_pad"), "NOTSET")
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + extents[i] - size, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[nd + i] = lo, total - lo
    return pads


def _torch_pad(pads: list) -> list:
    """ONNX [begin..., end...] pads as torch.nn.functional.pad's (last axis first) list."""
    nd = len(pads) // 2
    out = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[nd + i]]
    return out


def _conv(torch, xs, a, opset):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    pads = _pads(a, x, [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(nd)], strides)
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    if all(pads[i] == pads[nd + i] for i in range(nd)):
        return [fn(x, w, b, strides, pads[:nd], dil, a.get("group", 1))]
    return [fn(torch.nn.functional.pad(x, _torch_pad(pads)), w, b, strides, 0, dil, a.get("group", 1))]


def _gemm(torch, xs, a, opset):
    x, w = xs[0], xs[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(xs) > 2 and xs[2] is not None:
        y = y + a.get("beta", 1.0) * xs[2]
    return [y]


def _pool(kind: str):
    def op(torch, xs, a, opset):
        x = xs[0]
        nd = x.dim() - 2
        k = a["kernel_shape"]
        strides = a.get("strides", [1] * nd)
        pads = _pads(a, x, list(k), strides)
        ceil = bool(a.get("ceil_mode", 0))
        symmetric = all(pads[i] == pads[nd + i] and pads[i] <= k[i] // 2 for i in range(nd))
        if kind == "max":
            fn = getattr(torch.nn.functional, f"max_pool{nd}d")
            if not symmetric:
                x = torch.nn.functional.pad(x, _torch_pad(pads), value=float("-inf"))
                pads = [0] * (2 * nd)
            return [fn(x, k, strides, pads[:nd], a.get("dilations", [1] * nd), ceil)]
        fn = getattr(torch.nn.functional, f"avg_pool{nd}d")
        include = bool(a.get("count_include_pad", 0))
        if not symmetric:
            if not include and any(pads):
                raise BadInputError("AveragePool with asymmetric pads and count_include_pad=0 is not supported "
                                    "by --recover's executor")
            x = torch.nn.functional.pad(x, _torch_pad(pads))
            pads = [0] * (2 * nd)
        return [fn(x, k, strides, pads[:nd], ceil, include)]
    return op


def _global_pool(kind: str):
    def op(torch, xs, a, opset):
        x = xs[0]
        dims = tuple(range(2, x.dim()))
        return [x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)]
    return op


def _batchnorm(torch, xs, a, opset):
    x, scale, bias, mean, var = xs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * inv + bias.reshape(shape)]


def _layernorm(torch, xs, a, opset):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = a.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale
    return [y + bias if bias is not None else y]


def _simplified_layernorm(torch, xs, a, opset):
    x, scale = xs[0], xs[1]
    axis = a.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    rms = torch.sqrt((x * x).mean(dims, keepdim=True) + a.get("epsilon", 1e-5))
    return [x / rms * scale]


def _instancenorm(torch, xs, a, opset):
    x, scale, bias = xs
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return [(x - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)]


def _softmax(log: bool):
    def op(torch, xs, a, opset):
        x = xs[0]
        axis = a.get("axis", -1 if opset >= 13 else 1)
        if opset < 13 and axis % x.dim() != x.dim() - 1:   # old Softmax: over the flattened trailing axes
            shape = x.shape
            flat = x.reshape(int(np.prod(shape[:axis])), -1)
            y = torch.log_softmax(flat, 1) if log else torch.softmax(flat, 1)
            return [y.reshape(shape)]
        return [torch.log_softmax(x, axis) if log else torch.softmax(x, axis)]
    return op


def _reduce(kind: str):
    def op(torch, xs, a, opset):
        x = xs[0]
        axes_from_input = (opset >= 18) or (kind == "sum" and opset >= 13)
        axes = _ints(xs[1]) if axes_from_input and len(xs) > 1 and xs[1] is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        axes = tuple(int(v) % x.dim() for v in axes)
        if kind == "mean":
            return [x.mean(axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(axes, keepdim=keep)]
        if kind == "max":
            return [x.amax(axes, keepdim=keep)]
        if kind == "min":
            return [x.amin(axes, keepdim=keep)]
        if kind == "prod":
            y = x
            for ax in sorted(axes, reverse=True):
                y = y.prod(ax, keepdim=keep)
            return [y]
        if kind == "l2":
            return [torch.sqrt((x * x).sum(axes, keepdim=keep))]
        if kind == "l1":
            return [x.abs().sum(axes, keepdim=keep)]
        if kind == "sumsquare":
            return [(x * x).sum(axes, keepdim=keep)]
        raise AssertionError(kind)
    return op


def _reshape(torch, xs, a, opset):
    x = xs[0]
    shape = _ints(xs[1]) if opset >= 5 else list(a["shape"])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(torch, xs, a, opset):
    x = xs[0]
    axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1) if x.numel() else x.reshape(lead, int(np.prod(x.shape[axis:])))]


def _squeeze(torch, xs, a, opset):
    x = xs[0]
    axes = _ints(xs[1]) if opset >= 13 and len(xs) > 1 and xs[1] is not None else a.get("axes")
    if axes is None:
        return [x.squeeze()]
    for ax in sorted((v % x.dim() for v in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


def _unsqueeze(torch, xs, a, opset):
    x = xs[0]
    axes = _ints(xs[1]) if opset >= 13 else list(a["axes"])
    rank = x.dim() + len(axes)
    for ax in sorted(v % rank for v in axes):
        x = x.unsqueeze(ax)
    return [x]


def _concat(torch, xs, a, opset):
    return [torch.cat([x for x in xs if x is not None], a["axis"])]


def _split(torch, xs, a, opset):
    raise AssertionError("handled in TorchGraph (needs the node's output count)")


def _slice(torch, xs, a, opset):
    x = xs[0]
    if opset < 10:
        starts, ends = a["starts"], a["ends"]
        axes = a.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= x.dim()
        n = x.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[ax] = slice(s, e, st)
        else:   # negative step: torch slices forward only; take the range then flip
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            idx = list(range(s, e, st))
            index[ax] = torch.tensor(idx, dtype=torch.long, device=x.device) if idx else slice(0, 0)
    y = x
    for ax, ix in enumerate(index):   # one axis at a time keeps tensor indices simple
        if isinstance(ix, slice):
            if ix != slice(None):
                y = y[(slice(None),) * ax + (ix,)]
        else:
            y = y.index_select(ax, ix)
    return [y]


def _gather(torch, xs, a, opset):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


def _gather_elements(torch, xs, a, opset):
    x, idx = xs
    axis = a.get("axis", 0) % x.dim()
    idx = idx.long()
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))]


def _gather_nd(torch, xs, a, opset):
    data, idx = xs
    b = a.get("batch_dims", 0)
    m = idx.shape[-1]
    lead = tuple(idx.shape[:-1])
    nb = int(np.prod(data.shape[:b])) if b else 1
    flat = data.reshape((nb,) + tuple(data.shape[b:]))
    ix = idx.long().reshape(nb, -1, m)
    dims = torch.tensor(data.shape[b:b + m], dtype=torch.long, device=ix.device)
    ix = torch.where(ix < 0, ix + dims, ix)
    bi = torch.arange(nb, device=ix.device)[:, None].expand(nb, ix.shape[1])
    out = flat[(bi,) + tuple(ix[..., i] for i in range(m))]
    return [out.reshape(lead + tuple(data.shape[b + m:]))]


def _trilu(torch, xs, a, opset):
    k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None else 0
    return [torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)]


def _transpose(torch, xs, a, opset):
    x = xs[0]
    return [x.permute(a.get("perm", list(reversed(range(x.dim())))))]


def _shape(torch, xs, a, opset):
    dims = list(xs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return [torch.tensor(dims[start:end] if opset >= 15 else dims, dtype=torch.int64)]


def _expand(torch, xs, a, opset):
    x, shape = xs[0], _ints(xs[1])
    rank = max(x.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    xs_shape = [1] * (rank - x.dim()) + list(x.shape)
    target = [max(s, d) if s != 1 and d != 1 else (d if s == 1 else s) for s, d in zip(shape, xs_shape)]
    return [x.reshape(xs_shape).expand(target)]


def _tile(torch, xs, a, opset):
    return [xs[0].repeat(_ints(xs[1]))]


def _cast(torch, xs, a, opset):
    name = _DTYPES.get(a["to"])
    if name is None:
        raise BadInputError(f"--recover's executor cannot Cast to ONNX type {a['to']}")
    return [xs[0].to(getattr(torch, name))]


def _constant_of_shape(torch, xs, a, opset):
    value = a.get("value")
    arr = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    t = torch.from_numpy(np.array(arr).reshape(-1)[:1].copy())
    return [t.reshape(()).expand(_ints(xs[0])).clone() if len(_ints(xs[0])) else t.reshape(())]


def _range(torch, xs, a, opset):
    start, limit, delta = (x.item() for x in xs)
    return [torch.arange(start, limit, delta, dtype=xs[0].dtype)]


def _where(torch, xs, a, opset):
    return [torch.where(xs[0].bool(), xs[1], xs[2])]


def _clip(torch, xs, a, opset):
    x = xs[0]
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = xs[1] if len(xs) > 1 and xs[1] is not None else None
        hi = xs[2] if len(xs) > 2 and xs[2] is not None else None
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return [x]


def _gelu(torch, x, a):
    approx = _str(a.get("approximate"), "none")
    return torch.nn.functional.gelu(x, approximate="tanh" if approx == "tanh" else "none")


def _pad(torch, xs, a, opset):
    x = xs[0]
    pads = _ints(xs[1]) if opset >= 11 else list(a["pads"])
    value = float(xs[2].item()) if opset >= 11 and len(xs) > 2 and xs[2] is not None else a.get("value", 0.0)
    mode = _str(a.get("mode"), "constant")
    if len(xs) > 3 and xs[3] is not None:
        raise BadInputError("--recover's executor supports Pad without an axes input only")
    nd = x.dim()
    pad = []
    for i in reversed(range(nd)):
        pad += [pads[i], pads[nd + i]]
    while len(pad) > 2 and pad[-2:] == [0, 0]:
        pad = pad[:-2]
    if mode == "constant":
        return [torch.nn.functional.pad(x, pad, value=value)]
    return [torch.nn.functional.pad(x, pad, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


def _matmul(torch, xs, a, opset):
    return [torch.matmul(xs[0], xs[1])]


def _einsum(torch, xs, a, opset):
    eq = a["equation"]
    return [torch.einsum(_str(eq, ""), *xs)]


def _dropout(torch, xs, a, opset):
    return [xs[0], torch.ones_like(xs[0], dtype=torch.bool)]


def _constant(torch, xs, a, opset):
    if "value" in a:
        return [torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in a:
            return [torch.from_numpy(np.array(a[key], dtype))]
    raise BadInputError(f"--recover's executor: Constant with {sorted(a)} is not supported")


def _leaky(torch, x, a):
    return torch.nn.functional.leaky_relu(x, a.get("alpha", 0.01))


def _conv_transpose(torch, xs, a, opset):
    """ConvTranspose: torch's conv_transpose without padding, then the ONNX pads cropped off (they
    may be asymmetric); ``output_shape`` / ``auto_pad`` pads follow the spec's total-padding rule."""
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    out_pad = list(a.get("output_padding", [0] * nd))
    k = [(w.shape[2 + i] - 1) * dil[i] + 1 for i in range(nd)]
    full = [strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + k[i] for i in range(nd)]
    auto = _str(a.get("auto_pad"), "NOTSET")
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a["output_shape"])[-nd:] if "output_shape" in a else \
            [x.shape[2 + i] * strides[i] for i in range(nd)]
        total = [full[i] - want[i] for i in range(nd)]
        if auto == "SAME_UPPER":
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
          3: torch.nn.functional.conv_transpose3d}[nd]
    y = fn(x, w, None, strides, 0, out_pad, a.get("group", 1), dil)   # output_padding < stride (spec)
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[nd + i]) for i in range(nd)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return [y]


def _resize_axis(torch, x, axis: int, out_len: int, scale: float, a: dict, mode: str, coord: str):
    """One axis of Resize: source coordinates by the spec's coordinate transformation, then nearest
    (gather) or linear / cubic (weighted gather of 2 / 4 neighbours, edge-clamped). Separable, so
    applying it axis by axis is exact for every mode."""
    n = x.shape[axis]
    r = torch.arange(out_len, dtype=torch.float64)
    if coord == "half_pixel":
        src = (r + 0.5) / scale - 0.5
    elif coord == "half_pixel_symmetric":
        adj = out_len / (scale * n)
        src = n / 2 * (1 - adj) + (r + 0.5) / scale - 0.5
    elif coord == "pytorch_half_pixel":
        src = (r + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(r)
    elif coord == "align_corners":
        src = r * (n - 1) / (out_len - 1) if out_len > 1 else torch.zeros_like(r)
    elif coord == "asymmetric":
        src = r / scale
    else:
        raise BadInputError(f"--recover's executor: Resize coordinate_transformation_mode {coord!r} is not supported")
    if mode == "nearest":
        nm = _str(a.get("nearest_mode"), "round_prefer_floor")
        idx = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5), "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
               "floor": torch.floor, "ceil": torch.ceil}[nm](src)
        idx = idx.clamp(0, n - 1).long().to(x.device)
        return x.index_select(axis, idx)
    base = torch.floor(src)
    t = src - base
    if mode == "linear":
        taps, weights = [0, 1], [1 - t, t]
    else:   # cubic, Keys kernel with coefficient A
        ca = float(a.get("cubic_coeff_a", -0.75))

        def kern(d):
            d = d.abs()
            return torch.where(d <= 1, ((ca + 2) * d - (ca + 3)) * d * d + 1,
                               torch.where(d < 2, ((ca * d - 5 * ca) * d + 8 * ca) * d - 4 * ca, torch.zeros_like(d)))

        taps = [-1, 0, 1, 2]
        weights = [kern(t - j) for j in taps]
        if a.get("exclude_outside", 0):
            inside = [((base + j >= 0) & (base + j <= n - 1)).double() for j in taps]
            weights = [w_ * m for w_, m in zip(weights, inside)]
            total = sum(weights)
            weights = [w_ / total for w_ in weights]
    shape = [1] * x.dim()
    shape[axis] = out_len
    y = 0
    for j, w_ in zip(taps, weights):
        idx = (base + j).clamp(0, n - 1).long().to(x.device)
        y = y + x.index_select(axis, idx) * w_.to(x.dtype).to(x.device).reshape(shape)
    return y


def _resize(torch, xs, a, opset):
    """Resize (opset 10-19) and Upsample (7-9), by the spec: output sizes from ``sizes`` or
    ``floor(input * scales)``; every axis whose size changes is resampled (nearest, linear, cubic;
    all coordinate transformation and nearest modes but tf_crop_and_resize; no antialias)."""
    x = xs[0]
    mode = _str(a.get("mode"), "nearest")
    if opset < 11:   # Upsample / Resize-10: (X, scales), asymmetric coordinates, nearest rounds down
        coord, sizes = "asymmetric", None
        scales = xs[1] if len(xs) > 1 and xs[1] is not None else torch.tensor(list(a["scales"]))   # Upsample-7
        a = dict(a, nearest_mode=a.get("nearest_mode", b"floor"))
    else:
        coord = _str(a.get("coordinate_transformation_mode"), "half_pixel")
        scales = xs[2] if len(xs) > 2 and xs[2] is not None and xs[2].numel() else None
        sizes = xs[3] if len(xs) > 3 and xs[3] is not None and xs[3].numel() else None
    axes = list(a.get("axes", range(x.dim())))
    axes = [ax % x.dim() for ax in axes]
    if sizes is not None:
        out = [int(v) for v in sizes.tolist()]
        policy = _str(a.get("keep_aspect_ratio_policy"), "stretch")
        ratio = [out[i] / x.shape[ax] for i, ax in enumerate(axes)]
        if policy in ("not_larger", "not_smaller"):
            r = min(ratio) if policy == "not_larger" else max(ratio)
            ratio = [r] * len(axes)
            out = [int(np.floor(r * x.shape[ax] + 0.5)) for ax in axes]
        scale = ratio
    else:
        scale = [float(v) for v in scales.tolist()]
        out = [int(np.floor(x.shape[ax] * scale[i])) for i, ax in enumerate(axes)]
    if a.get("antialias", 0) and mode != "nearest" and any(s < 1 for s in scale):
        raise BadInputError("--recover's executor: Resize with antialias=1 when downsampling is not supported")
    for i, ax in enumerate(axes):
        if out[i] != x.shape[ax] or scale[i] != 1.0:
            x = _resize_axis(torch, x, ax, out[i], scale[i], a, mode, coord)
    return [x]


def _scatter_nd(torch, xs, a, opset):
    """ScatterND (reduction none/add/mul/max/min): the indexed slices of a copy of ``data`` replaced
    (or combined) by ``updates``; out of place, so gradients flow to both."""
    data, indices, updates = xs[0], xs[1].long(), xs[2]
    k = indices.shape[-1]
    lead = list(data.shape[:k])
    idx = indices.reshape(-1, k)
    idx = torch.where(idx < 0, idx + torch.tensor(lead, device=idx.device), idx)
    strides = [int(np.prod(lead[j + 1:])) for j in range(k)]
    lin = (idx * torch.tensor(strides, device=idx.device)).sum(-1)
    flat = data.reshape([int(np.prod(lead))] + list(data.shape[k:]))
    upd = updates.reshape([lin.shape[0]] + list(data.shape[k:]))
    red = _str(a.get("reduction"), "none")
    if red == "none":
        out = flat.index_put((lin,), upd)
    elif red == "add":
        out = flat.index_put((lin,), upd, accumulate=True)
    else:
        out = flat.index_reduce(0, lin, upd, {"mul": "prod", "max": "amax", "min": "amin"}[red])
    return [out.reshape(data.shape)]


def _scatter_elements(torch, xs, a, opset):
    data, indices, updates = xs[0], xs[1].long(), xs[2]
    axis = a.get("axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    red = _str(a.get("reduction"), "none")
    if red == "none":
        return [data.scatter(axis, indices, updates)]
    return [data.scatter_reduce(axis, indices, updates, {"add": "sum", "mul": "prod", "max": "amax",
                                                          "min": "amin"}[red])]


def _cumsum(torch, xs, a, opset):
    x = xs[0]
    axis = int(xs[1].reshape(-1)[0]) % x.dim()
    if a.get("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if a.get("exclusive", 0):
        y = y - x
    return [y.flip(axis) if a.get("reverse", 0) else y]


def _arg(kind: str):
    def op(torch, xs, a, opset):
        x = xs[0]
        axis = a.get("axis", 0) % x.dim()
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            i = getattr(x.flip(axis), kind)(axis, keepdim=keep)
            return [x.shape[axis] - 1 - i]
        return [getattr(x, kind)(axis, keepdim=keep)]
    return op


def _depth_to_space(torch, xs, a, opset):
    x = xs[0]
    n, c, h, w = x.shape
    bs = a["blocksize"]
    if _str(a.get("mode"), "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (bs * bs), h * bs, w * bs)]


def _space_to_depth(torch, xs, a, opset):
    x = xs[0]
    n, c, h, w = x.shape
    bs = a["blocksize"]
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * bs * bs, h // bs, w // bs)]


def _isinf(torch, xs, a, opset):
    x = xs[0]
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return [(torch.isposinf(x) if pos else torch.zeros_like(x, dtype=torch.bool))
            | (torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool))]


_OPS: dict[str, Callable] = {
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Pow": _binary("pow"), "Equal": _binary("eq"), "Less": _binary("lt"), "Greater": _binary("gt"),
    "LessOrEqual": _binary("le"), "GreaterOrEqual": _binary("ge"), "And": _binary("logical_and"),
    "Or": _binary("logical_or"), "Max": _variadic("maximum"), "Min": _variadic("minimum"),
    "Sum": _variadic("add"), "Mod": _binary("fmod"),
    "Not": _unary(lambda t, x, a: ~x), "Relu": _unary(lambda t, x, a: t.relu(x)),
    "Sigmoid": _unary(lambda t, x, a: t.sigmoid(x)), "Tanh": _unary(lambda t, x, a: t.tanh(x)),
    "Erf": _unary(lambda t, x, a: t.erf(x)), "Exp": _unary(lambda t, x, a: t.exp(x)),
    "Log": _unary(lambda t, x, a: t.log(x)), "Sqrt": _unary(lambda t, x, a: t.sqrt(x)),
    "Reciprocal": _unary(lambda t, x, a: t.reciprocal(x)), "Neg": _unary(lambda t, x, a: -x),
    "Abs": _unary(lambda t, x, a: x.abs()), "Floor": _unary(lambda t, x, a: x.floor()),
    "Ceil": _unary(lambda t, x, a: x.ceil()), "Identity": _unary(lambda t, x, a: x),
    "Softplus": _unary(lambda t, x, a: t.nn.functional.softplus(x)),
    "HardSigmoid": _unary(lambda t, x, a: t.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)),
    "HardSwish": _unary(lambda t, x, a: x * t.clamp(x / 6 + 0.5, 0, 1)),
    "LeakyRelu": _unary(_leaky), "Elu": _unary(lambda t, x, a: t.nn.functional.elu(x, a.get("alpha", 1.0))),
    "Selu": _unary(lambda t, x, a: a.get("gamma", 1.0507009873554805) * t.where(
        x > 0, x, a.get("alpha", 1.6732632423543772) * (t.exp(x) - 1))),
    "Gelu": _unary(_gelu), "Sin": _unary(lambda t, x, a: x.sin()), "Cos": _unary(lambda t, x, a: x.cos()),
    "PRelu": lambda t, xs, a, o: [t.where(xs[0] >= 0, xs[0], xs[0] * xs[1])],
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"), "GlobalMaxPool": _global_pool("max"),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm, "InstanceNormalization": _instancenorm,
    "SimplifiedLayerNormalization": _simplified_layernorm,
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL2": _reduce("l2"),
    "ReduceL1": _reduce("l1"), "ReduceSumSquare": _reduce("sumsquare"),
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat,
    "Split": _split, "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements,
    "GatherND": _gather_nd, "Trilu": _trilu,
    "Transpose": _transpose, "Shape": _shape, "Size": lambda t, xs, a, o: [t.tensor(xs[0].numel(), dtype=t.int64)],
    "Expand": _expand, "Tile": _tile, "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Where": _where, "Clip": _clip, "Pad": _pad, "Dropout": _dropout, "Constant": _constant,
    "ConvTranspose": _conv_transpose, "Resize": _resize, "Upsample": _resize, "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements, "CumSum": _cumsum, "ArgMax": _arg("argmax"), "ArgMin": _arg("argmin"),
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth, "IsInf": _isinf,
    "IsNaN": _unary(lambda t, x, a: t.isnan(x)), "Sign": _unary(lambda t, x, a: x.sign()),
    "Round": _unary(lambda t, x, a: t.round(x)), "Softsign": _unary(lambda t, x, a: x / (1 + x.abs())),
    "Mish": _unary(lambda t, x, a: x * t.tanh(t.nn.functional.softplus(x))),
    "Xor": _binary("logical_xor"),
}
_CONTRIB = {"SimplifiedLayerNormalization", "Gelu"}   # also accepted in the com.microsoft domain


def supported_ops() -> set[str]:
    return set(_OPS)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (domain-qualified where not ai.onnx) the executor cannot run, sorted."""
    bad = set()
    for n in model.graph.node:
        domain = n.domain or ""
        if domain in ("", "ai.onnx") and n.op_type in _OPS:
            continue
        if domain == "com.microsoft" and n.op_type in _CONTRIB:
            continue
        bad.add(n.op_type if domain in ("", "ai.onnx") else f"{domain}.{n.op_type}")
    return sorted(bad)


def _split_outputs(torch, node, xs, a, opset):
    x = xs[0]
    axis = a.get("axis", 0) % x.dim()
    n_out = len(node.output)
    if opset >= 13 and len(xs) > 1 and xs[1] is not None:
        sizes = _ints(xs[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = x.shape[axis]
        parts = a.get("num_outputs", n_out)
        step = -(-n // parts)
        sizes = [min(step, n - i * step) for i in range(parts)]
    return list(torch.split(x, sizes, axis))


class TorchGraph:
    """An ONNX graph as a callable torch module whose trainable weights are named by initializer.

    ``TorchGraph(model)`` builds an ``nn.Module`` (``.module``); ``module(**feeds)`` or
    ``run(feeds)`` returns ``{output name: tensor}``. ``trainable`` lists the initializer names that
    are parameters (see :data:`TRAINABLE_INPUTS`); :meth:`weights` gives their current values as
    numpy arrays, ready to write back into the ONNX graph under the same names.
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: bool = True, device: str = "cpu"):
        torch = _torch()
        missing = unsupported_ops(model)
        if missing:
            raise BadInputError(f"--recover cannot run this graph in PyTorch: no executor for "
                                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute):
            raise BadInputError("--recover cannot run graphs with sub-graphs (If/Loop/Scan) in PyTorch")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.nodes = list(model.graph.node)
        self.inputs = [i.name for i in model.graph.input]
        self.outputs = [o.name for o in model.graph.output]
        self.device = torch.device(device)
        inits = {t.name: t for t in model.graph.initializer}
        self.inputs = [n for n in self.inputs if n not in inits]
        train_names = set()
        if trainable:
            for node in self.nodes:
                for i in TRAINABLE_INPUTS.get(node.op_type, ()):
                    if i < len(node.input) and node.input[i] in inits:
                        t = inits[node.input[i]]
                        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and \
                                int(np.prod(t.dims)) > 1:
                            train_names.add(t.name)
        self.trainable = sorted(train_names)
        self._dtypes = {}
        module = torch.nn.Module()
        module.params = torch.nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self.constants: dict[str, object] = {}
        for name, t in inits.items():
            arr = numpy_helper.to_array(t, base_dir="")
            self._dtypes[name] = arr.dtype
            ten = torch.from_numpy(np.array(arr))
            if name in train_names:
                self._param_index[name] = len(module.params)
                module.params.append(torch.nn.Parameter(ten.to(self.device)))
            else:
                self.constants[name] = ten.to(self.device)
        self.module = module
        graph = self

        def forward(**feeds):
            return graph.run(feeds)

        module.forward = forward   # type: ignore[method-assign]

    def parameters(self):
        return list(self.module.params)

    def run(self, feeds: dict, extra: "list[str] | tuple" = ()) -> dict:
        """{output name: tensor} for `feeds`; `extra` names intermediate tensors to return too."""
        torch = _torch()
        env: dict[str, object] = dict(self.constants)
        for name, i in self._param_index.items():
            env[name] = self.module.params[i]
        for name in self.inputs:
            if name not in feeds:
                raise BadInputError(f"--recover: no value for graph input {name!r}")
            v = feeds[name]
            env[name] = v.to(self.device) if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)).to(
                self.device)
        for node in self.nodes:
            xs = [env[n] if n else None for n in node.input]
            a = _attrs(node)
            if node.op_type == "Split":
                outs = _split_outputs(torch, node, xs, a, self.opset)
            else:
                outs = _OPS[node.op_type](torch, xs, a, self.opset)
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
        return {n: env[n] for n in (*self.outputs, *extra) if n in env}

    def weights(self) -> dict[str, np.ndarray]:
        """Current trainable weights, by initializer name, in their original dtypes."""
        return {name: self.module.params[i].detach().cpu().numpy().astype(self._dtypes[name])
                for name, i in self._param_index.items()}

    def load_weights(self, values: dict[str, np.ndarray]) -> None:
        torch = _torch()
        with torch.no_grad():
            for name, v in values.items():
                self.module.params[self._param_index[name]].copy_(torch.from_numpy(np.asarray(v)))
