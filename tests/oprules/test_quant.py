"""Quantized (QDQ) models: INT8 weights behind DequantizeLinear, fake-quantized activations.

The models are the example CNNs quantized by onnxruntime's own static quantizer (QDQ format,
per-channel and per-tensor weights), the form TensorRT's explicit quantization also uses.
Pruning must keep the model quantized (integer weights, their scales and zero points sliced
together), hold the oracle, pass the checker and keep the batch axis dynamic.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.oprules.quant import bypass_activation_qdq, dequantized
from models.export import export_onnx

quantization = pytest.importorskip("onnxruntime.quantization")


def _quantize(src: str, dest: str, per_channel: bool) -> str:
    model = onnx.load(src)
    name = model.graph.input[0].name

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{name: rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantization.quantize_static(src, dest, Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=per_channel, activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return dest


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdq")
    out = {}
    for name in ("resnet_basic", "mobilenet_v2"):
        src = export_onnx(name, d / f"{name}.onnx", dynamo=False, input_shape=(1, 3, 32, 32))
        for pc in (True, False):
            out[(name, pc)] = _quantize(src, str(d / f"{name}.q{int(pc)}.onnx"), pc)
    return out


def _int_weights(model: onnx.ModelProto) -> set:
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {t.name for t in model.graph.initializer
            if t.name in dq_inputs and t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2}


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_model_prunes_and_stays_quantized(quantized, tmp_path, name, per_channel):
    path = quantized[(name, per_channel)]
    before = graphprune.analyze(path)
    assert before.groups, "the quantized model has prunable groups"
    result = graphprune.prune(path, target_flops=0.5, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"] and "quantized_activations" in oracle
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-5
    out = result.save(tmp_path / "pruned.onnx")
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == onnx.load(path).ir_version
    original = onnx.load(path)
    assert _int_weights(model) == _int_weights(original) and _int_weights(model)  # still INT8 weights
    macs = graphprune.analyze(out).cost.macs / before.cost.macs
    assert 0.48 <= macs <= 0.5
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    sess = ort.InferenceSession(out)  # onnxruntime's optimisations fuse the QDQ pairs into integer kernels
    for b in (1, 3):
        x = np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype(np.float32)
        assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape[0] == b
    assert graphprune.analyze(out).cost.params < before.cost.params


def _qdq_chain(scale_a: float, scale_b: float) -> onnx.ModelProto:
    """x -> Conv(DQ(W1 int8, per-channel scale)) -> Relu -> Conv(W2 float): channel 0's int8 values
    are large with a tiny scale, channel 1's small with a large scale."""
    w1 = np.zeros((4, 2, 1, 1), np.int8)
    w1[0], w1[1], w1[2], w1[3] = 127, 10, 60, 90
    scale = np.array([scale_a, scale_b, 0.05, 0.05], np.float32)
    w2 = np.random.default_rng(0).standard_normal((3, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w1q", "s1", "z1"], ["w1"], axis=0),
             helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1q"), numpy_helper.from_array(scale, "s1"),
             numpy_helper.from_array(np.zeros(4, np.int8), "z1"), numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(nodes, "qdq_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_criterion_ranks_by_dequantized_weights(tmp_path):
    """With per-channel scales the int8 magnitudes say nothing: channel 0 (127 x 1e-4) is the
    weakest, channel 1 (10 x 1.0) the strongest; L1 on the dequantized values removes channel 0."""
    path = str(tmp_path / "chain.onnx")
    onnx.save(_qdq_chain(1e-4, 1.0), path)
    result = graphprune.prune(path, target_flops=0.75, round_to=1, verify=True)
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w1q"))
    kept_scale = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "s1"))
    assert kept.shape[0] == 3 and not (kept == 127).all(axis=(1, 2, 3)).any()  # channel 0 went
    assert np.isclose(kept_scale, 1.0).any()  # channel 1 stayed, with its own scale
    assert result.report["oracle"]["equivalent"]


def test_dequantized_values_follow_the_dq_node():
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(_qdq_chain(1e-4, 1.0))
    w = graph.tensors()["w1q"]
    v = dequantized(w)
    assert v is not None and v.dtype == np.float32
    assert np.allclose(v[0], 127 * 1e-4) and np.allclose(v[1], 10.0)
    assert dequantized(graph.tensors()["w2"]) is None  # a float weight is not a quantized one


def _blocked(axis: int) -> onnx.ModelProto:
    """x[N,8] -> MatMul(DQ(W int8 [8, 6], blocks of 2 along `axis`)) -> Relu -> MatMul -> y."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (8, 6)).astype(np.int8)
    scale_shape = (4, 6) if axis == 0 else (8, 3)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=axis, block_size=2),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w, "wq"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, scale_shape).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_blocked_quantization_pins_the_blocked_axis_only(tmp_path):
    """Blocks along the output channels: one scale covers two channels, so they are pinned with
    a reason. Blocks along the reduced axis: the output channels keep one scale column each and
    prune, the scale sliced with them (checked by the oracle)."""
    pinned = graphprune.analyze(_blocked(axis=1))
    assert not pinned.groups
    assert any("blocked quantization" in p.reason for p in pinned.pinned)
    free = graphprune.analyze(_blocked(axis=0))
    assert [g.size for g in free.groups] == [6]
    path = str(tmp_path / "blocked.onnx")
    onnx.save(_blocked(axis=0), path)
    result = graphprune.prune(path, target_flops=0.75, round_to=1, verify=True)
    assert result.report["oracle"]["equivalent"]
    scale = next(t for t in result.model.graph.initializer if t.name == "s")
    assert list(scale.dims)[0] == 4 and list(scale.dims)[1] < 6


def test_bypass_keeps_weight_dequantization(quantized):
    model = onnx.load(quantized[("resnet_basic", True)])
    plain = bypass_activation_qdq(model)
    assert not any(n.op_type == "QuantizeLinear" and not n.input[0].endswith("_quantized") and
                   n.input[0] not in {t.name for t in model.graph.initializer} for n in plain.graph.node)
    dq_weights = [n for n in plain.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in {t.name for t in model.graph.initializer}]
    assert len(dq_weights) >= 7  # every conv weight (and bias) keeps its DequantizeLinear
    onnx.checker.check_model(plain)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(plain.SerializeToString())
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()
    assert bypass_activation_qdq(plain) is plain  # nothing left to bypass


def test_identity_copies_of_a_dequantized_bias_do_not_tie_layers(tmp_path):
    """TorchScript shares an equal bias through Identity nodes; after quantization the shared value
    sits behind one DequantizeLinear. Two unrelated layers reading it must stay two groups."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], axis=0),
             helper.make_node("Identity", ["b"], ["b_copy"])]
    inits = [numpy_helper.from_array(rng.integers(-50, 50, 8).astype(np.int8), "bq"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(8, np.int8), "bz")]
    for k, bias in ((1, "b"), (2, "b_copy")):
        nodes += [helper.make_node("DequantizeLinear", [f"w{k}q", f"w{k}s"], [f"w{k}"], axis=1),
                  helper.make_node("MatMul", ["x", f"w{k}"], [f"h{k}"]),
                  helper.make_node("Add", [f"h{k}", bias], [f"a{k}"]),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"v{k}"], [f"y{k}"])]
        inits += [numpy_helper.from_array(rng.integers(-100, 100, (6, 8)).astype(np.int8), f"w{k}q"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.02, 8).astype(np.float32), f"w{k}s"),
                  numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), f"v{k}")]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["y"]))
    graph = helper.make_graph(nodes, "shared_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    path = str(tmp_path / "shared.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    result = graphprune.prune(path, target_flops=0.5, round_to=1, verify=True)
    assert sorted(g.size for g in result.context.groups) == [8, 8]
    assert result.report["oracle"]["equivalent"]
    onnx.checker.check_model(result.model, full_check=True)


def test_qdq_transformer_block_prunes_heads_and_mlp(tmp_path):
    """A quantized BERT block: MatMul weights behind per-channel DQ (axis 1), biases quantized
    through Q/DQ; heads and MLP width prune and the oracle is exact in float."""
    from models.transformer import build_transformer_onnx

    src = build_transformer_onnx("bert_block", False, tmp_path)
    model = onnx.load(src)
    from graphprune.runtime import synthetic_inputs

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.it = iter([synthetic_inputs(model, batch=1, seed=i) for i in range(3)])

        def get_next(self):
            return next(self.it, None)

    q = str(tmp_path / "bert.q.onnx")
    quantization.quantize_static(src, q, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True)
    result = graphprune.prune(q, target_flops=0.5, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"]
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-5
    kinds = {g.kind for g in result.context.groups}
    assert "heads" in kinds and len(result.context.groups) >= 2
    onnx.checker.check_model(result.model, full_check=True)
    assert _int_weights(result.model) == _int_weights(onnx.load(q))


def test_compensation_skips_quantized_weights_with_the_reason(quantized):
    result = graphprune.prune(quantized[("resnet_basic", True)], target_flops=0.5, compensate="obs")
    comp = result.report["compensation"]
    assert comp["skipped"] and not comp["layers"]
    assert all("quantized weight" in s["reason"] for s in comp["skipped"])
    assert _int_weights(result.model)  # nothing was turned into float


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamically_quantized_transformer_prunes(tmp_path, per_channel):
    """onnxruntime's quantize_dynamic: DynamicQuantizeLinear (scale from min/max over the whole
    activation) -> MatMulInteger with INT8 weights. Heads and MLP prune, MatMulInteger MACs count,
    and the oracle is exact (integer matmuls compared in exact arithmetic: onnxruntime's u8 x s8
    kernels saturate pair sums, which depends on which channels sit side by side)."""
    from models.transformer import build_transformer_onnx

    src = build_transformer_onnx("bert_block", False, tmp_path)
    q = str(tmp_path / "bert.dyn.onnx")
    quantization.quantize_dynamic(src, q, per_channel=per_channel, weight_type=quantization.QuantType.QInt8)
    before = graphprune.analyze(q)
    assert {g.kind for g in before.groups} >= {"heads"}
    result = graphprune.prune(q, target_flops=0.5, verify=True)
    oracle = result.report["oracle"]
    assert oracle["equivalent"] and "exact arithmetic" in oracle["quantized_activations"]
    assert max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch")) < 1e-6
    out = result.save(tmp_path / "bert.dyn.pruned.onnx")
    assert 0.48 <= graphprune.analyze(out).cost.macs / before.cost.macs <= 0.5
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    ints = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert ints  # still INT8 weights
    from graphprune.runtime import synthetic_inputs

    sess = ort.InferenceSession(out)
    for b in (1, 2):
        feeds = synthetic_inputs(model, batch=b)
        assert sess.run(None, feeds)[0].shape[0] == b
