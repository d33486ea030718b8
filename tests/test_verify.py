"""The oracle's float32 noise floor explains ill-conditioned graphs but never hides a wrong rewrite."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import graphprune
from graphprune.verify import check_mask_equivalence

from test_allocate import _one_group_model


def _check(result, pruned: onnx.ModelProto) -> dict:
    ctx = result.context
    return check_mask_equivalence(ctx.original, pruned, ctx.dependency, ctx.plan, ctx.groups)


def test_exact_rewrite_needs_no_noise_floor():
    result = graphprune.prune(_one_group_model(), 0.5, round_to=8)
    oracle = _check(result, result.model)
    assert oracle["equivalent"]
    assert all("noise_floor" not in v for k, v in oracle.items() if k.startswith("batch"))


def test_wrong_rewrite_fails_despite_the_noise_floor():
    result = graphprune.prune(_one_group_model(), 0.5, round_to=8)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    w = next(t for t in broken.graph.initializer if t.name == "w2")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] += 1e-2  # a small error: far above float32 noise, which is ~0 on this graph
    w.CopyFrom(numpy_helper.from_array(arr, "w2"))
    oracle = _check(result, broken)
    assert not oracle["equivalent"]
    for k, v in oracle.items():
        if k.startswith("batch"):
            assert v["max_rel"] > 1e-4 and v["within_noise"] is False
            assert np.isfinite(v["noise_floor"]) and v["noise_floor"] < 1e-5
