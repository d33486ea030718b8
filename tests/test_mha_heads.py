"""Heads of torch.nn.MultiheadAttention exports, where they are folded into the batch axis.

nn.MultiheadAttention reshapes q/k/v to [S, B*H, D] (heads merged into the dynamic batch
axis) before attention. The Reshape rule models such an axis as H static units repeated over
the dynamic factor, so whole heads (D rows each of q, k and v in in_proj, D columns of
out_proj) are prunable and the run-time B*H shape entries become B*H'.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.runtime import run_model
from graphprune.verify import compare_outputs, masked_model

pytest.importorskip("torch")
from models.mha import export_mha_onnx  # noqa: E402

E, H, D = 64, 4, 16


@pytest.fixture(scope="module")
def mha_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mha")
    cache = {}

    def get(dynamo, batch_first):
        key = (dynamo, batch_first)
        if key not in cache:
            cache[key] = export_mha_onnx(tmp / f"mha_{int(dynamo)}_{int(batch_first)}.onnx",
                                         dynamo=dynamo, batch_first=batch_first)
        return cache[key]

    return get


def _in_proj(model: onnx.ModelProto):
    """(in_proj weight [E, 3E'] as numpy, out_proj weight) of the pruned model."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w_in = [v for v in inits.values() if v.ndim == 2 and v.shape[0] == E and v.shape[1] % 3 == 0
            and v.shape[1] != 3 * E // 2 and v.shape[1] <= 3 * E and v.shape[1] >= 3 * D]
    w_out = inits["attn.out_proj.weight"]
    return w_in, w_out


def _check(result, shapes):
    model = result.model
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True),
                             full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param  # batch and seq stay dynamic
    ctx = result.context
    masked = masked_model(ctx.original, ctx.dependency, ctx.plan.removed_labels(ctx.groups))
    rng = np.random.default_rng(0)
    errs = []
    for batch, seq in shapes:
        feeds = {"input": rng.standard_normal((batch, seq, E)).astype(np.float32)}
        want, got = run_model(masked, feeds), run_model(model, feeds)
        cmp = compare_outputs(want, got)
        assert cmp["max_rel"] < 1e-4, (batch, seq, cmp)
        assert got[0].shape == (batch, 10)
        errs.append(cmp["max_rel"])
    return max(errs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_dynamo_heads_found(mha_path, batch_first):
    res = graphprune.analyze(mha_path(True, batch_first))
    heads = [g for g in res.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == H and heads[0].width == 3 * D
    tensors = {m.tensor for m in heads[0].members if m.is_weight}
    assert "attn.out_proj.weight" in tensors and "attn.in_proj_bias" in tensors


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("batch_first", [True, False])
def test_dynamo_prune_heads(mha_path, batch_first, target):
    path = mha_path(True, batch_first)
    policy_removed = 0
    result = graphprune.prune(path, target_flops=target, round_to=1)
    report = result.report
    assert target - 0.02 <= report["macs_ratio"] <= target + 1e-9
    assert any(g["kind"] == "heads" for g in report["groups"])
    _check(result, [(1, 5), (3, 11)])
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    w_out = inits["attn.out_proj.weight"]
    b_in = inits["attn.in_proj_bias"]
    assert w_out.shape[1] % D == 0 and b_in.shape[0] == 3 * w_out.shape[1]  # whole heads, q/k/v alike
    policy_removed = H - w_out.shape[1] // D
    if target == 0.5:
        assert policy_removed >= 1  # half the MACs cannot be reached without attention heads


def test_dynamo_forced_heads(mha_path):
    """Heads go first when they are the only thing allowed to shrink (MLP protected)."""
    path = mha_path(True, True)
    mlp = [g for g in graphprune.analyze(path).groups if g.kind == "channels"]
    assert len(mlp) == 1
    result = graphprune.prune(path, target_flops=0.8, round_to=1, protect=list(mlp[0].nodes))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    kept = inits["attn.out_proj.weight"].shape[1] // D
    assert kept < H and inits["attn.in_proj_bias"].shape[0] == 3 * kept * D
    _check(result, [(1, 5), (3, 11)])


def test_torchscript_seq_baked_in_pins_with_reason(mha_path):
    """The TorchScript export bakes the example sequence length into k/v's [S, B*H, D] reshape
    (k.view(k.shape[0], ...) is traced as a constant): the heads stay, with a precise reason."""
    path = mha_path(False, True)
    res = graphprune.analyze(path)
    assert not [g for g in res.groups if g.kind == "heads"]
    reasons = " ".join(p.reason for p in res.pinned)
    assert "dynamic factors do not line up" in reasons and "batch*4" in reasons
    result = graphprune.prune(path, target_flops=0.7, round_to=1)
    assert 0.68 <= result.report["macs_ratio"] <= 0.7 + 1e-9
    _check(result, [(1, 7), (3, 7)])  # the export itself only runs at its example length 7
