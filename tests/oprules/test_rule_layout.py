"""OpRule.weight_layout, checked numerically with onnxruntime: zeroing input channel c of the
activation changes the output exactly as zeroing the weight slices the layout says contract with c;
zeroing the weight slice the layout calls output channel j zeroes the output's channel j (no bias)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphprune.graph import Model
from graphprune.oprules import WeightLayout, rule_for
from graphprune.runtime import run_model, synthetic_inputs

from conftest import make_model


def _model(body: str, weights: dict, x: str, y: str) -> onnx.ModelProto:
    return make_model(f'<ir_version: 8, opset_import: ["" : 17]>\ng ({x}) => ({y}) {{\n{body}\n}}', weights)


def _layout(model: onnx.ModelProto) -> WeightLayout:
    node = Model.load(model).graph.nodes[0]
    lay = rule_for(node).weight_layout(node)
    assert lay is not None
    return lay


def _with_weight(model: onnx.ModelProto, w: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, t in enumerate(out.graph.initializer):
        if t.name == "W":
            out.graph.initializer[k].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    return out


def _weight(model) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")


def _in_slices(lay: WeightLayout, w_shape, x_channels: int, c: int):
    """The weight slices (index along in_axis, group of out_axis or None) that contract with channel c."""
    if lay.groups == 1:
        return [(c, None)]
    per = x_channels // lay.groups
    g, k = divmod(c, per)
    if lay.in_per_group:  # Conv: W[out, in/g]: output channels of group g, input k within it
        out_per = w_shape[lay.out_axis] // lay.groups
        return [(k, slice(g * out_per, (g + 1) * out_per))]
    return [(c, None)]    # ConvTranspose: W[in, out/g]: the input axis is not per group


CASES = {  # name: (body, weights, x, y, groups, depthwise)
    "conv": ("y = Conv <pads=[1,1,1,1]> (x, W)", {"W": (6, 4, 3, 3)}, "float[1,4,6,6] x", "float[1,6,6,6] y",
             1, False),
    "conv_groups": ("y = Conv <group=2> (x, W)", {"W": (6, 2, 3, 3)}, "float[1,4,6,6] x", "float[1,6,4,4] y",
                    2, False),
    "conv_depthwise": ("y = Conv <group=4> (x, W)", {"W": (8, 1, 3, 3)}, "float[1,4,6,6] x", "float[1,8,4,4] y",
                       4, True),
    "conv_transpose": ("y = ConvTranspose (x, W)", {"W": (4, 3, 2, 2)}, "float[1,4,5,5] x", "float[1,3,6,6] y",
                       1, False),
    "conv_transpose_groups": ("y = ConvTranspose <group=2> (x, W)", {"W": (4, 3, 2, 2)}, "float[1,4,5,5] x",
                              "float[1,6,6,6] y", 2, False),
    "conv_transpose_depthwise": ("y = ConvTranspose <group=4> (x, W)", {"W": (4, 1, 2, 2)}, "float[1,4,5,5] x",
                                 "float[1,4,6,6] y", 4, True),
    "gemm": ("y = Gemm (x, W)", {"W": (4, 5)}, "float[3,4] x", "float[3,5] y", 1, False),
    "gemm_transB": ("y = Gemm <transB=1> (x, W)", {"W": (5, 4)}, "float[3,4] x", "float[3,5] y", 1, False),
    "gemm_transA_transB": ("y = Gemm <transA=1, transB=1> (x, W)", {"W": (5, 4)}, "float[4,3] x", "float[3,5] y",
                           1, False),
    "matmul": ("y = MatMul (x, W)", {"W": (4, 5)}, "float[2,3,4] x", "float[2,3,5] y", 1, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weight_layout_input_channels(case):
    body, weights, x, y, groups, depthwise = CASES[case]
    model = _model(body, weights, x, y)
    lay = _layout(model)
    feeds = synthetic_inputs(model, batch=1, seed=1)
    xv = feeds["x"]
    w = _weight(model)
    channels = xv.shape[lay.x_axis]
    assert lay.weight == 1 and lay.x == 0 and lay.groups == groups
    assert lay.input_channels(w.shape) == channels
    assert lay.is_depthwise(w.shape, channels) == depthwise
    for c in range(channels):
        xz = xv.copy()
        np.moveaxis(xz, lay.x_axis, 0)[c] = 0
        want = run_model(model, {"x": xz}, optimize=False)[0]
        wz = w.copy()
        for idx, out_sel in _in_slices(lay, w.shape, channels, c):
            view = np.moveaxis(wz, lay.in_axis, 0)[idx]      # drop in_axis: out_axis shifts if it was after
            out_ax = lay.out_axis % w.ndim
            out_ax -= out_ax > lay.in_axis % w.ndim
            if out_sel is None:
                view[...] = 0
            else:
                np.moveaxis(view, out_ax, 0)[out_sel] = 0
        got = run_model(_with_weight(model, wz), {"x": xv}, optimize=False)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"input channel {c}")


@pytest.mark.parametrize("case", list(CASES))
def test_weight_layout_output_channels(case):
    body, weights, x, y, groups, _ = CASES[case]
    model = _model(body, weights, x, y)
    lay = _layout(model)
    xv = synthetic_inputs(model, batch=1, seed=2)["x"]
    w = _weight(model)
    y_axis = lay.y_axis  # the output channel axis the layout states
    n_out = w.shape[lay.out_axis] * (1 if lay.in_per_group else lay.groups)
    base = run_model(model, {"x": xv}, optimize=False)[0]
    assert base.shape[y_axis] == n_out
    per = w.shape[lay.out_axis]
    for j in range(per):
        wz = w.copy()
        np.moveaxis(wz, lay.out_axis, 0)[j] = 0
        got = np.moveaxis(run_model(_with_weight(model, wz), {"x": xv}, optimize=False)[0], y_axis, 0)
        # Conv: output channel j; ConvTranspose with groups: channel j of every group
        zeroed = [j] if lay.in_per_group or lay.groups == 1 else [g * per + j for g in range(lay.groups)]
        for k in range(n_out):
            if k in zeroed:
                assert np.all(got[k] == 0), f"weight slice {j} should feed output channel {k}"
            else:
                np.testing.assert_allclose(got[k], np.moveaxis(base, y_axis, 0)[k], rtol=1e-6, atol=1e-6)


def test_gemm_layout_reads_attributes():
    model = _model("y = Gemm <transA=1, transB=1, alpha=0.5, beta=2.0> (x, W, B)", {"W": (5, 4), "B": (5,)},
                   "float[4,3] x", "float[3,5] y")
    lay = _layout(model)
    assert (lay.kind, lay.x_axis, lay.in_axis, lay.out_axis, lay.trans_b, lay.alpha) == ("gemm", 0, 1, 0, 1, 0.5)
    assert (lay.bias, lay.bias_scale_attr) == (2, "beta")


def test_ops_without_a_weight_have_no_layout():
    model = _model("y = Relu (x)", {}, "float[1,4] x", "float[1,4] y")
    node = Model.load(model).graph.nodes[0]
    assert rule_for(node).weight_layout(node) is None


def test_function_rule_keeps_the_replaced_rules_knowledge():
    """A rule registered as a plain function over Conv keeps Conv's cost, layout and roles."""
    from graphprune.oprules import default_registry, register_op_rule

    reg = default_registry()
    rule = register_op_rule("Conv", lambda ctx: ctx.pin_all("custom"), registry=reg)
    model = _model("y = Conv (x, W)", {"W": (6, 4, 1, 1)}, "float[1,4,3,3] x", "float[1,6,3,3] y")
    node = Model.load(model).graph.nodes[0]
    assert reg.lookup("", "Conv", 17) is rule
    assert rule.weight_layout(node) == _layout(model)
    assert [t.axes for t in rule.cost_terms(node)] == [[("W", 0), ("W", 1)]]


def test_scale_roles():
    from graphprune.oprules import default_registry

    reg = default_registry()
    assert reg.lookup("", "BatchNormalization", 17).scale_inputs == (1,)
    assert reg.lookup("", "LayerNormalization", 17).scale_inputs == (1,)
    assert reg.lookup("", "GroupNormalization", 21).scale_inputs == (1,)
    assert reg.lookup("", "Mul", 17).scale_inputs == (0, 1)
    assert reg.lookup("", "Add", 17).scale_inputs == ()
