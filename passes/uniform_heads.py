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
        return PassResult(modified=changed)
