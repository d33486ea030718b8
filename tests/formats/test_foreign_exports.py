"""ONNX files from exporters other than PyTorch's dynamo: Caffe2 (IR version 3), and the op
patterns found in paddle2onnx and TorchScript files of the model zoo (tools/bench_zoo.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from conftest import assert_oracle

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # models/ is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _initializers_listed(model: onnx.ModelProto) -> None:
    """Every initializer is a graph input with the initializer's own shape (IR < 4)."""
    inputs = {i.name: i for i in model.graph.input}
    for t in model.graph.initializer:
        assert t.name in inputs, f"initializer {t.name} is not a graph input"
        dims = [d.dim_value for d in inputs[t.name].type.tensor_type.shape.dim]
        assert dims == list(t.dims), f"{t.name}: input shape {dims} != initializer shape {list(t.dims)}"


# --------------------------------------------------------------------------- Caffe2, IR version 3


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_caffe2_ir3_light_models_prune(tmp_path, name):
    """The onnx package's Caffe2 files (IR 3, opset 9, initializers listed as inputs; small
    1x1 and grouped conv weights) prune to half the MACs and stay valid IR-3 models."""
    from models.zoo import materialize_constant_of_shape

    src = LIGHT / f"light_{name}.onnx"
    dst = tmp_path / f"{name}.onnx"
    materialize_constant_of_shape(str(src), str(dst))
    original = onnx.load(dst)
    assert original.ir_version == 3
    _initializers_listed(original)
    result = assert_oracle(str(dst), target_flops=0.5)
    assert 0.48 <= result.report["macs_ratio"] <= 0.5, result.report["macs_ratio"]
    pruned = result.model
    assert pruned.ir_version == 3
    _initializers_listed(pruned)
    data = [i.name for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}]
    assert [i.name for i in pruned.graph.input if i.name in data] == data
    onnx.checker.check_model(pruned, full_check=True)
    out = tmp_path / "pruned.onnx"
    result.save(out)
    assert onnx.load(out).ir_version == 3


