"""Comparing two models' outputs: the one home of the oracle's error measure (max abs / max rel).

NaN is never agreement: a NaN (or an infinity that the other side does not match exactly) at any
position makes the error infinite, and the count of such positions is reported. Python's max()
would silently drop a NaN (``max(0.0, nan) == 0.0``), so errors are combined with numpy here.
Outputs that are not numbers (strings) agree only when equal.
"""
from __future__ import annotations

import numpy as np

__all__ = ["flat_fidelity", "compare_outputs", "nonfinite_outputs"]


def _numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "biufc"


def compare_outputs(a: list, b: list) -> dict:
    """{"max_abs", "max_rel"} over every pair of outputs; "nonfinite": positions where the two differ
    by a NaN or an unmatched infinity (then both errors are inf); "shape_mismatch" when shapes differ."""
    worst_abs, worst_rel, nonfinite = 0.0, 0.0, 0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "shape_mismatch": [list(x.shape), list(y.shape)]}
        if not (_numeric(x) and _numeric(y)):  # strings: exact agreement or none
            if not np.array_equal(x, y):
                worst_abs = worst_rel = float("inf")
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        finite = np.isfinite(x) & np.isfinite(y)
        same_inf = np.isinf(x) & (x == y)
        bad = int(np.count_nonzero(~finite & ~same_inf))
        if bad:
            nonfinite += bad
            worst_abs = worst_rel = float("inf")
            continue
        diff = np.abs(np.where(finite, x - y, 0.0))
        scale = np.abs(np.where(finite, x, 0.0)).max(initial=0)
        worst_abs = float(np.fmax(worst_abs, diff.max(initial=0)))
        worst_rel = float(np.fmax(worst_rel, diff.max(initial=0) / (scale + 1e-12)))
    out = {"max_abs": worst_abs, "max_rel": worst_rel}
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def flat_fidelity(a: list, b: list) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of all float outputs of `b` against `a`, flattened
    together into one vector each (a whole-model summary; per-output, per-sample metrics are
    graphprune.fidelity's). NaN, NaN when no output is floating point; ValueError on a shape change."""
    xs, ys = [], []
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if not np.issubdtype(x.dtype, np.floating):
            continue
        if x.shape != y.shape:
            raise ValueError(f"output shape changed: {list(x.shape)} -> {list(y.shape)}")
        xs.append(x.astype(np.float64).ravel())
        ys.append(y.astype(np.float64).ravel())
    if not xs:
        return float("nan"), float("nan")
    x, y = np.concatenate(xs), np.concatenate(ys)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    rel = float(np.linalg.norm(x - y) / (nx + 1e-30))
    cos = float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else float("nan")
    return rel, cos


def nonfinite_outputs(names: list, arrays: list) -> list[str]:
    """`name (k NaN, j Inf)` for each numeric output holding NaN or Inf."""
    out = []
    for name, a in zip(names, arrays):
        a = np.asarray(a)
        if not _numeric(a) or a.dtype.kind in "biu":
            continue
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            out.append(f"{name} ({nan} NaN, {inf} Inf)")
    return out
