"""Comparing two models' outputs: the one home of the oracle's error measure (max abs / max rel)."""
from __future__ import annotations

import numpy as np

__all__ = ["compare_outputs"]


def compare_outputs(a: list, b: list) -> dict:
    worst_abs, worst_rel = 0.0, 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "shape_mismatch": [list(x.shape), list(y.shape)]}
        diff = np.abs(x - y)
        worst_abs = max(worst_abs, float(diff.max(initial=0)))
        worst_rel = max(worst_rel, float(diff.max(initial=0) / (np.abs(x).max(initial=0) + 1e-12)))
    return {"max_abs": worst_abs, "max_rel": worst_rel}
