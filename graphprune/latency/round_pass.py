"""The latency-aware rounding pass: after allocate, each pruned group's channel count moves to the count the
latency table says its width runs fastest at."""
from __future__ import annotations

import numpy as np

from ..pipeline import Pass, PassResult, PruneContext
from .table import _grid, LatencyTable, _MIN_KEEP, _ROUND_TO

__all__ = ["LatencyRoundPass"]


class LatencyRoundPass(Pass):
    """After `allocate`: move each pruned group's count, within `window` x its size (at least
    one round-to step), to the count that is fastest for its width (see
    :meth:`LatencyTable.preferred_count`). Which channels go still follows the scores: extra
    removals take the next-lowest, give-backs the highest."""

    name = "latency-round"
    requires = ("plan", "scores", "groups")

    def __init__(self, table: LatencyTable, window: float = 0.125, tolerance: float = 0.03):
        self.table, self.window, self.tolerance = table, float(window), float(tolerance)

    def call(self, ctx: PruneContext) -> PassResult:
        round_to = int(ctx.option("round_to", _ROUND_TO) or 1)
        min_keep = float(ctx.option("min_keep", _MIN_KEEP))
        changed = {}
        for g in ctx.groups:
            removed = ctx.plan.removed.get(g.id)
            if g.id in ctx.protected or removed is None or len(removed) == 0 or g.id not in self.table:
                continue
            n, k = g.size, g.size - len(removed)
            grid = _grid(g, round_to, min_keep)
            reach = max(max((a - b for a, b in zip(grid, grid[1:])), default=1), int(round(self.window * n)))
            allowed = [c for c in grid if abs(c - k) <= reach]
            best = self.table.preferred_count(g.id, k, allowed, self.tolerance)
            if best == k:
                continue
            scores = ctx.scores[g.id]
            rm = sorted((int(i) for i in removed), key=lambda i: (scores[i], i))
            if best < k:
                taken = set(rm)
                extra = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in taken][:k - best]
                rm = rm + extra
            else:
                rm = rm[:len(rm) - (best - k)]
            ctx.plan.removed[g.id] = np.sort(np.array(rm, dtype=np.int64))
            changed[g.id] = [k, best]
        ctx.report["latency_round"] = {str(gid): {"allocated": a, "chosen": b} for gid, (a, b) in changed.items()}
        return PassResult(info={"changed_groups": len(changed)})
