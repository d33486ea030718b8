"""OpRule.cost_terms: each weighted op's MACs against an independent count from the tensor shapes
onnxruntime actually produces (every intermediate exposed and run), on small inline graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphprune.cost import model_cost, node_cost_terms
from graphprune.graph import Model
from graphprune.oprules import rule_for
from graphprune.runtime import run_model, synthetic_inputs

from conftest import make_model


def _model(body: str, weights: dict, x: str, y: str, opset: int = 17) -> onnx.ModelProto:
    return make_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({x}) => ({y}) {{\n{body}\n}}', weights)


def _run_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Every tensor's shape as onnxruntime computes it (intermediates exposed as outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    names = [t for n in probe.graph.node for t in n.output if t and t not in have]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names)
    feeds = synthetic_inputs(model, batch=2, seed=0)
    outs = run_model(probe, feeds, optimize=False)
    shapes = {o.name: tuple(v.shape) for o, v in zip(probe.graph.output, outs)}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _independent_macs(node, s: dict) -> int:
    """MACs of one node from the ONNX spec and run-time shapes (batch included)."""
    a = _attrs(node)
    if node.op_type == "Conv":
        y, w = s[node.output[0]], s[node.input[1]]
        return int(np.prod(y)) * int(np.prod(w[1:]))           # each output element: Cin/g * kernel MACs
    if node.op_type == "ConvTranspose":
        x, w = s[node.input[0]], s[node.input[1]]
        return int(np.prod(x)) * int(np.prod(w[1:]))           # each input element scatters Cout/g * kernel
    if node.op_type == "Gemm":
        y, av = s[node.output[0]], s[node.input[0]]
        k = av[0] if a.get("transA", 0) else av[1]
        return int(np.prod(y)) * k
    if node.op_type == "MatMul":
        return int(np.prod(s[node.output[0]])) * s[node.input[0]][-1]
    return 0


GRAPHS = {  # name: (body, weights, input, output)
    "conv_bias_stride": ("y = Conv <strides=[2,2], pads=[1,1,1,1]> (x, W, B)", {"W": (6, 3, 3, 3), "B": (6,)},
                         "float[2,3,9,9] x", "float[2,6,5,5] y"),
    "conv_groups": ("y = Conv <group=2, pads=[0,0,0,0]> (x, W)", {"W": (8, 2, 3, 1)},
                    "float[2,4,7,6] x", "float[2,8,5,6] y"),
    "conv_depthwise_x2": ("y = Conv <group=4, dilations=[2,2]> (x, W)", {"W": (8, 1, 3, 3)},
                          "float[2,4,9,9] x", "float[2,8,5,5] y"),
    "conv1d": ("y = Conv (x, W)", {"W": (5, 3, 4)}, "float[2,3,10] x", "float[2,5,7] y"),
    "conv_transpose": ("y = ConvTranspose <strides=[2,2]> (x, W, B)", {"W": (4, 3, 3, 3), "B": (3,)},
                       "float[2,4,5,5] x", "float[2,3,11,11] y"),
    "conv_transpose_groups": ("y = ConvTranspose <group=2> (x, W)", {"W": (4, 3, 2, 2)},
                              "float[2,4,5,5] x", "float[2,6,6,6] y"),
    "gemm": ("y = Gemm (x, W, B)", {"W": (6, 5), "B": (5,)}, "float[2,6] x", "float[2,5] y"),
    "gemm_transB": ("y = Gemm <transB=1, alpha=0.5> (x, W)", {"W": (5, 6)}, "float[2,6] x", "float[2,5] y"),
    "gemm_transA": ("y = Gemm <transA=1, transB=1> (x, W)", {"W": (5, 6)}, "float[6,2] x", "float[2,5] y"),
    "matmul_3d": ("y = MatMul (x, W)", {"W": (6, 5)}, "float[2,7,6] x", "float[2,7,5] y"),
    "matmul_act_act": ("t = Transpose <perm=[0,2,1]> (x)\ny = MatMul (x, t)", {}, "float[2,7,6] x",
                       "float[2,7,7] y"),
}


@pytest.mark.parametrize("case", list(GRAPHS))
def test_cost_terms_match_independent_macs(case):
    body, weights, x, y = GRAPHS[case]
    model = _model(body, weights, x, y)
    shapes = _run_shapes(model)
    m = Model.load(model)
    cost = model_cost(m)
    want = {(n.name or n.output[0]): _independent_macs(n, shapes) for n in model.graph.node}
    want = {k: v for k, v in want.items() if v}
    assert want, "the graph has a weighted op"
    assert {k: int(v) for k, v in cost.per_node.items()} == want
    assert int(cost.macs) == sum(want.values())


def test_cost_terms_are_axis_products():
    """A term lists (tensor, axis) pairs: removing channels of a listed axis scales it down."""
    body, weights, x, y = GRAPHS["conv_groups"]
    m = Model.load(_model(body, weights, x, y))
    node = m.graph.nodes[0]
    terms = node_cost_terms(node)
    assert [sorted(t.axes) for t in terms] == [[("W", 0), ("W", 1)]]
    # the same terms come from the rule itself
    assert [t.axes for t in rule_for(node).cost_terms(node)] == [t.axes for t in terms]


def test_dynamic_spatial_axes_use_the_hint_size():
    """A conv with dynamic spatial axes is costed at SPATIAL_HINT_SIZE on every input axis, i.e. at the
    output size shape inference gives for that input: the count of a static 224x224 copy."""
    from graphprune.cost import SPATIAL_HINT_SIZE

    body, w = "y = Conv <strides=[2,2], pads=[1,1,1,1]> (x, W)", {"W": (6, 3, 3, 3)}
    dyn = _model(body, w, "float[1,3,H,W] x", "float[1,6,?,?] y")
    s = SPATIAL_HINT_SIZE
    static = _model(body, w, f"float[1,3,{s},{s}] x", f"float[1,6,{(s + 1) // 2},{(s + 1) // 2}] y")
    want = _independent_macs(static.graph.node[0], _run_shapes(static))
    assert int(model_cost(Model.load(dyn)).macs) == want


def test_ops_without_weights_cost_nothing():
    model = _model("t = Relu (x)\ny = Add (t, x)", {}, "float[2,3,4,4] x", "float[2,3,4,4] y")
    assert model_cost(Model.load(model)).macs == 0
