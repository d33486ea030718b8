"""Uniform heads: every attention layer keeps the same number of heads (policy ``uniform_heads``).

Deployment runtimes (onnxruntime-genai, optimum) describe every layer with one
num_attention_heads / num_key_value_heads / head_size, so a plan that keeps 3 KV groups in one
layer and 1 in another cannot be described. After allocation, head groups of the same shape
(heads x width) keep a common count: the mean of the allocator's counts, rounded down (the
target stays met), at least one; each layer keeps its best-scored heads.
"""
from __future__ import annotations

import numpy as np

from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["UniformHeadsPass"]


class UniformHeadsPass(Pass):
    name = "uniform-heads"
    requires = ("plan", "groups")

    def call(self, ctx: PruneContext) -> PassResult:
        if not ctx.option("policy", {}).get("uniform_heads"):
            return PassResult()
        buckets: dict[tuple[int, int], list] = {}
        for g in ctx.groups:
            if g.kind == "heads":
                buckets.setdefault((g.size, g.width), []).append(g)
        removed = dict(ctx.plan.removed)
        changed = False
        for (size, _width), groups in buckets.items():
            kept = [size - len(removed.get(g.id, ())) for g in groups]
            if len(set(kept)) <= 1:
                continue
            common = max(1, int(np.floor(np.mean(kept))))
            for g in groups:
                order = np.argsort(ctx.scores[g.id], kind="stable")
                removed[g.id] = np.sort(order[:size - common]).astype(np.int64)
            changed = True
            ctx.report.setdefault("uniform_heads", []).append({"heads": size, "kept": common, "before": kept})
        if changed:
            ctx.plan.removed = {gid: idx for gid, idx in removed.items() if len(idx)}
            self._give_back(ctx, {g.id for gs in buckets.values() for g in gs})
        return PassResult(modified=changed)

    @staticmethod
    def _give_back(ctx: PruneContext, head_groups: set) -> None:
        """Rounding the head counts down may overshoot the target: give other groups' removed
        channels back (best-scored first, in --round-to blocks) while the target holds."""
        from .allocate import TOLERANCE, CostTracker, _channel_deltas

        targets = {m: float(ctx.option(f"target_{m}")) for m in ("macs", "params")
                   if ctx.option(f"target_{m}") is not None}
        if not targets:
            return
        tracker = CostTracker(ctx)
        dg, by_id = ctx.dependency, {g.id: g for g in ctx.groups}
        per = {gid: _channel_deltas(dg, by_id[gid]) for gid in ctx.plan.removed}
        for gid, idx in ctx.plan.removed.items():
            tracker.apply({d: n * len(idx) for d, n in per[gid].items()})
        orig = tracker.original
        block = max(int(ctx.option("round_to", 8) or 1), 1)
        while any(tracker.total(m) < (r - TOLERANCE) * orig[m] for m, r in targets.items()):
            best = None
            for gid, idx in ctx.plan.removed.items():
                if gid in head_groups or not len(idx):
                    continue
                k = min(block, len(idx))
                back = idx[np.argsort(-ctx.scores[gid][idx], kind="stable")[:k]]
                score = float(np.mean(ctx.scores[gid][back]) / (np.mean(np.abs(ctx.scores[gid])) or 1.0))
                deltas = {d: -n * k for d, n in per[gid].items()}
                totals = tracker.apply(deltas)
                tracker.undo(deltas)
                if all(totals[m] <= r * orig[m] for m, r in targets.items()) and (best is None or score > best[0]):
                    best = (score, gid, back, deltas)
            if best is None:
                break
            _, gid, back, deltas = best
            tracker.apply(deltas)
            ctx.plan.removed[gid] = np.setdiff1d(ctx.plan.removed[gid], back)
