"""Heads of torch.nn.MultiheadAttention exports, where they are folded into the batch axis.

nn.MultiheadAttention reshapes q/k/v to [S, B*H, D] (heads merged into the dynamic batch
axis) before attention. The Reshape rule models such an axis as H static units repeated over
the dynamic factor, so whole heads (D rows each of q, k and v in in_proj, D columns of
out_proj) are prunable and the run-time B*H shape entries become B*H'. Both exporters, both
layouts (batch_first), and the need_weights=True path (bmm/Softmax over [B*H, S, D]).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.runtime import run_model
from graphprune.verify import compare_outputs, masked_model

pytest.importorskip("torch")
from models.mha import EXAMPLE_SEQ, export_mha_onnx  # noqa: E402

E, H, D = 64, 4, 16
# (dynamo, batch_first, need_weights, padding_mask): the TorchScript exporter bakes the example sequence
# length into k/v's reshape, so its exports here have a static sequence axis (as ViT has)
CASES = {
    "dynamo": (True, True, False, False),
    "dynamo-bmm": (True, True, True, False),
    "dynamo-padding-mask-seq-first": (True, False, False, True),
    "torchscript": (False, True, False, False),
    "torchscript-seq-first": (False, False, False, False),
    "torchscript-bmm": (False, True, True, False),
    "torchscript-padding-mask": (False, True, True, True),
}


@pytest.fixture(scope="module")
def mha_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mha")
    cache = {}

    def get(case, dynamic_seq=None):
        dynamo, batch_first, need_weights, padding_mask = CASES[case]
        dynamic_seq = dynamo if dynamic_seq is None else dynamic_seq
        key = (case, dynamic_seq)
        if key not in cache:
            cache[key] = export_mha_onnx(tmp / f"{case}_{int(dynamic_seq)}.onnx", dynamo=dynamo,
                                         batch_first=batch_first, need_weights=need_weights,
                                         padding_mask=padding_mask, dynamic_seq=dynamic_seq)
        return cache[key]

    return get


def _shapes(case):
    return [(1, 5), (3, 11)] if CASES[case][0] else [(1, EXAMPLE_SEQ), (3, EXAMPLE_SEQ)]


def _check(result, shapes) -> float:
    """Checker with full shape inference, dynamic axes, oracle at each (batch, seq)."""
    model = result.model
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True),
                             full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    rng = np.random.default_rng(0)
    errs = []
    for batch, seq in shapes:
        feeds = {"input": rng.standard_normal((batch, seq, E)).astype(np.float32)}
        if len(model.graph.input) > 1:  # key_padding_mask: the last two tokens of sample 0 are padding
            mask = np.zeros((batch, seq), bool)
            mask[0, -2:] = True
            feeds["mask"] = mask
        want, got = run_model(masked, feeds), run_model(model, feeds)
        cmp = compare_outputs(want, got)
        assert cmp["max_rel"] < 1e-4, (batch, seq, cmp)
        assert got[0].shape == (batch, 10)
        errs.append(cmp["max_rel"])
    return max(errs)


def _kept_heads(model: onnx.ModelProto) -> int:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w_out, b_in = inits["attn.out_proj.weight"], inits["attn.in_proj_bias"]
    assert w_out.shape[1] % D == 0 and b_in.shape[0] == 3 * w_out.shape[1]  # whole heads, q/k/v alike
    w_in = [v for v in inits.values() if v.ndim == 2 and v.shape[0] == E and v.shape[1] == b_in.shape[0]]
    assert len(w_in) == 1  # in_proj lost the same rows as its bias
    return w_out.shape[1] // D


@pytest.mark.parametrize("case", list(CASES))
def test_heads_found(mha_path, case):
    res = graphprune.analyze(mha_path(case))
    heads = [g for g in res.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == H and heads[0].width == 3 * D
    tensors = {m.tensor for m in heads[0].members if m.is_weight}
    assert {"attn.out_proj.weight", "attn.in_proj_bias"} <= tensors


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_prune_heads(mha_path, case, target):
    result = graphprune.prune(mha_path(case), target_flops=target, round_to=1)
    report = result.report
    assert target - 0.02 <= report["macs_ratio"] <= target + 1e-9
    assert any(g["kind"] == "heads" for g in report["groups"])
    _check(result, _shapes(case))
    kept = _kept_heads(result.model)
    if target == 0.5:
        assert kept < H  # half the MACs are not reached through the MLP alone here


@pytest.mark.parametrize("case", ["dynamo", "torchscript-bmm"])
def test_heads_only(mha_path, case):
    """With the MLP protected, the target is met by removing whole heads."""
    path = mha_path(case)
    mlp = [g for g in graphprune.analyze(path).groups if g.kind == "channels"]
    assert len(mlp) == 1
    result = graphprune.prune(path, target_flops=0.8, round_to=1, protect=list(mlp[0].nodes))
    assert 0 < _kept_heads(result.model) < H
    _check(result, _shapes(case))


def test_torchscript_seq_baked_in(mha_path):
    """A dynamic-seq TorchScript export has [S, B, E] -> [7, B*4, D] for k and v (the example
    length traced as a constant): the graph runs only with S = 7, so the reshape binds S to 7
    (that axis is pinned, with the reason) and the heads are still found and pruned."""
    path = mha_path("torchscript", dynamic_seq=True)
    res = graphprune.analyze(path)
    heads = [g for g in res.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == H
    reasons = set(res.context.dependency.dim_pin.values())
    assert any(f"fixes seq to {EXAMPLE_SEQ}" in r for r in reasons)
    result = graphprune.prune(path, target_flops=0.5, round_to=1)
    assert 0.48 <= result.report["macs_ratio"] <= 0.5 + 1e-9
    assert _kept_heads(result.model) < H
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param  # still declared dynamic, as in the export
    _check(result, [(1, EXAMPLE_SEQ), (3, EXAMPLE_SEQ)])  # the export itself runs at length 7 only


def _folded_graph(perm: list[int]) -> onnx.ModelProto:
    """x [batch, 5, 64] -> q = x Wq -> [batch, 5, 4, 16] -> Transpose(perm) -> merged into
    [-1, 5, 16] (constant shapes) -> attention of q with itself -> split back -> [batch, 5, 64]
    -> Wo -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inv = [perm.index(k) for k in range(4)]
    back = [[-1, 5, 4, 16][p] for p in perm]  # the transposed 4-D shape, batch inferred
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wq"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wo"),
             numpy_helper.from_array(np.array([0, 5, 4, 16], np.int64), "s4"),
             numpy_helper.from_array(np.array([-1, 5, 16], np.int64), "s3"),
             numpy_helper.from_array(np.array(back, np.int64), "sb"),
             numpy_helper.from_array(np.array([0, 5, 64], np.int64), "s2")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("Reshape", ["q", "s4"], ["q4"]),
             helper.make_node("Transpose", ["q4"], ["qt"], perm=perm),
             helper.make_node("Reshape", ["qt", "s3"], ["m"]),
             helper.make_node("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["m", "mt"], ["sc"]),
             helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "m"], ["r"]),
             helper.make_node("Reshape", ["r", "sb"], ["rb"]),
             helper.make_node("Transpose", ["rb"], ["rt"], perm=inv),
             helper.make_node("Reshape", ["rt", "s2"], ["h"]),
             helper.make_node("MatMul", ["h", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "folded",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_folded_batch_major_constant_shapes():
    """[batch, 4, 5, 16] -> [-1, 5, 16] (batch major): heads found; the constant [-1, 4, 5, 16]
    becomes [-1, H', 5, 16] and -1 keeps inferring batch*H'."""
    model = _folded_graph([0, 2, 1, 3])
    res = graphprune.analyze(model)
    heads = [g for g in res.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 4
    result = graphprune.prune(model, target_flops=0.6, round_to=1)
    assert result.report["macs_ratio"] <= 0.6  # heads are the only group: a head is 1/4 of the MACs
    kept = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert kept["wq"][1] in (16, 32, 48) and kept["wo"][0] == kept["wq"][1]
    back = next(n for n in result.model.graph.node if n.output[0] == "rb")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[back.input[1]].tolist() == [-1, kept["wq"][1] // 16, 5, 16]
    rng = np.random.default_rng(0)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(result.model, strict_mode=True), full_check=True)
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    for batch in (1, 3):
        feeds = {"x": rng.standard_normal((batch, 5, 64)).astype(np.float32)}
        assert compare_outputs(run_model(masked, feeds), run_model(result.model, feeds))["max_rel"] < 1e-4


def test_folded_heads_major_pins():
    """[4, batch, 5, 16] -> [-1, 5, 16] merges heads as the *major* part: not a folded axis of
    heads over batch; the heads are pinned, with the reason."""
    res = graphprune.analyze(_folded_graph([2, 0, 1, 3]))
    assert not [g for g in res.groups if g.kind == "heads"]
    dg = res.context.dependency
    why = {dg.dims[d].tensor: r for d, r in dg.dim_pin.items() if dg.dims[d].axis == 0}
    assert "major part" in why["qt"]  # the [4, batch, ...] head axis
