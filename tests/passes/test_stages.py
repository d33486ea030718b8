"""Each early pass on its own: normalize, analyze, score, rewrite, cleanup (run through a PassManager made of
just the passes under test, on small ONNX-text graphs), so a failure names the stage that broke."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import make_model
from graphprune.api import _context
from graphprune.errors import BadInputError
from graphprune.options import PruneOptions
from graphprune.passes import (AllocatePass, AnalyzePass, DeadNodeCleanupPass, NormalizePass, RewritePass,
                               ScorePass)
from graphprune.pipeline import PassManager
from graphprune.runtime import run_model

# conv -> relu -> conv -> relu -> conv, the middle width (16, 8) prunable; the last conv's output is pinned
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
  ra = Relu (a)
  b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
  rb = Relu (b)
  y = Conv (rb, w3)
}
"""
CHAIN_W = {"w1": (16, 3, 3, 3), "b1": (16,), "w2": (8, 16, 3, 3), "b2": (8,), "w3": (4, 8, 1, 1)}


def _run(model, passes, **options):
    """Run just `passes` with the options prune() would hand them (validated by PruneOptions)."""
    opts = PruneOptions.from_kwargs(**options).context_options() if options else {}
    ctx = _context(model, None, opts, False)
    PassManager(passes).run(ctx)
    return ctx


def _feeds(rng, batch=2):
    return {"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)}


# ------------------------------------------------------------------------------------------- normalize

def test_normalize_folds_constant_subgraph_into_a_weight():
    # the second conv's weight is computed from constants (Mul of two initializers): after normalize it is an
    # initializer, so analysis sees a weight, and the function is unchanged
    text = CHAIN.replace("b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)",
                         "w2s = Mul (w2, two)\n  b = Conv <pads = [1, 1, 1, 1]> (ra, w2s, b2)")
    weights = dict(CHAIN_W, two=np.array(2.0, np.float32))
    model = make_model(text, weights)
    ctx = _run(model, [NormalizePass()])
    assert "Mul" not in [n.op for n in ctx.model.graph.nodes]
    assert ctx.report["passes"]["normalize"]["folded"] >= 1
    out = ctx.model.to_proto()
    rng = np.random.default_rng(0)
    feeds = _feeds(rng)
    np.testing.assert_allclose(run_model(out, feeds)[0], run_model(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_normalize_leaves_a_plain_graph_alone():
    model = make_model(CHAIN, CHAIN_W)
    ctx = _run(model, [NormalizePass()])
    assert [n.op for n in ctx.model.graph.nodes] == ["Conv", "Relu", "Conv", "Relu", "Conv"]
    assert ctx.report["passes"]["normalize"] == {"folded": 0, "unshared": 0}


# --------------------------------------------------------------------------------------------- analyze

def test_analyze_finds_the_two_hidden_widths_and_pins_the_output():
    ctx = _run(make_model(CHAIN, CHAIN_W), [NormalizePass(), AnalyzePass()])
    assert sorted(g.size for g in ctx.groups) == [8, 16]
    assert any("output" in p.reason for p in ctx.dependency.pinned)
    for g in ctx.groups:
        assert g.nodes, "each group names the nodes it touches"


def test_analyze_protect_removes_a_group_and_rejects_unknown_names():
    proto = make_model(CHAIN, CHAIN_W)
    for i, n in enumerate(proto.graph.node):
        n.name = f"n{i}"
    ctx = _run(proto, [NormalizePass(), AnalyzePass()], protect=["n0"])
    assert len(ctx.protected) == 1
    with pytest.raises(BadInputError, match="no node named"):
        _run(proto, [NormalizePass(), AnalyzePass()], protect=["nope*"])


# ----------------------------------------------------------------------------------------------- score

def test_score_l1_ranks_a_planted_small_channel_lowest():
    w1 = np.random.default_rng(1).standard_normal((16, 3, 3, 3)).astype(np.float32)
    w1[5] *= 1e-3
    ctx = _run(make_model(CHAIN, dict(CHAIN_W, w1=w1)), [NormalizePass(), AnalyzePass(), ScorePass()],
               criterion="l1")
    g16 = next(g for g in ctx.groups if g.size == 16)
    assert int(np.argmin(ctx.scores[g16.id])) == 5
    assert all(s.shape == (g.size,) for g, s in ((g, ctx.scores[g.id]) for g in ctx.groups))


def test_score_rejects_a_criterion_that_returns_the_wrong_length():
    import graphprune

    graphprune.register_criterion("wrong_length_for_test", lambda group, sctx: np.ones(group.size + 1))
    with pytest.raises(Exception, match="returned"):
        _run(make_model(CHAIN, CHAIN_W), [NormalizePass(), AnalyzePass(), ScorePass()],
             criterion="wrong_length_for_test")


# --------------------------------------------------------------------------------------- rewrite, cleanup

def test_rewrite_slices_weights_to_the_plan_and_keeps_the_masked_function():
    from graphprune.verify import check_mask_equivalence

    model = make_model(CHAIN, CHAIN_W)
    ctx = _run(model, [NormalizePass(), AnalyzePass(), ScorePass(), AllocatePass(), RewritePass()],
               target_flops=0.5, round_to=1, criterion="l1")
    kept = {g.size - len(ctx.plan.removed.get(g.id, ())) for g in ctx.groups}
    convs = [n for n in ctx.model.graph.nodes if n.op == "Conv"]
    widths = {convs[0].inputs[1].values.shape[0], convs[1].inputs[1].values.shape[0]}
    assert widths == kept and max(widths) < 16, (widths, kept)
    assert convs[1].inputs[1].values.shape[1] == convs[0].inputs[1].values.shape[0]  # consumer columns follow
    pruned = ctx.model.to_proto()
    res = check_mask_equivalence(ctx.original, pruned, ctx.dependency, ctx.plan, ctx.groups)
    assert res["equivalent"], res
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # batch stays dynamic


def test_cleanup_removes_dead_nodes_but_keeps_graph_inputs():
    text = CHAIN.replace("y = Conv (rb, w3)", "y = Conv (rb, w3)\n  unused = Relu (ra)")
    model = make_model(text, CHAIN_W)
    ctx = _run(model, [DeadNodeCleanupPass()])
    ops = [n.op for n in ctx.model.graph.nodes]
    assert ops.count("Relu") == 2 and len(ops) == 5  # the unused Relu is gone
    assert [i.name for i in ctx.model.graph.inputs] == ["x"]
    onnx.checker.check_model(ctx.model.to_proto(), full_check=True)


@pytest.mark.parametrize("height", [8, 1 << 24])
def test_analysis_does_not_allocate_per_element_of_axes_it_does_not_prune(height):
    """A declared image height of 2^24 (a 6 KB model) used to take minutes and 16 GB: the element space
    now holds channel-carrying axes only, so its size does not depend on spatial sizes."""
    text = CHAIN.replace("float[N, 3, 8, 8] x", f"float[N, 3, {height}, 8] x").replace(
        "float[N, 4, 8, 8] y", f"float[N, 4, {height}, 8] y")
    ctx = _run(make_model(text, CHAIN_W), [NormalizePass(), AnalyzePass()])
    assert sorted(g.size for g in ctx.groups) == [8, 16]
    assert ctx.dependency.labels.size < 200, ctx.dependency.labels.size  # weights' axes + one per other axis
