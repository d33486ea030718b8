"""LSTM / GRU / RNN hidden units as channels (PyTorch exports: W/R/B gate blocks, initial states
built by ConstantOfShape, bidirectional layers feeding the next layer through Transpose/Reshape)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphprune


class Stack(nn.Module):
    def __init__(self, kind: str, bidirectional: bool):
        super().__init__()
        rnn = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[kind]
        self.inp = nn.Linear(12, 16)
        self.r1 = rnn(16, 32, batch_first=True, bidirectional=bidirectional)
        self.r2 = rnn(64 if bidirectional else 32, 24, batch_first=True)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        y, _ = self.r1(torch.relu(self.inp(x)))
        y, _ = self.r2(y)
        return self.out(y)


def _export(kind: str, bidirectional: bool, path) -> str:
    torch.manual_seed(0)
    model = Stack(kind, bidirectional).eval()
    torch.onnx.export(model, (torch.randn(2, 7, 12),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}}, opset_version=17,
                      dynamo=False)
    return str(path)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_hidden_units_prune(tmp_path, kind, bidirectional):
    path = _export(kind, bidirectional, tmp_path / "rnn.onnx")
    before = graphprune.analyze(path)
    w_names = {n.input[1] for n in onnx.load(path).graph.node if n.op_type == kind}
    grouped = {m.tensor for g in before.groups for m in g.members}
    assert w_names <= grouped, "both layers' hidden units are prunable"
    result = graphprune.prune(path, target_flops=0.5, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"]
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-5
    out = result.save(tmp_path / "rnn.pruned.onnx")
    assert 0.48 <= graphprune.analyze(out).cost.macs / before.cost.macs <= 0.5
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == kind):
        hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
        assert list(inits[node.input[2]].dims)[2] == hidden < 32  # R [dirs, G*H, H] matches the attribute
    original = ort.InferenceSession(path)
    pruned = ort.InferenceSession(out)
    for batch, seq in ((1, 5), (3, 11)):  # batch and sequence stay dynamic
        x = np.random.default_rng(batch).standard_normal((batch, seq, 12)).astype(np.float32)
        y = pruned.run(None, {"x": x})[0]
        assert y.shape == (batch, seq, 5)
        assert not np.allclose(y, original.run(None, {"x": x})[0])  # units really went (the oracle is not vacuous)


def test_recurrent_layout_1_is_pinned_with_a_reason():
    from onnx import TensorProto, helper, numpy_helper

    h = 4
    w = numpy_helper.from_array(np.ones((1, 4 * h, 3), np.float32), "W")
    r = numpy_helper.from_array(np.ones((1, 4 * h, h), np.float32), "R")
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=h, layout=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 1, h])], [w, r])
    analysis = graphprune.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8))
    assert not analysis.groups
    assert any("layout=1" in p.reason for p in analysis.pinned)
