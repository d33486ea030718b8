"""Score: rank every channel of every group with the chosen criterion."""
from __future__ import annotations

import numpy as np

from graphprune.errors import BadInputError
from graphprune.graph import const_values
from graphprune.pipeline import Pass, PassResult, PruneContext

from .criteria import CRITERIA, criterion_names

__all__ = ["ScorePass", "ScoreContext"]


class ScoreContext:
    """What a criterion may read: weight values by tensor name, a seeded RNG, options."""

    def __init__(self, ctx: PruneContext):
        self._tensors = ctx.model.graph.tensors()
        self.rng = np.random.default_rng(int(ctx.option("seed", 0)))
        self.options = ctx.options
        self.context = ctx

    def values(self, tensor: str) -> np.ndarray:
        v = const_values(self._tensors[tensor])
        if v is None:
            raise KeyError(f"{tensor} is not a weight")
        return v


class ScorePass(Pass):
    name = "score"
    requires = ("groups",)
    ensures = ("scores",)

    def call(self, ctx: PruneContext) -> PassResult:
        name = ctx.option("criterion", "l1")
        fn = CRITERIA.get(name)
        if fn is None:
            raise BadInputError(f"unknown criterion {name!r} (choose from {', '.join(criterion_names())})")
        sctx = ScoreContext(ctx)
        scores = {}
        bar = ctx.progress.bar(len(ctx.groups), "score")
        for g in ctx.groups:
            s = np.asarray(fn(g, sctx), dtype=np.float64).reshape(-1)
            if s.shape != (g.size,):
                raise ValueError(f"criterion {name!r} returned {s.shape[0]} scores for a group of {g.size}")
            scores[g.id] = s
            bar.update()
        bar.close()
        ctx.scores = scores
        return PassResult()
