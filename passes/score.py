"""Score: rank every channel of every group with the chosen criterion."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from graphprune.dependency import ROLE_PARAM, ROLE_REDUCE, GroupMember
from graphprune.errors import BadInputError
from graphprune.graph import const_values
from graphprune.oprules import rule_for
from graphprune.oprules.quant import dequantized
from graphprune.pipeline import Pass, PassResult, PruneContext

from .criteria import CRITERIA, criterion_names

__all__ = ["ScorePass", "ScoreContext", "DEFAULT_STATS_MEMORY"]

DEFAULT_STATS_MEMORY = 1 << 30   # bytes of Hessians held at once while scoring



class ScoreContext:
    """What a criterion may read, all keyed by a group member's (tensor, axis):

    - :meth:`values`: weight values by tensor name;
    - :meth:`activation_stats`: per-element mean / second moment / norm of the activation a
      "reduce" member's consumer contracts (from ``--calib``, or synthetic inputs);
    - :meth:`hessian`: that consumer's XᵀX over its input features and the view that maps the
      member's elements to features and the weight to a [outputs, features] matrix;
    - :meth:`is_scale`: whether a "param" member multiplies its channel (a BN/LayerNorm scale);
    - `rng` (seeded) and `options`.

    Statistics are collected lazily, streaming over the calibration batches; Hessians are
    held under a memory budget (``stats_memory`` bytes, oldest dropped first).
    """

    def __init__(self, ctx: PruneContext):
        self._tensors = ctx.model.graph.tensors()
        self.rng = np.random.default_rng(int(ctx.option("seed", 0)))
        self.options = ctx.options
        self.context = ctx
        self.budget = int(ctx.option("stats_memory", DEFAULT_STATS_MEMORY) or DEFAULT_STATS_MEMORY)
        self._proto = None
        self._views = None
        self._order: list = []
        self._stats: dict = {}
        self._hessians: dict = {False: OrderedDict(), True: OrderedDict()}
        self._users = None
        self.passes = 0            # calibration passes run
        self.peak_bytes = 0        # most statistic bytes held at once

    # -- weights ------------------------------------------------------------------
    def values(self, tensor: str) -> np.ndarray:
        t = self._tensors[tensor]
        v = dequantized(t)  # an integer weight behind a DequantizeLinear: its float values
        if v is None:
            v = const_values(t)
        if v is None:
            raise KeyError(f"{tensor} is not a weight")
        return v

    @property
    def has_calibration(self) -> bool:
        return self.options.get("calibration") is not None

    def is_scale(self, member: GroupMember) -> bool:
        """A per-channel parameter that multiplies the channel (BN / norm scale, Mul constant)."""
        if member.role != ROLE_PARAM or not member.is_weight:
            return False
        if self._users is None:
            self._users = {}
            model = self.context.model
            for node in model.graph.nodes:
                rule = rule_for(node, model.opset)
                scales = rule.scale_inputs if rule is not None else ()
                for i, t in enumerate(node.inputs):
                    self._users.setdefault(t.name, []).append(i in scales)
        uses = self._users.get(member.tensor, [])
        return bool(uses) and all(uses)  # every use is an input its op rule calls a scale

    # -- activations --------------------------------------------------------------
    def _model_proto(self):
        if self._proto is None:
            self._proto = self.context.model.to_proto()
        return self._proto

    def views(self) -> dict:
        if self._views is None:
            from graphprune.activations import find_views

            keys = []
            for g in self.context.groups or []:
                for m in g.weight_members((ROLE_REDUCE,)):
                    keys.append((m.tensor, m.axis))
            keys = list(dict.fromkeys(keys))
            self._views = find_views(self.context.model, keys)
            self._order = [k for k in keys if k in self._views]
        return self._views

    def view(self, member: GroupMember):
        return self.views().get((member.tensor, member.axis))

    def _calibration(self, data_free: bool, purpose: str):
        from graphprune.calibration import context_calibration

        return context_calibration(self.context, data_free=data_free, purpose=purpose)

    def activation_stats(self, member: GroupMember, *, data_free: bool = False):
        """:class:`~graphprune.activations.ChannelStats` per element of the member's axis, or None."""
        key = (member.tensor, member.axis)
        views = self.views()
        if key not in views:
            return None
        if data_free not in self._stats:
            from graphprune.activations import collect_channel_stats

            calib = self._calibration(data_free, f"criterion {self.options.get('criterion')!r}")
            self._stats[data_free] = collect_channel_stats(self._model_proto(), views, calib.batches())
            self.passes += 1
        return self._stats[data_free].get(key)

    def hessian(self, member: GroupMember, *, data_free: bool = False):
        """:class:`~graphprune.activations.HessianStats` of the member's consumer, or None."""
        from graphprune.activations import MAX_FEATURES, collect_hessians, hessian_bytes

        key = (member.tensor, member.axis)
        views = self.views()
        v = views.get(key)
        if v is None or not v.has_hessian or v.features > MAX_FEATURES:
            return None
        cache = self._hessians[data_free]
        if key in cache:
            return cache[key]
        # collect this consumer and the next ones (in group order) that fit the budget
        chunk, need = [], 0
        start = self._order.index(key)
        for k in self._order[start:]:
            vk = views[k]
            if k in cache or not vk.has_hessian or vk.features > MAX_FEATURES:
                continue
            b = hessian_bytes(vk)
            if chunk and need + b > self.budget:
                break
            chunk.append(vk)
            need += b
        held = sum(h.nbytes for h in cache.values())
        while cache and held + need > self.budget:
            _, old = cache.popitem(last=False)
            held -= old.nbytes
        calib = self._calibration(data_free, f"criterion {self.options.get('criterion')!r}")
        cache.update(collect_hessians(self._model_proto(), chunk, calib.batches()))
        self.passes += 1
        self.peak_bytes = max(self.peak_bytes, sum(h.nbytes for h in cache.values()))
        return cache.get(key)

    def stats_bytes(self) -> int:
        """Bytes of statistics held now (channel stats and cached Hessians)."""
        n = sum(s.nbytes for d in self._stats.values() for s in d.values())
        return n + sum(h.nbytes for c in self._hessians.values() for h in c.values())


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
            if g.id in ctx.protected:
                scores[g.id] = np.ones(g.size)
                bar.update()
                continue
            s = np.asarray(fn(g, sctx), dtype=np.float64).reshape(-1)
            if s.shape != (g.size,):
                raise ValueError(f"criterion {name!r} returned {s.shape[0]} scores for a group of {g.size}")
            if not np.all(np.isfinite(s)):
                s = np.nan_to_num(s, nan=0.0, posinf=np.finfo(np.float64).max / 4, neginf=0.0)
            scores[g.id] = s
            bar.update()
        bar.close()
        ctx.scores = scores
        info = {}
        if sctx.passes:
            info = {"calibration_passes": sctx.passes, "peak_stats_bytes": sctx.peak_bytes}
        return PassResult(info=info)
