"""One or a few tests per op rule: conv/gemm -> op under test -> conv/gemm, written in ONNX text.

Each case checks (a) the channel groups the analysis finds (sizes, where they can be reasoned
out), (b) the mask-equivalence oracle at target_flops 0.6 with round_to 1 and (c) onnx.checker
with full shape inference; (b) and (c) through `assert_oracle` in conftest.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.oprules import UNARY_OPS

from conftest import analyze_checked, assert_oracle, make_model

PRUNE = dict(target_flops=0.6, round_to=1)


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(v):
    return np.asarray(v, dtype=np.float32)


def build(body: str, weights: dict, *, opset: int = 17, x: str = "float[N,3,8,8] x",
          y: str = "float[N,4,8,8] y", domains: str = ""):
    """A model from `body` (node lines of ONNX text) with the given signature."""
    ir = 8 if opset <= 18 else 9 if opset <= 20 else 10
    text = f'<ir_version: {ir}, opset_import: ["" : {opset}{domains}]>\ng ({x}) => ({y}) {{\n{body}\n}}'
    return make_model(text, weights)


def sandwich(middle: str, extra: dict | None = None, *, c: int = 8, mid_c: int | None = None, out_hw: int = 8,
             opset: int = 17):
    """x -> Conv (c channels) -> h -> `middle` (writes m, mid_c channels) -> Conv (4) -> y."""
    body = f"  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  {middle}\n  y = Conv (m, W2, B2)"
    weights = {"W1": (c, 3, 3, 3), "B1": (c,), "W2": (4, c if mid_c is None else mid_c, 1, 1), "B2": (4,),
               **(extra or {})}
    return build(body, weights, opset=opset, y=f"float[N,4,{out_hw},{out_hw}] y")


def group_sizes(model, **kw) -> list[int]:
    return sorted(g.size for g in analyze_checked(model, **kw).groups)


def check(model, expected_groups: list[int] | None):
    if expected_groups is not None:
        assert group_sizes(model) == sorted(expected_groups)
    return assert_oracle(model, **PRUNE)




# -- Conv / ConvTranspose -------------------------------------------------------------------------

CONV = {  # name: (middle conv, its weights, mid_c, expected groups)
    "bias": ("Conv <pads=[1,1,1,1]> (h, Wm, Bm)", {"Wm": (8, 8, 3, 3), "Bm": (8,)}, 8, [8, 8]),
    "no_bias": ("Conv <pads=[1,1,1,1]> (h, Wm)", {"Wm": (8, 8, 3, 3)}, 8, [8, 8]),
    "groups2": ("Conv <group=2, pads=[1,1,1,1]> (h, Wm, Bm)", {"Wm": (8, 4, 3, 3), "Bm": (8,)}, 8, [4, 4]),
    "groups4": ("Conv <group=4, pads=[1,1,1,1]> (h, Wm)", {"Wm": (8, 2, 3, 3)}, 8, [2, 2]),
    "groups2_wider": ("Conv <group=2, pads=[1,1,1,1]> (h, Wm, Bm)", {"Wm": (12, 4, 3, 3), "Bm": (12,)}, 12, [4, 6]),
    "depthwise": ("Conv <group=8, pads=[1,1,1,1]> (h, Wm, Bm)", {"Wm": (8, 1, 3, 3), "Bm": (8,)}, 8, [8]),
    "depthwise_x2": ("Conv <group=8, pads=[1,1,1,1]> (h, Wm, Bm)", {"Wm": (16, 1, 3, 3), "Bm": (16,)}, 16, [8]),
}


@pytest.mark.parametrize("case", list(CONV))
def test_conv(case):
    middle, extra, mid_c, expected = CONV[case]
    check(sandwich(f"m = {middle}", extra, mid_c=mid_c), expected)


CONV_T = {  # name: (group, weight shape, mid_c, expected groups)
    "groups1": (1, (8, 6, 2, 2), 6, [6, 8]),
    "groups2": (2, (8, 3, 2, 2), 6, [3, 4]),
    "depthwise": (8, (8, 1, 2, 2), 8, [8]),
    "depthwise_x2": (8, (8, 2, 2, 2), 16, [8]),
}


@pytest.mark.parametrize("case", list(CONV_T))
def test_conv_transpose(case):
    g, wshape, mid_c, expected = CONV_T[case]
    model = sandwich(f"m = ConvTranspose <group={g}, strides=[2,2]> (h, Wt, Bt)", {"Wt": wshape, "Bt": (mid_c,)},
                     mid_c=mid_c, out_hw=16)
    check(model, expected)


# -- Gemm / MatMul --------------------------------------------------------------------------------

@pytest.mark.parametrize("tb1, tb2", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_trans_b(tb1, tb2):
    body = f"  h = Gemm <transB={tb1}> (x, W1, B1)\n  r = Relu (h)\n  y = Gemm <transB={tb2}> (r, W2, B2)"
    w = {"W1": (8, 16) if tb1 else (16, 8), "B1": (8,), "W2": (4, 8) if tb2 else (8, 4), "B2": (4,)}
    check(build(body, w, x="float[N,16] x", y="float[N,4] y"), [8])


@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_trans_a(ta, tb):
    """The weight as operand A (output [C, N], bias [C, 1]), then the activation as transposed A."""
    body = (f"  h = Gemm <transA={ta}, transB=1> (W1, x, B1)\n  r = Relu (h)\n"
            f"  y = Gemm <transA=1, transB={tb}> (r, W2, B2)")
    w = {"W1": (16, 8) if ta else (8, 16), "B1": (8, 1), "W2": (4, 8) if tb else (8, 4), "B2": (4,)}
    check(build(body, w, x="float[N,16] x", y="float[N,4] y"), [8])


MATMUL = {  # name: (second line, head, weights, x, y)
    "weight_right": ("h = MatMul (x, W1)", "y = MatMul (r, W2)", {"W1": (16, 8), "W2": (8, 4)},
                     "float[N,16] x", "float[N,4] y"),
    "weight_right_3d": ("h = MatMul (x, W1)", "y = MatMul (r, W2)", {"W1": (16, 8), "W2": (8, 4)},
                        "float[N,5,16] x", "float[N,5,4] y"),
    "weight_right_batched": ("h = MatMul (x, W1)", "y = MatMul (r, W2)", {"W1": (2, 16, 8), "W2": (2, 8, 4)},
                             "float[N,2,5,16] x", "float[N,2,5,4] y"),
    "weight_left": ("h = MatMul (W1, x)", "y = MatMul (W2, r)", {"W1": (8, 16), "W2": (4, 8)},
                    "float[N,16,5] x", "float[N,4,5] y"),
    "left_then_right": ("h = MatMul (W1, x)", "t = Transpose <perm=[0,2,1]> (r)\n  y = MatMul (t, W2)",
                        {"W1": (8, 16), "W2": (8, 4)}, "float[N,16,5] x", "float[N,5,4] y"),
}


@pytest.mark.parametrize("case", list(MATMUL))
def test_matmul_constant_weight(case):
    first, head, w, x, y = MATMUL[case]
    check(build(f"  {first}\n  r = Relu (h)\n  {head}", w, x=x, y=y), [8])


# -- elementwise: broadcasting, activations -------------------------------------------------------

CONST_SHAPES = {"c11": (8, 1, 1), "1c11": (1, 8, 1, 1), "one": (1,), "scalar": (), "last_axis": (8,)}
BROADCAST = [(op, s) for op in ("Add", "Sub", "Mul", "Div") for s in CONST_SHAPES] + \
            [(op, s) for op in ("Max", "Min", "Sum", "PRelu") for s in ("c11", "1c11")]


@pytest.mark.parametrize("op, shape", BROADCAST)
def test_broadcast_constant(op, shape):
    k = np.random.default_rng(2).standard_normal(CONST_SHAPES[shape]).astype(np.float32)
    k = np.asarray(np.abs(k) + 0.5, dtype=np.float32) if op == "Div" else k
    check(sandwich(f"m = {op} (h, K)", {"K": k}), [8])


@pytest.mark.parametrize("op", ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"))
def test_broadcast_two_activations(op):
    """Two convs feeding one elementwise op make the same channels: one group."""
    middle = f"h2 = Conv <pads=[1,1,1,1]> (x, W1b, B1b)\n  d = Sigmoid (h2)\n  m = {op} (h, d)"
    check(sandwich(middle, {"W1b": (8, 3, 3, 3), "B1b": (8,)}), [8])


_NOT_FLOAT = {"Not", "IsNaN", "IsInf", "BitwiseNot", "Cast", "CastLike"}  # bool/int, or in ELEMENTWISE
_DOMAIN = {"Log": "Sigmoid", "Sqrt": "Sigmoid", "Reciprocal": "Sigmoid", "Asin": "Sigmoid", "Acos": "Sigmoid",
           "Atanh": "Sigmoid", "Acosh": "Cosh", "Tan": "Tanh"}  # keeps the input inside the op's domain


@pytest.mark.parametrize("op", [op for op in UNARY_OPS if op not in _NOT_FLOAT])
def test_unary(op):
    middle = f"p = {_DOMAIN.get(op, 'Identity')} (h)\n  m = {op} (p)"
    check(sandwich(middle, opset=24 if op == "Swish" else 20), [8])


ELEMENTWISE = {  # name: (middle, weights, opset)
    "clip_min_max_inputs": ("m = Clip (h, lo, hi)", {"lo": f32(-0.5), "hi": f32(0.7)}, 13),
    "clip_max_only": ('m = Clip (h, "", hi)', {"hi": f32(0.7)}, 13),
    "clip_attributes_10": ("m = Clip <min=-0.5, max=0.7> (h)", {}, 10),
    "leaky_relu_alpha": ("m = LeakyRelu <alpha=0.3> (h)", {}, 17),
    "hard_sigmoid_attrs": ("m = HardSigmoid <alpha=0.3, beta=0.4> (h)", {}, 17),
    "gelu_tanh": ('m = Gelu <approximate="tanh"> (h)', {}, 20),
    "dropout_ratio_mask": ("m, mask = Dropout (h, ratio)", {"ratio": f32(0.3)}, 13),
    "cast_roundtrip": ("d = Cast <to=11> (h)\n  m = Cast <to=1> (d)", {}, 17),
    "castlike": ("d = CastLike (h, dbl)\n  m = CastLike (d, flt)", {"dbl": np.zeros(1), "flt": f32([0])}, 17),
    "sum_three_inputs": ("h2 = Conv <pads=[1,1,1,1]> (x, W1b)\n  m = Sum (h, h2, K)",
                         {"W1b": (8, 3, 3, 3), "K": (8, 1, 1)}, 17),
    "mean": ("m = Mean (h, K)", {"K": (1, 8, 1, 1)}, 17),
    "pow_scalar": ("m = Pow (h, K)", {"K": f32(2.0)}, 17),
    "where_per_channel": ("m = Where (cond, h, K)", {"cond": np.array([True, False] * 4).reshape(8, 1, 1),
                                                     "K": (8, 1, 1)}, 17),
    "prelu_shared_slope": ("a = PRelu (h, K)\n  b = Conv <pads=[1,1,1,1]> (a, Wm)\n  m = PRelu (b, K)",
                           {"K": (8, 1, 1), "Wm": (8, 8, 3, 3)}, 17),
    "expand_gate": ("p = GlobalAveragePool (h)\n  g = Sigmoid (p)\n  e = Expand (g, shp)\n  m = Mul (h, e)",
                    {"shp": i64(1, 8, 8, 8)}, 17),
}


@pytest.mark.parametrize("case", list(ELEMENTWISE))
def test_elementwise_with_parameters(case):
    middle, extra, opset = ELEMENTWISE[case]
    check(sandwich(middle, extra, opset=opset), [8])


# -- per-channel normalisation, pooling, reductions -----------------------------------------------

PER_CHANNEL = {  # name: (middle, weights, opset, output spatial size)
    "BatchNormalization": ("m = BatchNormalization (h, s, b, mu, var)",
                           {"s": (8,), "b": (8,), "mu": (8,), "var": f32(np.linspace(0.5, 2, 8))}, 17, 8),
    "BatchNormalization_9": ("m = BatchNormalization (h, s, b, mu, var)",
                             {"s": (8,), "b": (8,), "mu": (8,), "var": f32(np.ones(8))}, 9, 8),
    "InstanceNormalization": ("m = InstanceNormalization (h, s, b)", {"s": (8,), "b": (8,)}, 17, 8),
    "MaxPool": ("m = MaxPool <kernel_shape=[2,2], strides=[2,2]> (h)", {}, 17, 4),
    "AveragePool": ("m = AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (h)", {}, 17, 4),
    "GlobalAveragePool": ("m = GlobalAveragePool (h)", {}, 17, 1),
    "GlobalMaxPool": ("m = GlobalMaxPool (h)", {}, 17, 1),
    "Softmax_axis3_13": ("m = Softmax <axis=3> (h)", {}, 13, 8),
    "Softmax_axis2_13": ("m = Softmax <axis=2> (h)", {}, 13, 8),
    "Softmax_axis-1_11": ("m = Softmax <axis=-1> (h)", {}, 11, 8),
    "Softmax_axis2_11": ("m = Softmax <axis=2> (h)", {}, 11, 8),
}


@pytest.mark.parametrize("case", list(PER_CHANNEL))
def test_per_channel_op(case):
    middle, extra, opset, hw = PER_CHANNEL[case]
    check(sandwich(middle, extra, opset=opset, out_hw=hw), [8])


SE_REDUCE = {  # name: (reduce line, extra weights, opset)
    "ReduceMean_attr_13": ("s = ReduceMean <axes=[2,3]> (h)", {}, 13),
    "ReduceMean_input_18": ("s = ReduceMean (h, ax)", {"ax": i64(2, 3)}, 18),
    "ReduceMean_negative_axes_18": ("s = ReduceMean (h, ax)", {"ax": i64(-1, -2)}, 18),
    "ReduceSum_attr_12": ("s = ReduceSum <axes=[2,3]> (h)", {}, 12),
    "ReduceSum_input_13": ("s = ReduceSum (h, ax)", {"ax": i64(2, 3)}, 13),
}


@pytest.mark.parametrize("case", list(SE_REDUCE))
def test_reduce_squeeze_excite(case):
    reduce, extra, opset = SE_REDUCE[case]
    middle = (f"{reduce}\n  s1 = Conv (s, Ws1, Bs1)\n  s2 = Relu (s1)\n  s3 = Conv (s2, Ws2, Bs2)\n"
              "  gate = Sigmoid (s3)\n  m = Mul (h, gate)")
    extra = {**extra, "Ws1": (4, 8, 1, 1), "Bs1": (4,), "Ws2": (8, 4, 1, 1), "Bs2": (8,)}
    check(sandwich(middle, extra, opset=opset), [4, 8])


def test_reduce_keepdims0_gemm_squeeze_excite():
    middle = """s = ReduceMean <keepdims=0> (h, ax)
  s1 = Gemm <transB=1> (s, Ws1, Bs1)
  s2 = Relu (s1)
  s3 = Gemm <transB=1> (s2, Ws2, Bs2)
  gate = Sigmoid (s3)
  g4 = Unsqueeze (gate, ax)
  m = Mul (h, g4)"""
    extra = {"ax": i64(2, 3), "Ws1": (4, 8), "Bs1": (4,), "Ws2": (8, 4), "Bs2": (8,)}
    check(sandwich(middle, extra, opset=18), [4, 8])


# -- index movement: Concat, Split, Slice ---------------------------------------------------------

@pytest.mark.parametrize("axis", [1, -3])
def test_concat_two_branches(axis):
    middle = f"h2 = Conv <pads=[1,1,1,1]> (x, W1b, B1b)\n  m = Concat <axis={axis}> (h, h2)"
    check(sandwich(middle, {"W1b": (6, 3, 3, 3), "B1b": (6,)}, c=4, mid_c=10), [4, 6])


def test_concat_same_tensor_twice():
    check(sandwich("m = Concat <axis=1> (h, h)", mid_c=16), [8])


SPLITS = {  # name: (split line, extra weights, opset, sizes)
    "attribute_11": ("a, b = Split <axis=1, split=[3,5]> (h)", {}, 11, (3, 5)),
    "equal_11": ("a, b = Split <axis=1> (h)", {}, 11, (4, 4)),
    "input_13": ("a, b = Split <axis=1> (h, sp)", {"sp": i64(3, 5)}, 13, (3, 5)),
    "equal_13": ("a, b = Split <axis=1> (h)", {}, 13, (4, 4)),
    "num_outputs_18": ("a, b = Split <axis=1, num_outputs=2> (h)", {}, 18, (4, 4)),
    "num_outputs_uneven_18": ("a, b, c = Split <axis=1, num_outputs=3> (h)", {}, 18, (3, 3, 2)),
}


@pytest.mark.parametrize("case", list(SPLITS))
def test_split(case):
    line, extra, opset, sizes = SPLITS[case]
    names = "abc"[:len(sizes)]
    convs = "\n  ".join(f"y{n} = Conv ({n}, W{n}, B{n})" for n in names)
    body = (f"  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  {line}\n  {convs}\n"
            f"  m = Sum ({', '.join('y' + n for n in names)})\n  y = Relu (m)")
    w = {"W1": (8, 3, 3, 3), "B1": (8,), **extra}
    for n, s in zip(names, sizes):
        w.update({f"W{n}": (4, s, 1, 1), f"B{n}": (4,)})
    check(build(body, w, opset=opset), list(sizes))


SLICES = {  # name: (starts, ends, steps or None, expected groups: the sliced and the unused channels)
    "middle": ((2,), (7,), None, [3, 5]),
    "negative": ((-6,), (-1,), None, [3, 5]),
    "to_end_step1": ((3,), (2**63 - 1,), (1,), [3, 5]),
    "all": ((0,), (8,), None, [8]),
    "step2": ((0,), (8,), (2,), [4, 4]),  # the rewrite selects the kept even channels with a Gather
    "reversed": ((-1,), (-(2**63 - 1),), (-1,), [8]),
}


@pytest.mark.parametrize("case", list(SLICES))
def test_slice_channel_axis(case):
    starts, ends, steps, expected = SLICES[case]
    extra = {"st": i64(*starts), "en": i64(*ends), "ax": i64(1), **({"sp": i64(*steps)} if steps else {})}
    line = "m = Slice (h, st, en, ax, sp)" if steps else "m = Slice (h, st, en, ax)"
    check(sandwich(line, extra, mid_c=len(range(8)[slice(starts[0], ends[0], steps[0] if steps else 1)]), opset=13), expected)


def test_overlapping_slices():
    body = """  h = Conv <pads=[1,1,1,1]> (x, W1, B1)
  a = Slice (h, s0, e0, ax)
  b = Slice (h, s1, e1, ax)
  ya = Conv (a, Wa)
  yb = Conv (b, Wb)
  y = Add (ya, yb)"""
    w = {"W1": (8, 3, 3, 3), "B1": (8,), "Wa": (4, 3, 1, 1), "Wb": (4, 6, 1, 1), "s0": i64(0), "e0": i64(3),
         "s1": i64(2), "e1": i64(8), "ax": i64(1)}
    check(build(body, w, opset=13), [1, 2, 5])  # [0,1], [2] (in both), [3..7]


# -- shape ops ------------------------------------------------------------------------------------

FLATTEN = {  # name: (flatten lines, head, weights)
    "flatten_gemm": ("f = Flatten <axis=1> (p)", "y = Gemm <transB=1> (f, W2, B2)", {"W2": (4, 32)}),
    "flatten_matmul": ("f = Flatten <axis=1> (p)", "y = MatMul (f, W2)", {"W2": (32, 4)}),
    "reshape_0_m1_gemm": ("f = Reshape (p, sh)", "y = Gemm (f, W2, B2)", {"W2": (32, 4), "sh": i64(0, -1)}),
    "reshape_m1_32_matmul": ("f = Reshape (p, sh)", "y = MatMul (f, W2)", {"W2": (32, 4), "sh": i64(-1, 32)}),
    "reshape_runtime_shape": ("s = Shape (p)\n  b = Gather <axis=0> (s, zero)\n  b1 = Unsqueeze (b, ax0)\n"
                              "  sh = Concat <axis=0> (b1, m1)\n  f = Reshape (p, sh)",
                              "y = Gemm <transB=1> (f, W2, B2)",
                              {"W2": (4, 32), "zero": np.array(0, np.int64), "ax0": i64(0), "m1": i64(-1)}),
}


@pytest.mark.parametrize("case", list(FLATTEN))
def test_flatten_reshape_into_head(case):
    lines, head, w = FLATTEN[case]
    body = (f"  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  p = MaxPool <kernel_shape=[4,4], strides=[4,4]> (h)\n"
            f"  {lines}\n  {head}")
    check(build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "B2": (4,), **w}, opset=13, y="float[N,4] y"), [8])


def test_reshape_channel_shuffle():
    """ShuffleNet: [N,8,H,W] -> [N,2,4,H,W] -> swap -> [N,8,H,W]; channels j and j+4 go together."""
    middle = "r = Reshape (h, s5)\n  t = Transpose <perm=[0,2,1,3,4]> (r)\n  m = Reshape (t, s4)"
    check(sandwich(middle, {"s5": i64(0, 2, 4, 8, 8), "s4": i64(0, 8, 8, 8)}), [4])


RESHAPE_LIKE = {  # name: (middle, weights, opset, output spatial size)
    "pad_input_13": ("m = Pad (h, pads)", {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1)}, 13, 10),
    "pad_constant_value": ("m = Pad (h, pads, cv)", {"pads": i64(0, 0, 1, 2, 0, 0, 2, 1), "cv": f32(0.5)}, 13, 11),
    "pad_reflect": ('m = Pad <mode="reflect"> (h, pads)', {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1)}, 13, 10),
    "pad_crop": ("m = Pad (h, pads)", {"pads": i64(0, 0, -1, -1, 0, 0, -1, -1)}, 13, 6),
    "pad_axes_input_18": ('m = Pad (h, pads, "", ax)', {"pads": i64(1, 1, 1, 1), "ax": i64(2, 3)}, 18, 10),
    "pad_attribute_10": ("m = Pad <pads=[0,0,1,1,0,0,1,1]> (h)", {}, 10, 10),
    "resize_scales_nearest_13": ('m = Resize <mode="nearest"> (h, "", sc)', {"sc": f32([1, 1, 2, 2])}, 13, 16),
    "resize_scales_linear_13": ('m = Resize <mode="linear"> (h, "", sc)', {"sc": f32([1, 1, 2, 2])}, 13, 16),
    "resize_roi_11": ("m = Resize (h, roi, sc)", {"roi": np.zeros(0, np.float32), "sc": f32([1, 1, 2, 2])}, 11, 16),
    "resize_scales_axes_18": ('m = Resize <axes=[2,3]> (h, "", sc)', {"sc": f32([2, 2])}, 18, 16),
    "resize_sizes_axes_18": ('m = Resize <axes=[2,3]> (h, "", "", sz)', {"sz": i64(16, 16)}, 18, 16),
    "upsample_9": ("m = Upsample (h, sc)", {"sc": f32([1, 1, 2, 2])}, 9, 16),
    "slice_spatial": ("m = Slice (h, st, en, ax)", {"st": i64(1, 1), "en": i64(7, 7), "ax": i64(2, 3)}, 13, 6),
    "identity": ("m = Identity (h)", {}, 17, 8),
}


@pytest.mark.parametrize("case", list(RESHAPE_LIKE))
def test_spatial_op(case):
    middle, extra, opset, hw = RESHAPE_LIKE[case]
    check(sandwich(middle, extra, opset=opset, out_hw=hw), [8])


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_around_gemm(opset):
    sq, usq = ("Squeeze <axes=[2,3]> (p)", "Unsqueeze <axes=[2,3]> (g)") if opset < 13 else \
        ("Squeeze (p, ax)", "Unsqueeze (g, ax)")
    middle = f"p = GlobalAveragePool (h)\n  s = {sq}\n  g = Gemm <transB=1> (s, Wg, Bg)\n  m = {usq}"
    extra = {"Wg": (6, 8), "Bg": (6,), **({"ax": i64(2, 3)} if opset >= 13 else {})}
    check(sandwich(middle, extra, mid_c=6, out_hw=1, opset=opset), [6, 8])


def test_transpose_nhwc_matmul():
    middle = ("t = Transpose <perm=[0,2,3,1]> (h)\n  mm = MatMul (t, Wm)\n  r = Relu (mm)\n"
              "  m = Transpose <perm=[0,3,1,2]> (r)")
    check(sandwich(middle, {"Wm": (6, 10)}, c=6, mid_c=10), [6, 10])


# -- fail closed ----------------------------------------------------------------------------------

def assert_w1_pinned(model, reason: str | None = None):
    """Nothing of the first conv is prunable, and (optionally) the reason says why."""
    res = graphprune.analyze(model)
    assert not any(m.tensor == "W1" for g in res.groups for m in g.members)
    why = {p.tensor: p.reason for p in res.pinned}
    assert "W1" in why and why["W1"]
    if reason is not None:
        assert reason in why["W1"], why["W1"]


def test_op_without_rule_pins():
    body = "  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  m = custom.Frob (h)\n  y = Conv (m, W2, B2)"
    model = build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "B2": (4,)}, domains=', "custom" : 1')
    assert_w1_pinned(model, "no op rule")
    with pytest.raises(graphprune.NothingToPruneError):
        graphprune.prune(model, **PRUNE)


@pytest.mark.parametrize("middle", ["r = Relu (h)\n  m = Identity (r)", "m = Identity (h)"])
def test_graph_output_pins(middle):
    body = f"  h = Conv <pads=[1,1,1,1]> (x, W1, B1)\n  {middle}\n  y = Conv (m, W2, B2)"
    model = build(body, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (4, 8, 1, 1), "B2": (4,)},
                  y="float[N,4,8,8] y, float[N,8,8,8] m")
    assert_w1_pinned(model, "graph output")


PINS = {  # name: (middle, weights, opset, mid_c)
    "softmax_over_channels_13": ("m = Softmax <axis=1> (h)", {}, 13, 8),
    "softmax_over_channels_11": ("m = Softmax <axis=1> (h)", {}, 11, 8),
    "layernorm_over_channels": ("t = Transpose <perm=[0,2,3,1]> (h)\n  ln = LayerNormalization <axis=-1> (t, g, b)\n"
                                "  m = Transpose <perm=[0,3,1,2]> (ln)", {"g": (8,), "b": (8,)}, 17, 8),
    "reduce_over_channels": ("s = ReduceMean <axes=[1]> (h)\n  m = Mul (h, s)", {}, 17, 8),
    "pad_on_channels": ("m = Pad (h, pads)", {"pads": i64(0, 1, 0, 0, 0, 1, 0, 0)}, 13, 10),
}


@pytest.mark.parametrize("case", list(PINS))
def test_mixing_channels_pins(case):
    middle, extra, opset, mid_c = PINS[case]
    assert_w1_pinned(sandwich(middle, extra, mid_c=mid_c, opset=opset))
