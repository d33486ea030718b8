"""graphprune.compare.flat_fidelity: the whole-model summary tools/bench_zoo.py reports."""
from __future__ import annotations

import numpy as np
import pytest

from graphprune.compare import flat_fidelity


def test_flat_fidelity_pools_float_outputs_and_skips_the_rest():
    a = [np.array([3.0, 0.0], np.float32), np.array([4.0], np.float64), np.array([7, 8], np.int64)]
    b = [np.array([3.0, 0.0], np.float32), np.array([0.0], np.float64), np.array([1, 2], np.int64)]
    rel, cos = flat_fidelity(a, b)
    assert rel == pytest.approx(4.0 / 5.0)          # |(0,0,4)| / |(3,0,4)|; integers not counted
    assert cos == pytest.approx(3.0 * 3.0 / (5.0 * 3.0))


def test_flat_fidelity_edge_cases():
    assert all(np.isnan(v) for v in flat_fidelity([np.array([1, 2])], [np.array([1, 2])]))
    with pytest.raises(ValueError, match="shape changed"):
        flat_fidelity([np.zeros((2, 3))], [np.zeros((3, 2))])
    rel, cos = flat_fidelity([np.ones(4)], [np.ones(4)])
    assert rel == 0.0 and cos == pytest.approx(1.0)
