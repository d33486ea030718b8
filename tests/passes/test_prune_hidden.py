"""Hidden (residual stream) width pruning: --prune-hidden / prune_hidden=True; and --head-dim.

The hidden width is one group through every residual Add, LayerNorm/RMSNorm (op or
decomposed), embedding and projection. Removing hidden channels changes normalisation
statistics (mean/variance over D' channels instead of D), so the oracle runs the ops that
take statistics over a pruned axis on the kept channels only; the pruned model must equal
that masked reference to float tolerance, while plain zeroing must not.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import graphprune
from graphprune.runtime import run_model, synthetic_inputs
from graphprune.verify import compare_outputs, masked_model

RTOL = 1e-4


# --------------------------------------------------------------------------- inline models


def _norm_block(opset: int, norm: str) -> onnx.ModelProto:
    """x[N,S,16] -> proj to hidden 32 -> norm -> MLP + residual -> norm -> mean over S -> head[N,4].

    `norm` is "decomposed" (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, as older exporters
    write LayerNorm), "rms_decomposed" (Pow/ReduceMean/Add/Sqrt/Div), "layernorm" or "rmsnorm"
    (the ops; RMSNormalization needs opset 23).
    """
    rng = np.random.default_rng(7)
    d, inner = 32, 64
    inits = {
        "w_in": rng.standard_normal((16, d)) / 4, "b_in": rng.standard_normal(d) * 0.3,
        "w1": rng.standard_normal((d, inner)) / np.sqrt(d), "w2": rng.standard_normal((inner, d)) / 8,
        "w_out": rng.standard_normal((d, 4)) / np.sqrt(d), "two": np.array(2.0), "eps": np.array(1e-5),
    }
    for i in (1, 2):
        inits[f"g{i}"] = rng.uniform(0.5, 1.5, d)
        inits[f"b{i}"] = rng.uniform(-0.3, 0.3, d)
    nodes = [oh.make_node("MatMul", ["x", "w_in"], ["p"]), oh.make_node("Add", ["p", "b_in"], ["h"])]

    def reduce_mean(src, dst, axes):
        if opset >= 18:
            name = f"axes_{dst}"
            inits[name] = np.array(axes, np.int64)
            return oh.make_node("ReduceMean", [src, name], [dst], keepdims=1)
        return oh.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=1)

    def norm_op(src, dst, i):
        if norm == "layernorm":
            return [oh.make_node("LayerNormalization", [src, f"g{i}", f"b{i}"], [dst], axis=-1, epsilon=1e-5)]
        if norm == "rmsnorm":
            return [oh.make_node("RMSNormalization", [src, f"g{i}"], [dst], axis=-1, epsilon=1e-5)]
        ns = []
        c = src
        if norm == "decomposed":
            ns += [reduce_mean(src, f"{dst}_mu", [-1]), oh.make_node("Sub", [src, f"{dst}_mu"], [f"{dst}_c"])]
            c = f"{dst}_c"
        ns += [oh.make_node("Pow", [c, "two"], [f"{dst}_sq"]), reduce_mean(f"{dst}_sq", f"{dst}_var", [-1]),
               oh.make_node("Add", [f"{dst}_var", "eps"], [f"{dst}_ve"]),
               oh.make_node("Sqrt", [f"{dst}_ve"], [f"{dst}_sd"]),
               oh.make_node("Div", [c, f"{dst}_sd"], [f"{dst}_n"]),
               oh.make_node("Mul", [f"{dst}_n", f"g{i}"], [f"{dst}_s"]),
               oh.make_node("Add", [f"{dst}_s", f"b{i}"], [dst])]
        return ns

    nodes += norm_op("h", "n1", 1)
    nodes += [oh.make_node("MatMul", ["n1", "w1"], ["f1"]), oh.make_node("Relu", ["f1"], ["a1"]),
              oh.make_node("MatMul", ["a1", "w2"], ["f2"]), oh.make_node("Add", ["n1", "f2"], ["r"])]
    nodes += norm_op("r", "n2", 2)
    nodes += [reduce_mean("n2", "pooled3", [1]),
              oh.make_node("Squeeze", ["pooled3", "sq_axes"], ["pooled"]),
              oh.make_node("MatMul", ["pooled", "w_out"], ["y"])]
    inits["sq_axes"] = np.array([1], np.int64)
    graph = oh.make_graph(
        nodes, "norm_block",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "S", 16])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        [onh.from_array(np.asarray(v, np.int64 if k.startswith(("axes", "sq")) else np.float32), k)
         for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 23 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model, shapes=((1, 5), (3, 11))):
    return [synthetic_inputs(model, batch=b, seq=s, seed=b * 100 + s) for b, s in shapes]


def _oracle_error(result, feeds_list) -> float:
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    worst = 0.0
    for feeds in feeds_list:
        got = run_model(result.model, feeds)
        worst = max(worst, compare_outputs(run_model(masked, feeds), got)["max_rel"])
        assert got[0].shape[0] == next(iter(feeds.values())).shape[0]
    return worst


def _zeroing_only_error(result, feeds_list) -> float:
    """The old oracle (zero the removed channels, keep every statistic over D)."""
    ctx = result.context
    saved = ctx.dependency.stat_axes
    ctx.dependency.stat_axes = {}
    try:
        return _oracle_error(result, feeds_list)
    finally:
        ctx.dependency.stat_axes = saved


def _norm_widths(model: onnx.ModelProto) -> set[int]:
    """Widths of the axes normalisation statistics run over: LayerNorm/RMSNorm scales and the
    last axis fed to a ReduceMean over axis -1."""
    inferred = onnx.shape_inference.infer_shapes(model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    widths = set()
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "RMSNormalization"):
            widths.add(inits[node.input[1]][-1])
        elif node.op_type == "ReduceMean":
            axes = [a.ints for a in node.attribute if a.name == "axes"]
            axes = list(axes[0]) if axes else (onh.to_array(next(i for i in model.graph.initializer
                                                                 if i.name == node.input[1])).tolist()
                                               if len(node.input) > 1 else [])
            if axes == [-1] and node.input[0] in shapes:
                widths.add(shapes[node.input[0]][-1])
    return widths


@pytest.mark.parametrize("norm,opset", [("decomposed", 17), ("rms_decomposed", 18), ("layernorm", 17),
                                        ("rmsnorm", 23), ("layernorm", 23)])
def test_inline_norms_exact_oracle(norm, opset):
    model = _norm_block(opset, norm)
    default = graphprune.analyze(model)
    assert any("--prune-hidden" in p.reason for p in default.pinned), "hidden pinned by default, with a reason"
    result = graphprune.prune(model, target_flops=0.6, round_to=1, prune_hidden=True, verify=True)
    onnx.checker.check_model(result.model, full_check=True)
    hidden = result.report["hidden"]
    assert len(hidden) == 1 and hidden[0]["before"] == 32 and hidden[0]["after"] < 32
    assert _norm_widths(result.model) == {hidden[0]["after"]}
    assert 0.58 <= result.report["macs_ratio"] <= 0.6 + 1e-9
    feeds = _feeds(model)
    assert _oracle_error(result, feeds) < RTOL
    assert result.report["oracle"]["equivalent"]
    # the reference is not vacuous: zeroing alone keeps D-channel statistics and disagrees
    assert _zeroing_only_error(result, feeds) > 100 * RTOL
    fid = result.report["fidelity"]["pruned"]
    assert 0 < fid["rel_err"] and -1 <= fid["cosine"] < 1


# --------------------------------------------------------------------------- exported transformers

torch = pytest.importorskip("torch")
from models.transformer import build_transformer_onnx, example_inputs  # noqa: E402
from _fixtures import export_getter  # noqa: E402

EXPORTERS = {"torchscript": False, "dynamo": True}
SHAPES = [(1, 5), (3, 11)]
HIDDEN = {"bert_block": 64, "gpt2_block": 64, "llama_block": 128, "vit_block": 64}


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_getter(tmp_path_factory.mktemp("hidden"), build_transformer_onnx, EXPORTERS)


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", list(HIDDEN))
def test_prune_hidden_transformer(onnx_path, name, exporter, target):
    path = onnx_path(name, exporter)
    result = graphprune.prune(path, target_flops=target, round_to=1, prune_hidden=True, fidelity=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert target - 0.02 <= result.report["macs_ratio"] <= target + 1e-9
    hidden = result.report["hidden"]
    assert len(hidden) == 1 and hidden[0]["before"] == HIDDEN[name] and hidden[0]["after"] < HIDDEN[name]
    assert _norm_widths(result.model) == {hidden[0]["after"]}, "every norm runs over the pruned width"
    for vi in list(result.model.graph.input) + list(result.model.graph.output):  # batch stays dynamic
        dim0 = vi.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), vi.name
    feeds = [example_inputs(name, b, s) for b, s in SHAPES]
    assert _oracle_error(result, feeds) < RTOL


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "hf_vit"])
def test_prune_hidden_hf(onnx_path, name):
    pytest.importorskip("transformers")
    path = onnx_path(name, "dynamo")
    result = graphprune.prune(path, target_flops=0.6, round_to=1, prune_hidden=True, fidelity=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert 0.58 <= result.report["macs_ratio"] <= 0.6 + 1e-9
    h = result.report["hidden"]
    assert len(h) == 1 and h[0]["after"] < h[0]["before"]
    assert _oracle_error(result, [example_inputs(name, b, s) for b, s in SHAPES]) < RTOL


def test_graph_output_pins_hidden(onnx_path):
    """hf_bert returns last_hidden_state [b, s, hidden]: the hidden width stays, with the reason."""
    pytest.importorskip("transformers")
    path = onnx_path("hf_bert", "torchscript")
    analysis = graphprune.analyze(path, prune_hidden=True)
    reasons = {p.reason for p in analysis.pinned if p.count == 64}
    assert any("reaches graph output" in r for r in reasons)
    assert not [g for g in analysis.groups if g.size == 64 and g.kind == "channels"]
    result = graphprune.prune(path, target_flops=0.7, round_to=1, prune_hidden=True, fidelity=False)
    assert result.report["hidden"] == [] and "reaches graph output" in result.report["hidden_pinned"]


def test_hidden_pinned_by_default(onnx_path):
    analysis = graphprune.analyze(onnx_path("llama_block", "dynamo"))
    assert not [g for g in analysis.groups if g.size == 128]
    assert any("--prune-hidden" in p.reason for p in analysis.pinned)


def test_cli_prune_hidden_and_head_dim(onnx_path, tmp_path, capsys):
    from graphprune.cli import main

    path = onnx_path("bert_block", "torchscript")
    report = tmp_path / "r.json"
    out = tmp_path / "p.onnx"
    assert main([path, "--target-flops", "0.6", "--prune-hidden", "--verify", "-o", str(out),
                 "--report", str(report)]) == 0
    text = capsys.readouterr().out
    r = json.loads(report.read_text())
    h = r["hidden"][0]
    assert f"hidden  64 -> {h['after']}" in text and h["after"] < 64
    assert "fidelity" in text and r["fidelity"]["pruned"]["cosine"] < 1
    assert r["oracle"]["equivalent"]
    # --head-dim: whole heads give way to one head-dimension element across every head
    assert main(["analyze", path]) == 0
    assert "heads x 16" in capsys.readouterr().out
    assert main(["analyze", path, "--head-dim"]) == 0
    assert "heads x 16" not in capsys.readouterr().out
    assert main([path, "--target-flops", "0.6", "--head-dim", "--verify", "-o", str(out), "--report",
                 str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["oracle"]["equivalent"] and "hidden" not in r
    q = [g for g in r["groups"] if g["removed"] and g["width"] == 4]  # an element of each of the 4 heads
    assert q, "head-dimension groups pruned"


def test_fused_skip_layernorm(onnx_path, tmp_path):
    """onnxruntime.transformers' fused GPT-2 (SkipLayerNormalization, FastGelu): the hidden width
    goes through SkipLayerNormalization's input, skip, gamma, beta and outputs; the fused BERT's
    EmbedLayerNormalization has no rule, so there the hidden width stays pinned, with the reason."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    for name, kind in (("gpt2_block", "gpt2"), ("bert_block", "bert")):
        fused = optimizer.optimize_model(onnx_path(name, "torchscript"), model_type=kind, num_heads=4,
                                         hidden_size=64, opt_level=0).model
        assert any(n.op_type == "SkipLayerNormalization" for n in fused.graph.node)
        path = str(tmp_path / f"{name}.fused.onnx")
        onnx.save(fused, path)
        result = graphprune.prune(path, target_flops=0.6, round_to=1, prune_hidden=True, fidelity=False)
        assert 0.58 <= result.report["macs_ratio"] <= 0.6 + 1e-9
        feeds = [example_inputs(name, b, s) for b, s in SHAPES]
        assert _oracle_error(result, feeds) < RTOL
        if name == "gpt2_block":
            h = result.report["hidden"]
            assert len(h) == 1 and h[0]["after"] < 64
            gammas = {onh.to_array(i).shape for n in result.model.graph.node if n.op_type == "SkipLayerNormalization"
                      for i in result.model.graph.initializer if i.name == n.input[2]}
            assert gammas == {(h[0]["after"],)}
            assert _zeroing_only_error(result, feeds) > 100 * RTOL
        else:
            assert result.report["hidden"] == [] and "EmbedLayerNormalization" in result.report["hidden_pinned"]
            assert any("EmbedLayerNormalization" in p["reason"] for p in result.report["pinned"])
