"""Transformers from the ONNX graph alone: heads, GQA, MLP width, both exporters.

For every model in models/transformer.py, both PyTorch exporters, targets 0.7 and 0.5:
the mask-equivalence oracle at two batch sizes and two sequence lengths, the checker,
dynamic batch/seq axes kept, MACs within the target, and whole attention heads found.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.runtime import run_model
from graphprune.verify import compare_outputs, masked_model

pytest.importorskip("torch")
from models.transformer import MODEL_SPECS, TRANSFORMER_MODELS, build_transformer_onnx, example_inputs  # noqa: E402
from _fixtures import export_getter  # noqa: E402

try:
    import transformers  # noqa: F401

    HAS_HF = True
except ImportError:
    HAS_HF = False

EXPORTERS = {"torchscript": False, "dynamo": True}
MODELS = [n for n in TRANSFORMER_MODELS if HAS_HF or not n.startswith("hf_")]
SHAPES = [(1, 5), (3, 11)]
# exports where attention heads are found as whole units: all of them (the dynamo exports of
# sdpa fold the head axis into the batch, [b, h, s, d] -> [-1, s, d]: a folded axis, see Reshape)
HEADS_EXPECTED = {(n, e) for n in MODELS for e in EXPORTERS}


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_getter(tmp_path_factory.mktemp("tf"), build_transformer_onnx, EXPORTERS)


def _oracle(name, result, atol=1e-4):
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    for batch, seq in SHAPES:
        feeds = example_inputs(name, batch, seq)
        want, got = run_model(masked, feeds), run_model(result.model, feeds)
        cmp = compare_outputs(want, got)
        assert cmp["max_rel"] < atol, (batch, seq, cmp)
        assert got[0].shape[0] == batch


def _dims_symbolic(model: onnx.ModelProto) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), vi.name


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", MODELS)
def test_prune_transformer(onnx_path, name, exporter, target):
    path = onnx_path(name, exporter)
    result = graphprune.prune(path, target_flops=target, round_to=1)
    report = result.report
    onnx.checker.check_model(result.model, full_check=True)
    _dims_symbolic(result.model)
    assert target - 0.02 <= report["macs_ratio"] <= target + 1e-9
    _oracle(name, result)
    if (name, exporter) in HEADS_EXPECTED:
        heads = [g for g in report["groups"] if g["kind"] == "heads"]
        assert heads, "no attention-head group found"
        # whole heads: each unit spans at least one head_dim (16 here) of q/k/v rows
        assert all(g["width"] >= 16 for g in heads)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_gqa_default_prunes_kv_groups(onnx_path, exporter):
    """LLaMA with 8 query / 2 KV heads: a KV head and its 4 query heads form one unit."""
    result = graphprune.analyze(onnx_path("llama_block", exporter))
    heads = [g for g in result.groups if g.kind == "heads"]
    assert [g.size for g in heads] == [2, 2]  # per layer: 2 KV groups
    assert all(g.width == 4 * 16 for g in heads)  # 4 query heads x head_dim 16 in q_proj
    k_proj = [m for g in heads for m in g.members if m.is_weight and m.role == "out" and m.size_per_channel == 16]
    assert k_proj, "the KV projections belong to the unit"


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_gqa_uniform_keeps_kv_heads(onnx_path, exporter):
    path = onnx_path("llama_block", exporter)
    analysis = graphprune.analyze(path, gqa_uniform=True)
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert [g.size for g in heads] == [4, 4]  # query-head slot r inside every KV group
    assert all(g.width == 2 * 16 for g in heads)
    assert any("--gqa-uniform keeps every KV head" in p.reason for p in analysis.pinned)
    result = graphprune.prune(path, target_flops=0.6, round_to=1, gqa_uniform=True)
    onnx.checker.check_model(result.model, full_check=True)
    _oracle("llama_block", result)
    kv_shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    original = {i.name: list(i.dims) for i in onnx.load(path).graph.initializer}
    kv = [p.tensor for p in analysis.pinned if "--gqa-uniform" in p.reason]  # k/v projection weights
    assert len(kv) == 4 and all(kv_shapes[n] == original[n] for n in kv), "KV projections unchanged"


def test_report_lists_removed_heads(onnx_path):
    result = graphprune.prune(onnx_path("bert_block", "dynamo"), target_flops=0.6, round_to=1)
    heads = [g for g in result.report["groups"] if g["kind"] == "heads"]
    assert heads and any(g["removed"] for g in heads)
    for g in heads:
        assert g["kept"] == g["channels"] - len(g["removed"])
        assert all(0 <= h < g["channels"] for h in g["removed"])


def test_mlp_width_and_heads_shrink_weights(onnx_path):
    path = onnx_path("gpt2_block", "torchscript")
    result = graphprune.prune(path, target_flops=0.5, round_to=1)
    before = {i.name: list(i.dims) for i in onnx.load(path).graph.initializer}
    after = {i.name: list(i.dims) for i in result.model.graph.initializer}
    fused_qkv = [n for n in before if n.endswith("c_attn.weight")]
    assert fused_qkv and any(after[n][1] < before[n][1] for n in fused_qkv)
    assert all(after[n][1] % 3 == 0 for n in fused_qkv)  # q, k and v lose the same heads
    mlp = [n for n in before if n.endswith("mlp.c_fc.weight")]
    assert any(after[n][1] < before[n][1] for n in mlp)


def test_analyze_cli_shows_heads(onnx_path, capsys):
    from graphprune.cli import main

    assert main(["analyze", onnx_path("hf_bert" if HAS_HF else "bert_block", "torchscript")]) == 0
    assert "heads x 16" in capsys.readouterr().out


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", ["bert_block", "llama_block"])
def test_head_dim_pruning_is_uniform_and_exact(onnx_path, name, exporter):
    """head_dim: one element of every head goes at once (Q.K^T contraction included);
    with rotary embeddings the pairs (j, j + d/2) go together, all layers sharing cos/sin."""
    path = onnx_path(name, exporter)
    policy = {"head_dim": True}
    analysis = graphprune.analyze(path, policy=policy)
    assert not [g for g in analysis.groups if g.kind == "heads" and g.width >= 16 and g.size in (2, 4)], \
        "whole heads are pinned in head_dim mode"
    if name == "llama_block":
        rotary = [g for g in analysis.groups if g.size == 8]  # 16 // 2 rotary pairs, shared by both layers
        assert len(rotary) == 1 and rotary[0].width == 8 * 2  # 8 query heads x the pair
    result = graphprune.prune(path, target_flops=0.6, round_to=1, policy=policy)
    onnx.checker.check_model(result.model, full_check=True)
    _oracle(name, result)
    before = {i.name: list(i.dims) for i in onnx.load(path).graph.initializer}
    after = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert any(after.get(n, d) != d for n, d in before.items() if len(d) == 2)
