"""GridSample, RoiAlign, TopK, ArgMax and CumSum keep channels elementwise (ONNX spec): the
channels before them prune, the axis they act along is pinned, the oracle holds."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

import graphprune


def _model(body: str, inputs: str, outputs: str, weights: dict, opset: int = 17) -> onnx.ModelProto:
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
g ({inputs}) => ({outputs}) {{
{body}
}}"""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, value in weights.items():
        arr = value if isinstance(value, np.ndarray) else rng.standard_normal(value).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    return model


def _prune(model: onnx.ModelProto) -> tuple:
    analysis = graphprune.analyze(model)
    assert [g.size for g in analysis.groups] == [16], [p.reason for p in analysis.pinned]
    result = graphprune.prune(model, target_flops=0.5, round_to=1, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"]
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-5
    onnx.checker.check_model(result.model, full_check=True)
    dims = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert dims["w1"][0] < 16
    return analysis, result


def test_grid_sample_samples_each_channel():
    model = _model("""
 a = Conv <pads = [1, 1, 1, 1]> (x, w1)
 r = Relu (a)
 s = GridSample <align_corners = 1> (r, grid)
 y = Conv (s, w2)
""", "float[N, 3, 8, 8] x, float[N, 6, 6, 2] grid", "float[N, 4, 6, 6] y",
        {"w1": (16, 3, 3, 3), "w2": (4, 16, 1, 1)})
    _prune(model)


def test_roi_align_pools_each_channel():
    rois = np.array([[0, 0, 4, 4], [1, 2, 7, 7], [2, 0, 6, 5]], np.float32)
    model = _model("""
 a = Conv <pads = [1, 1, 1, 1]> (x, w1)
 r = Relu (a)
 p = RoiAlign <output_height = 2, output_width = 2, sampling_ratio = 2> (r, rois, idx)
 y = Conv (p, w2)
""", "float[N, 3, 8, 8] x", "float[3, 4, 2, 2] y",
        {"w1": (16, 3, 3, 3), "w2": (4, 16, 1, 1), "rois": rois, "idx": np.zeros(3, np.int64)})
    _prune(model)


def test_topk_argmax_cumsum_act_along_one_axis():
    model = _model("""
 a = Conv <pads = [1, 1, 1, 1]> (x, w1)
 h = Relu (a)
 tv, ti = TopK <axis = 3> (h, k)
 c = CumSum (tv, ax)
 m = ArgMax <axis = 2, keepdims = 1> (h)
 mf = Cast <to = 1> (m)
 y1 = Conv (c, w2)
 y2 = Conv (mf, w3)
""", "float[N, 3, 8, 8] x", "float[N, 4, 8, 2] y1, float[N, 4, 1, 8] y2",
        {"w1": (16, 3, 3, 3), "w2": (4, 16, 1, 1), "w3": (4, 16, 1, 1), "k": np.array([2], np.int64),
         "ax": np.array(3, np.int64)})
    analysis, result = _prune(model)
    reasons = " ".join(p.reason for p in analysis.pinned)
    assert "y1" in reasons or "reaches graph output" in reasons