def _ir3_conv_model(list_weights: bool) -> onnx.ModelProto:
    """conv(8->16, 1x1) -> relu -> conv(16->4, 1x1), IR 3 / opset 9; every weight is small."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((4, 16, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5])]
    if list_weights:
        inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits] + inputs
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


@pytest.mark.parametrize("list_weights", [True, False])
def test_ir3_small_weights_are_constants(list_weights):
    """Below IR 4 onnx's shape inference reads initializer types from the input list only; a
    weight missing there (or a small one that stays inline) must still give the conv its shape,
    and the saved model lists every initializer, with its pruned shape, as an input."""
    model = _ir3_conv_model(list_weights)
    result = assert_oracle(model, target_flops=0.5, round_to=1)
    pruned = result.model
    assert pruned.ir_version == 3
    _initializers_listed(pruned)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["w1"][0] < 16 and shapes["w2"][1] == shapes["w1"][0] == shapes["b1"][0]
    assert pruned.graph.input[-1 if list_weights else 0].name == "x"  # the input list keeps its order


def test_ir8_initializer_listed_as_input_is_a_weight():
    """An IR >= 4 input with an initializer (a default value, e.g. PyTorch's
    keep_initializers_as_inputs) is analysed as a weight and listed again with its new shape."""
    model = _ir3_conv_model(True)
    model.ir_version = 8
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 13)])
    result = assert_oracle(model, target_flops=0.5, round_to=1)
    pruned = result.model
    assert pruned.ir_version == 8
    listed = {i.name for i in pruned.graph.input}
    assert {"w1", "b1", "w2", "x"} <= listed
    _initializers_listed(helper.make_model(pruned.graph, ir_version=3))


# --------------------------------------------------------------------------- TorchScript channel shuffle


def test_torchscript_deep_channel_shuffle_is_prunable(tmp_path):
    """A ShuffleNetV2 stack as the TorchScript exporter writes it: every channel shuffle is
    Reshape -> Transpose -> Reshape with targets built at run time (Shape -> Gather -> Div ->
    Concat), which onnx's inference cannot follow, one block after another. Every block's
    shapes must be recovered (not only the first few), so only the classifier stays pinned."""
    import torch
    from models.cnn import ShuffleUnit, _finish, _head, conv_bn
    from models.export import export_onnx

    torch.manual_seed(0)
    units = [ShuffleUnit(16, 32, 2)] + [ShuffleUnit(32, 32, 1) for _ in range(11)]
    module = _finish(torch.nn.Sequential(conv_bn(3, 16, 3, 2), *units, conv_bn(32, 64, 1), _head(64)), 0)
    path = export_onnx(module, tmp_path / "shuffle.onnx", dynamo=False, input_shape=(1, 3, 32, 32))
    assert sum(n.op_type == "Transpose" for n in onnx.load(path).graph.node) == len(units)
    analysis = graphprune.analyze(path)
    pinned = [(p.tensor, p.reason) for p in analysis.pinned]
    assert all("graph output" in reason for _, reason in pinned), pinned
    result = assert_oracle(path, target_flops=0.5)
    assert 0.48 <= result.report["macs_ratio"] <= 0.5, result.report["macs_ratio"]


# --------------------------------------------------------------------------- paddle2onnx (PP-OCRv4 det)

_PADDLE_DET = """
<ir_version: 8, opset_import: ["" : 12]>
det (float[N, 3, 32, 32] x) => (float[N, 1, 32, 32] y) {
    c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1, b1)
    s1 = Mul (mw, c1)
    a1 = Add (s1, mb)
    t1 = Add (a1, three)
    k1 = Clip (t1, zero, six)
    m1 = Mul (a1, k1)
    h1 = Div (m1, six)
    d2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 16> (h1, w2, b2)
    p2 = GlobalAveragePool (d2)
    e2 = Conv <kernel_shape = [1, 1]> (p2, wse1, bse1)
    r2 = Relu (e2)
    f2 = Conv <kernel_shape = [1, 1]> (r2, wse2, bse2)
    g2 = HardSigmoid <alpha = 0.1666667, beta = 0.5> (f2)
    h2 = Mul (d2, g2)
    c3 = Conv <kernel_shape = [1, 1], strides = [2, 2]> (h2, w3, b3)
    r3 = Relu (c3)
    l3 = Conv <kernel_shape = [1, 1]> (r3, wl3)
    l2 = Conv <kernel_shape = [1, 1]> (h2, wl2)
    u3 = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (l3, roi, scales)
    s2 = Add (l2, u3)
    o3 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (l3, wo3)
    o2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s2, wo2)
    v3 = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (o3, roi, scales)
    cat = Concat <axis = 1> (v3, o2)
    hc = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (cat, wh)
    hb = BatchNormalization (hc, bn_s, bn_b, bn_m, bn_v)
    hr = Relu (hb)
    t = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (hr, wt, bt)
    z = Conv <kernel_shape = [1, 1]> (t, wz, bz)
    y = Sigmoid (z)
}
"""


def test_paddle2onnx_det_patterns_hold_the_oracle():
    """The PP-OCRv4 detector's op patterns (paddle2onnx, opset 12): per-tensor learnable affine
    (Mul/Add by a [1] weight), hard-swish as Add/Clip/Mul/Div with scalar bounds, a
    squeeze-excite with HardSigmoid, nearest Resize by scales with an empty roi, an FPN Add and
    Concat, a BN + ConvTranspose head. (The zoo's PP-OCR oracle failures were float noise,
    not these rules: see models/zoo.py.)"""
    from conftest import make_model

    w = {"w1": (16, 3, 3, 3), "b1": (16,), "w2": (16, 1, 3, 3), "b2": (16,), "wse1": (8, 16, 1, 1),
         "bse1": (8,), "wse2": (16, 8, 1, 1), "bse2": (16,), "w3": (32, 16, 1, 1), "b3": (32,),
         "wl3": (16, 32, 1, 1), "wl2": (16, 16, 1, 1), "wo3": (8, 16, 3, 3), "wo2": (8, 16, 3, 3),
         "wh": (16, 16, 3, 3), "wt": (16, 8, 2, 2), "bt": (8,), "wz": (1, 8, 1, 1), "bz": (1,)}
    rng = np.random.default_rng(1)
    w.update({"mw": np.array([0.9], np.float32), "mb": np.array([0.1], np.float32),
              "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
              "six": np.array(6.0, np.float32), "roi": np.zeros(0, np.float32),
              "scales": np.array([1, 1, 2, 2], np.float32),
              "bn_s": rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_b": rng.uniform(-0.1, 0.1, 16).astype(np.float32),
              "bn_m": rng.uniform(-0.1, 0.1, 16).astype(np.float32), "bn_v": rng.uniform(0.5, 2, 16).astype(np.float32)})
    model = make_model(_PADDLE_DET, w)
    result = assert_oracle(model, target_flops=0.5, round_to=1)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w1"][0] < 16 and shapes["wh"][1] == shapes["wo3"][0] + shapes["wo2"][0]


def test_torchscript_window_partition_shapes_settle(tmp_path, monkeypatch):
    """Swin-style window attention as the TorchScript exporter writes it: the pad to a multiple
    of the window is computed at run time (Shape -> Mod -> Sub -> Concat -> Pad) and reshapes
    keep an inferred batch symbol (unk__N) that onnx renames on every inference round. The pad
    output gets its static shape, and refinement stops once only such names change."""
    import torch
    import torch.nn.functional as F
    from models.export import export_onnx

    import graphprune.graph as gpg

    class Windows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.ws = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), 4

        def forward(self, x):  # [B, C, H, W]
            x = x.permute(0, 2, 3, 1)
            for _ in range(3):
                b, h, w, c = x.shape
                x = F.pad(x, (0, 0, 0, (self.ws - w % self.ws) % self.ws, 0, (self.ws - h % self.ws) % self.ws))
                _, hp, wp, _ = x.shape
                t = x.view(b, hp // self.ws, self.ws, wp // self.ws, self.ws, c).permute(0, 1, 3, 2, 4, 5)
                t = t.reshape(-1, self.ws * self.ws, c)
                t = self.fc1(t)
                n, m, k = t.shape  # n = b * windows: an inferred symbol the reshapes keep
                t = self.fc2(torch.relu(t.reshape(n, m, 2, k // 2)).reshape(n, m, k))
                x = x + t.view(b, hp // self.ws, wp // self.ws, self.ws, self.ws, c).permute(0, 1, 3, 2, 4, 5) \
                    .reshape(b, hp, wp, c)
            return x.mean(dim=(1, 2))

    torch.manual_seed(0)
    path = export_onnx(Windows().eval(), tmp_path / "win.onnx", dynamo=False, input_shape=(1, 16, 8, 8))
    rounds = []
    real = gpg.refine_shapes
    monkeypatch.setattr(gpg, "refine_shapes", lambda *a, **k: rounds.append(1) or real(*a, **k))
    model = gpg.Model.load(path)
    pads = [n.outputs[0] for n in model.graph.nodes if n.op == "Pad"]
    assert pads and all(gpg.tensor_shape(t)[1:] == (8, 8, 16) for t in pads), [gpg.tensor_shape(t) for t in pads]
    assert len(rounds) <= 4, len(rounds)
    monkeypatch.undo()
    result = assert_oracle(path, target_flops=0.7, round_to=1)
    assert result.report["macs_ratio"] <= 0.7
