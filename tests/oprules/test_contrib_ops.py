"""onnxruntime contrib ops (com.microsoft) from onnxruntime.transformers' optimizer:
pruned correctly (Attention heads, BiasGelu/FastGelu MLPs) or pinned with a reason."""
from __future__ import annotations

import collections

import onnx
import pytest

import graphprune
from graphprune.runtime import run_model
from graphprune.verify import compare_outputs, masked_model

pytest.importorskip("torch")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
from models.transformer import build_transformer_onnx, example_inputs  # noqa: E402


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    out = {}
    for name, kind in (("bert_block", "bert"), ("gpt2_block", "gpt2")):
        src = build_transformer_onnx(name, False, str(tmp))
        model = optimizer.optimize_model(src, model_type=kind, num_heads=4, hidden_size=64, opt_level=0).model
        path = tmp / f"{name}.fused.onnx"
        onnx.save(model, str(path))
        out[name] = str(path)
    return out


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.domain == "com.microsoft")


@pytest.mark.parametrize("name", ["bert_block", "gpt2_block"])
def test_fused_model_prunes_and_matches_oracle(fused, name):
    path = fused[name]
    assert _ops(path), "the optimizer fused nothing"
    result = graphprune.prune(path, target_flops=0.6, round_to=1)
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    for batch, seq in ((1, 5), (3, 11)):
        feeds = example_inputs(name, batch, seq)
        assert compare_outputs(run_model(masked, feeds), run_model(result.model, feeds))["max_rel"] < 1e-4
    assert 0.58 <= result.report["macs_ratio"] <= 0.6 + 1e-9


def test_fused_attention_heads_lower_num_heads(fused):
    path = fused["bert_block"]
    assert _ops(path)["Attention"] == 2
    analysis = graphprune.analyze(path)
    assert [g.size for g in analysis.groups if g.kind == "heads"] == [4, 4]
    result = graphprune.prune(path, target_flops=0.5, round_to=1)
    heads = [a.i for n in result.model.graph.node if n.op_type == "Attention" for a in n.attribute
             if a.name == "num_heads"]
    kept = [g["kept"] for g in result.report["groups"] if g["kind"] == "heads"]
    assert heads == kept and min(heads) < 4


def test_kv_cache_attention_is_pinned_with_reason():
    """A com.microsoft Attention with past state keeps every head unless prune_kv_cache, and says why."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 48)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b")
    wo = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "wo")
    nodes = [helper.make_node("Attention", ["x", "w", "b", "", "past"], ["a", "present"], domain="com.microsoft",
                              num_heads=2, unidirectional=1, name="attn"),
             helper.make_node("MatMul", ["a", "wo"], ["y"], name="o_proj")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "B", 2, "P", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 16]),
         helper.make_tensor_value_info("present", TensorProto.FLOAT, [2, "B", 2, "T", 8])],
        [w, b, wo], value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "S", 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    analysis = graphprune.analyze(model)
    assert not [g for g in analysis.groups if g.kind == "heads"]
    assert any("KV-cache graph input past" in p.reason and "--prune-kv-cache" in p.reason for p in analysis.pinned)
    # with the flag the heads are a group that includes the state's head axis (tests/oprules/test_attention_ops.py)
    flagged = graphprune.analyze(model, prune_kv_cache=True)
    heads = [g for g in flagged.groups if g.kind == "heads"]
    assert len(heads) == 1 and {("past", 2), ("present", 2)} <= {(m.tensor, m.axis) for m in heads[0].members}
