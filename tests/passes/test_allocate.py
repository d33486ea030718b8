"""The allocator's width grid: with --round-to, kept widths are whole blocks or the full size."""
from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.passes.allocate import width_grid

from _fixtures import resnet_onnx  # noqa: F401  (fixture)


@pytest.mark.parametrize("size, round_to, unit, expected", [
    (64, 8, 1, [64, 56, 48, 40, 32, 24, 16, 8]),
    (20, 8, 1, [20, 16, 8]),            # not a multiple: the first block takes the remainder
    (8, 8, 1, [8]),                     # one block: keep it whole, never 5-7 channels
    (5, 8, 1, [5, 4, 3, 2, 1]),         # narrower than one block: channel granularity
    (12, 8, 64, list(range(12, 1, -1))),  # heads of 64 channels: every head count is a multiple of 8
    (12, 8, 4, [12, 10, 8, 6, 4, 2]),   # units of 4 channels: two units make a block
    (64, 1, 1, list(range(64, 6, -1))),  # no rounding: min-keep 0.1 floor of 7
])
def test_width_grid(size, round_to, unit, expected):
    assert width_grid(size, round_to, 0.1, unit) == expected


@pytest.mark.parametrize("uniform", [False, True])
def test_round_to_keeps_whole_blocks(resnet_onnx, uniform):  # noqa: F811
    result = graphprune.prune(str(resnet_onnx), 0.5, round_to=8, uniform=uniform, verify=False)
    groups = result.report["groups"]
    pruned = [g for g in groups if g["kept"] < g["channels"]]
    assert pruned, "nothing was pruned"
    for g in groups:
        unit = g["width"] if g["kind"] == "heads" else 1
        assert g["kept"] in width_grid(g["channels"], 8, 0.1, unit), g
        if g["kept"] < g["channels"] and g["channels"] >= 8:
            assert g["kept"] % 8 == 0, g
    assert result.report["macs_ratio"] <= 0.5 + 1e-9
    assert np.isfinite(result.report["macs_ratio"])


def _one_group_model():
    """Conv 16->64 -> Relu -> Conv 64->8 (graph output): one prunable group of 64 channels,
    each 1/64 of the MACs, so blocks of 8 move the ratio in steps of 0.125."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 16, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 64, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_coarse_blocks_land_with_part_of_a_block():
    # 0.45 needs 36 of 64 channels gone; whole blocks of 8 would take 40 (0.375)
    result = graphprune.prune(_one_group_model(), 0.45, round_to=8, verify=True)
    assert 0.43 - 1e-9 <= result.report["macs_ratio"] <= 0.45 + 1e-9
    assert result.report["oracle"]["equivalent"]
    assert any("off the multiple-of-8 grid" in w for w in result.report.get("warnings", []))
    # on the grid when the grid lands: 0.5 is exactly 4 blocks
    on_grid = graphprune.prune(_one_group_model(), 0.5, round_to=8)
    assert on_grid.report["groups"][0]["kept"] == 32
