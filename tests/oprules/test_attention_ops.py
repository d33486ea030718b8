"""Fused attention ops: ONNX opset-23 Attention (3-D and 4-D) and RMSNormalization,
com.microsoft MultiHeadAttention and GroupQueryAttention, built by hand from the op specs.

Each is pruned by whole heads (KV groups for grouped-query attention) with its head-count
attributes rewritten, the mask-equivalence oracle holding and onnxruntime running the
result at two batch sizes, or pinned with a reason; never a broken graph.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")

import graphprune  # noqa: E402
from graphprune.runtime import run_model  # noqa: E402
from graphprune.verify import masked_model  # noqa: E402
from graphprune.verify_io import compare_sliced, io_slices, slice_arrays  # noqa: E402

F = TensorProto.FLOAT
HIDDEN = 32
RTOL = 1e-4


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def build(kind: str, hq: int = 4, hkv: int = 4, d: int = 8, *, past: bool = False, bias: bool = False,
          attn_bias: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> q/k/v projections -> fused attention -> output projection (+ x) -> MLP (+ residual).

    kind: "mha" (com.microsoft MultiHeadAttention), "gqa" (com.microsoft GroupQueryAttention,
    always with a past cache), "attn3d" / "attn4d" (ONNX Attention, opset 23).
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, HIDDEN, hq * d), "Wq"),
             numpy_helper.from_array(_w(rng, HIDDEN, hkv * d), "Wk"),
             numpy_helper.from_array(_w(rng, HIDDEN, hkv * d), "Wv"),
             numpy_helper.from_array(_w(rng, hq * d, HIDDEN), "Wo")]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN])]
    outputs = [helper.make_tensor_value_info("out", F, ["batch", "seq", HIDDEN])]
    nodes = [helper.make_node("MatMul", ["x", w], [n]) for w, n in (("Wq", "q"), ("Wk", "k"), ("Wv", "v"))]
    cache_in, cache_out = ["", ""], []
    if past or kind == "gqa":
        for n in ("past_key", "past_value"):
            inputs.append(helper.make_tensor_value_info(n, F, ["batch", hkv, "past_seq", d]))
        for n in ("present_key", "present_value"):
            outputs.append(helper.make_tensor_value_info(n, F, ["batch", hkv, "total_seq", d]))
        cache_in, cache_out = ["past_key", "past_value"], ["present_key", "present_value"]
    ms = [helper.make_opsetid("com.microsoft", 1)]
    opset = 17
    if kind == "mha":
        ins = ["q", "k", "v"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(3 * hq * d).astype(np.float32), "qkv_bias"))
        ins += ["qkv_bias" if bias else "", "", "attn_bias" if attn_bias else ""]
        if attn_bias:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, hq, 1, 1)).astype(np.float32), "attn_bias"))
        ins += cache_in
        nodes.append(helper.make_node("MultiHeadAttention", ins, ["y"] + cache_out, domain="com.microsoft",
                                      num_heads=hq))
    elif kind == "gqa":
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v"] + cache_in +
                                      ["seqlens_k", "total_sequence_length"], ["y"] + cache_out,
                                      domain="com.microsoft", num_heads=hq, kv_num_heads=hkv))
    elif kind == "attn3d":
        opset = 23
        nodes.append(helper.make_node("Attention", ["q", "k", "v", ""] + cache_in, ["y"] + cache_out,
                                      q_num_heads=hq, kv_num_heads=hkv, is_causal=0))
    elif kind == "attn4d":
        opset = 23
        for n, h in (("q", hq), ("k", hkv), ("v", hkv)):
            inits.append(numpy_helper.from_array(np.array([0, 0, h, d], np.int64), f"{n}_shape"))
            nodes += [helper.make_node("Reshape", [n, f"{n}_shape"], [f"{n}_r"]),
                      helper.make_node("Transpose", [f"{n}_r"], [f"{n}4"], perm=[0, 2, 1, 3])]
        inits.append(numpy_helper.from_array(np.array([0, 0, hq * d], np.int64), "y_shape"))
        nodes += [helper.make_node("Attention", ["q4", "k4", "v4", ""] + cache_in, ["y4"] + cache_out),
                  helper.make_node("Transpose", ["y4"], ["y_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["y_t", "y_shape"], ["y"])]
    elif kind == "ms_attn":  # com.microsoft Attention: packed QKV weight, past/present [2, B, N, S, D]
        nodes = []
        w = np.concatenate([numpy_helper.to_array(t) for t in inits[:3]], axis=1)
        inits = [numpy_helper.from_array(w, "Wqkv"), numpy_helper.from_array(
            rng.standard_normal(w.shape[1]).astype(np.float32), "bqkv"), inits[3]]
        inputs, outputs = inputs[:1], outputs[:1]
        if past:
            inputs.append(helper.make_tensor_value_info("past", F, [2, "batch", hq, "past_seq", d]))
            outputs.append(helper.make_tensor_value_info("present", F, [2, "batch", hq, "total_seq", d]))
        nodes.append(helper.make_node("Attention", ["x", "Wqkv", "bqkv", "", "past" if past else ""],
                                      ["y"] + (["present"] if past else []), domain="com.microsoft",
                                      num_heads=hq, unidirectional=1))
    else:
        raise ValueError(kind)
    # output projection, residual, and an MLP (so MACs targets are reachable at a fine grain)
    inits += [numpy_helper.from_array(_w(rng, HIDDEN, 64), "W1"), numpy_helper.from_array(_w(rng, 64, HIDDEN), "W2")]
    nodes += [helper.make_node("MatMul", ["y", "Wo"], ["o"]), helper.make_node("Add", ["o", "x"], ["h"]),
              helper.make_node("MatMul", ["h", "W1"], ["f1"]), helper.make_node("Relu", ["f1"], ["f2"]),
              helper.make_node("MatMul", ["f2", "W2"], ["f3"]), helper.make_node("Add", ["f3", "h"], ["out"])]
    graph = helper.make_graph(nodes, kind, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + ms)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, batch, seq, past])
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else {"batch": batch, "seq": seq, "past_seq": past}[d.dim_param]
                for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    if "seqlens_k" in feeds:
        feeds["seqlens_k"] = np.full(batch, past + seq - 1, np.int32)
        feeds["total_sequence_length"] = np.array(past + seq, np.int32)
    return feeds


def short_shape(model: onnx.ModelProto, seq: int = 4, past: int = 4) -> dict:
    """A short sequence to cost at: at the default 128 (+ 128 past) tokens these one-layer models
    are mostly Q.K^T and scores.V, whose only units are whole KV groups (too coarse for a band)."""
    return {k: v.shape for k, v in feeds_for(model, 1, seq, past).items() if v.ndim}


def _attr(model, op, name):
    return [a.i for n in model.graph.node if n.op_type == op for a in n.attribute if a.name == name]


def check_pruned(original, res, sizes):
    """Oracle with sliced cache feeds, checker, onnxruntime at each (batch, seq, past)."""
    pruned = res.model
    onnx.checker.check_model(pruned, full_check=True)
    ctx = res.context
    labels = ctx.plan.removed_labels(ctx.groups)
    assert labels.size, "nothing removed"
    masked = masked_model(ctx.original, ctx.dependency, labels)
    slices = io_slices(ctx.dependency, labels)
    for batch, seq, past in sizes:
        feeds = feeds_for(original, batch, seq, past, seed=3)
        cmp = compare_sliced(masked, pruned, feeds, slices)
        assert cmp["max_rel"] <= RTOL, (batch, seq, past, cmp)
        out = run_model(pruned, slice_arrays(feeds, slices))[0]
        assert out.shape == (batch, seq, HIDDEN)
    feeds = feeds_for(original, *sizes[-1], seed=4)  # the oracle can fail: the unmasked original differs
    assert compare_sliced(original, pruned, feeds, slices)["max_rel"] > 1e-3


SIZES = [(1, 3, 0), (3, 5, 0)]
SIZES_PAST = [(1, 3, 4), (3, 1, 6)]  # GroupQueryAttention: batch 1 when seq > 1 with a past


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("kind, hq, hkv, bias", [
    ("mha", 4, 4, False), ("mha", 4, 4, True), ("attn3d", 4, 4, False), ("attn3d", 8, 2, False),
    ("attn4d", 4, 4, False), ("attn4d", 8, 2, False),
])
def test_fused_attention_heads(kind, hq, hkv, bias, target):
    model = build(kind, hq, hkv, bias=bias)
    res = graphprune.prune(model, target_flops=target, round_to=1, uniform=True, verify=True,
                           shape=short_shape(model))
    assert res.report["oracle"]["equivalent"], res.report["oracle"]
    assert target - 0.02 <= res.report["macs_ratio"] <= target
    check_pruned(model, res, SIZES)
    heads = [g for g in res.report["groups"] if g["kind"] == "heads"]
    assert len(heads) == 1 and heads[0]["removed"], res.report["groups"]
    kept_groups = heads[0]["kept"]
    rep = hq // hkv
    wq = next(t for t in res.model.graph.initializer if t.name.startswith("Wq"))
    wk = next(t for t in res.model.graph.initializer if t.name.startswith("Wk"))
    assert wq.dims[1] == kept_groups * rep * 8 and wk.dims[1] == kept_groups * 8
    if kind == "mha":
        assert _attr(res.model, "MultiHeadAttention", "num_heads") == [kept_groups]
    elif kind == "attn3d":
        assert _attr(res.model, "Attention", "q_num_heads") == [kept_groups * rep]
        assert _attr(res.model, "Attention", "kv_num_heads") == [kept_groups]


@pytest.mark.parametrize("kind, hq, hkv", [("gqa", 8, 2), ("gqa", 4, 4), ("attn4d", 8, 2), ("attn3d", 4, 2),
                                           ("mha", 4, 4), ("ms_attn", 4, 4)])
def test_fused_attention_with_cache(kind, hq, hkv):
    model = build(kind, hq, hkv, past=True)
    # the cache reaches graph inputs/outputs: pinned, with the flag named
    analysis = graphprune.analyze(model)
    assert not [g for g in analysis.groups if g.kind == "heads"]
    assert any("--prune-kv-cache" in p.reason for p in analysis.pinned)
    res = graphprune.prune(model, target_flops=0.6, round_to=1, uniform=True, prune_kv_cache=True,
                           shape=short_shape(model))
    assert 0.58 <= res.report["macs_ratio"] <= 0.6
    check_pruned(model, res, SIZES_PAST)
    kv = res.report["kv_cache"]
    axis = 2 if kind == "ms_attn" else 1  # [2, batch, heads, seq, head_size] for com.microsoft Attention
    kept_kv = next(iter(kv.values()))["after"][axis]
    assert kept_kv < hkv and all(s["after"][axis] == kept_kv for s in kv.values()), kv
    assert len(kv) == (2 if kind == "ms_attn" else 4)
    if kind == "ms_attn":
        assert _attr(res.model, "Attention", "num_heads") == [kept_kv]
    if kind == "gqa":
        assert _attr(res.model, "GroupQueryAttention", "kv_num_heads") == [kept_kv]
        assert _attr(res.model, "GroupQueryAttention", "num_heads") == [kept_kv * hq // hkv]


def test_gqa_packed_qkv_prunes_whole_kv_groups():
    """Packed QKV (key and value absent, query holds Q, K, V heads): graphprune/oprules/llm.py."""
    model = build("gqa", 4, 2, past=True)
    g = model.graph
    node = next(n for n in g.node if n.op_type == "GroupQueryAttention")
    g.node.insert(0, helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=2))
    node.input[0], node.input[1], node.input[2] = "qkv", "", ""
    res = graphprune.prune(model, target_flops=0.6, round_to=1, uniform=True, prune_kv_cache=True, verify=True)
    assert res.report["oracle"]["equivalent"], res.report["oracle"]
    check_pruned(model, res, SIZES_PAST)
    hq = _attr(res.model, "GroupQueryAttention", "num_heads")[0]
    assert hq < 4 and _attr(res.model, "GroupQueryAttention", "kv_num_heads") == [hq // 2]


@pytest.mark.parametrize("kind", ["mha-attn-bias"])
def test_unsupported_forms_pinned_not_broken(kind):
    if kind == "mha-attn-bias":
        model = build("mha", attn_bias=True)
        op = "MultiHeadAttention"
    else:  # packed QKV: key and value absent, query holds all three
        model = build("gqa", 4, 2, past=True)
        g = model.graph
        node = next(n for n in g.node if n.op_type == "GroupQueryAttention")
        g.node.insert(0, helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=2))
        node.input[0], node.input[1], node.input[2] = "qkv", "", ""
        op = "GroupQueryAttention"
    analysis = graphprune.analyze(model, prune_kv_cache=True)
    assert any(op in p.reason and "kept whole" in p.reason for p in analysis.pinned), analysis.pinned
    assert not [g for g in analysis.groups if g.kind == "heads"]


def test_rms_normalization_op():
    """ONNX RMSNormalization (opset 23) in a pre-norm MLP block: the normalized (hidden) axis is
    pinned, the MLP width is pruned, and the result runs."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.random(HIDDEN) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(_w(rng, HIDDEN, 64), "W1"), numpy_helper.from_array(_w(rng, 64, HIDDEN), "W2")]
    nodes = [helper.make_node("RMSNormalization", ["x", "g"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Add", ["m", "x"], ["out"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("out", F, ["batch", "seq", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    res = graphprune.prune(model, target_flops=0.5, round_to=1, verify=True)
    assert res.report["oracle"]["equivalent"]
    assert 0.48 <= res.report["macs_ratio"] <= 0.5
    assert not any("no op rule" in p["reason"] for p in res.report["pinned"])
    assert [g["name"] for g in res.report["groups"]] == ["W1[1]"]  # hidden (normalized) axis pinned
    assert next(t for t in res.model.graph.initializer if t.name.startswith("g")).dims == [HIDDEN]
    onnx.checker.check_model(res.model, full_check=True)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 5, HIDDEN)).astype(np.float32)
        assert run_model(res.model, {"x": x})[0].shape == (batch, 5, HIDDEN)


def test_optimizer_multi_head_attention(tmp_path):
    """MultiHeadAttention as onnxruntime.transformers' optimizer writes it for BERT
    (use_multi_head_attention, packed q/k/v bias input): heads pruned, num_heads lowered."""
    pytest.importorskip("torch")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.fusion_options import AttentionOpType, FusionOptions

    from graphprune.verify import compare_outputs
    from models.transformer import build_transformer_onnx, example_inputs

    src = build_transformer_onnx("bert_block", False, str(tmp_path))
    opts = FusionOptions("bert")
    opts.use_multi_head_attention = True
    opts.attention_op_type = AttentionOpType.MultiHeadAttention
    fused = optimizer.optimize_model(src, model_type="bert", num_heads=4, hidden_size=64, opt_level=0,
                                     optimization_options=opts).model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):  # as the optimizer's save adds it
        fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(fused, full_check=True)
    mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 2 and all(n.input[3] for n in mha)  # with the packed bias
    res = graphprune.prune(fused, target_flops=0.6, round_to=1, uniform=True)
    assert 0.58 <= res.report["macs_ratio"] <= 0.6
    onnx.checker.check_model(res.model, full_check=True)
    kept = [g["kept"] for g in res.report["groups"] if g["kind"] == "heads"]
    assert _attr(res.model, "MultiHeadAttention", "num_heads") == kept and min(kept) < 4
    ctx = res.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    for batch, seq in ((1, 5), (3, 11)):
        feeds = example_inputs("bert_block", batch, seq)
        assert compare_outputs(run_model(masked, feeds), run_model(res.model, feeds))["max_rel"] <= RTOL
