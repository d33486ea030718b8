"""GroupNormalization (opsets 18 and 21) and MeanVarianceNormalization: channels prune in step
across the groups, statistics over the kept channels, the oracle holds."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import graphprune


def _model(opset: int, op: str) -> onnx.ModelProto:
    if op == "gn":
        pshape = (16,) if opset >= 21 else (4,)
        mid = "g = GroupNormalization <num_groups = 4, epsilon = 0.00001> (a, s, b)"
    else:
        pshape = (16, 1, 1)
        mid = "g0 = MeanVarianceNormalization (a)\n g = Mul (g0, s)"
    text = f"""<ir_version: {10 if opset >= 21 else 8}, opset_import: ["" : {opset}]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {{
 a = Conv <pads = [1, 1, 1, 1]> (x, w1)
 {mid}
 r = Relu (g)
 y = Conv <pads = [1, 1, 1, 1]> (r, w2)
}}"""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 3, 3, 3), "w2": (4, 16, 3, 3), "s": pshape} | ({"b": pshape} if op == "gn" else {})
    for name, shape in shapes.items():
        v = rng.uniform(0.5, 1.5, shape) if name == "s" else rng.standard_normal(shape)
        model.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), name))
    return model


@pytest.mark.parametrize("opset", [21, 18])
def test_group_norm_prunes_channels_in_step_across_groups(opset):
    model = _model(opset, "gn")
    analysis = graphprune.analyze(model)
    assert [g.size for g in analysis.groups] == [4]  # 16 channels = 4 groups x 4: channel j of each group is one
    result = graphprune.prune(model, target_flops=0.5, round_to=1, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"]
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-5
    dims = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    kept = dims["w1"][0]
    assert kept % 4 == 0 and kept < 16 and dims["w2"][1] == kept
    assert dims["s"] == ((kept,) if opset >= 21 else (4,))  # per-channel (21) vs per-group (18) parameters
    node = next(n for n in result.model.graph.node if n.op_type == "GroupNormalization")
    assert next(a.i for a in node.attribute if a.name == "num_groups") == 4
    if opset >= 21:  # onnx's checker rejects GroupNormalization-18 itself (deprecated), input and output alike
        onnx.checker.check_model(result.model, full_check=True)


def test_mean_variance_normalization_keeps_channels_elementwise():
    model = _model(17, "mvn")
    analysis = graphprune.analyze(model)
    assert [g.size for g in analysis.groups] == [16]
    result = graphprune.prune(model, target_flops=0.5, round_to=1, verify=True)
    assert result.report["oracle"]["equivalent"]
    dims = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert dims["s"][0] == dims["w1"][0] < 16
    onnx.checker.check_model(result.model)  # (the full check fails on the original too: onnx's MVN function)
