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
