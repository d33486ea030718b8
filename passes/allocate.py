"""Allocate: choose which channels go to reach the MACs/params target."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from graphprune.cost import node_cost_terms, param_cost_terms, spatial_hints
from graphprune.dependency import installed_registry
from graphprune.errors import BadInputError, NothingToPruneError
from graphprune.options import PruneOptions
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["AllocatePass", "PrunePlan", "CostTracker"]

TOLERANCE = 0.02


@dataclass
class PrunePlan:
    """Channel indices (in group order) removed from each group."""

    removed: dict = field(default_factory=dict)  # group id -> np.ndarray

    def removed_labels(self, groups) -> np.ndarray:
        by_id = {g.id: g for g in groups}
        parts = [by_id[gid].channel_labels[idx] for gid, idx in self.removed.items() if len(idx)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class CostTracker:
    """MACs and params as products of dimension sizes, updated as channels are removed."""

    def __init__(self, ctx: PruneContext):
        dg = ctx.dependency
        model = ctx.model
        self.sizes = np.array(dg.dim_size, dtype=np.float64)
        self.terms = {"macs": [], "params": []}
        rules = installed_registry()  # the same rules model_cost asks
        hints = spatial_hints(model, rules, ctx.option("shape", None))  # the concrete shape MACs are counted at
        terms = {"macs": [t for n in model.graph.nodes for t in node_cost_terms(n, hints, opset=model.opset,
                                                                                registry=rules)],
                 "params": param_cost_terms(model)}
        tensors = model.graph.tensors()
        from graphprune.graph import tensor_shape

        self.dim_terms: dict[int, list[tuple[str, int]]] = {}
        for metric, lst in terms.items():
            for term in lst:
                coef, dims = term.coef, []
                for t, ax in term.axes:
                    shape = hints.get(t) or (tensor_shape(tensors[t]) if t in tensors else None)
                    if shape is None:
                        continue
                    ax = ax % len(shape)
                    d = dg.dim_index.get(_dim_key(t, ax))
                    size = shape[ax]
                    size = size if isinstance(size, int) and size > 0 else 1  # unknown: counted as 1
                    fold = getattr(dg, "dim_fold", {}).get(d) if d is not None else None
                    if fold is not None and not dg.dim_opaque[d]:
                        # a folded axis (dynamic factor x units): the units are tracked, the factor
                        # is the concrete size over the units (1 where the size is unknown)
                        coef *= max(size / fold[1], 1.0)
                        dims.append(d)
                    elif d is None or dg.dim_opaque[d]:
                        coef *= size
                    else:
                        dims.append(d)
                k = len(self.terms[metric])
                self.terms[metric].append((coef, dims))
                for d in dims:
                    self.dim_terms.setdefault(d, []).append((metric, k))
        self.values = {m: np.array([self._value(m, k) for k in range(len(v))]) for m, v in self.terms.items()}
        self.original = {m: float(v.sum()) for m, v in self.values.items()}

    def _value(self, metric: str, k: int) -> float:
        coef, dims = self.terms[metric][k]
        return coef * float(np.prod(self.sizes[dims])) if dims else coef

    def total(self, metric: str) -> float:
        return float(self.values[metric].sum())

    def apply(self, deltas: dict[int, float]) -> dict[str, float]:
        for d, n in deltas.items():
            self.sizes[d] -= n
        for d in deltas:
            for metric, k in self.dim_terms.get(d, ()):
                self.values[metric][k] = self._value(metric, k)
        return {m: self.total(m) for m in self.values}

    def undo(self, deltas: dict[int, float]) -> None:
        self.apply({d: -n for d, n in deltas.items()})


def _dim_key(t, ax):
    from graphprune.dependency import Dim

    return Dim(t, ax)


def _channel_deltas(dg, group) -> dict[int, float]:
    """How many elements one channel of the group takes from each dimension."""
    out = {}
    for m in group.members:
        d = dg.dim_index[_dim_key(m.tensor, m.axis)]
        out[d] = out.get(d, 0) + float(np.mean([len(ix) for ix in m.indices]))
    return out


def width_grid(size: int, round_to: int, min_keep: float, unit_width: int = 1) -> list[int]:
    """The kept counts a group may end at, from `size` down to its min-keep floor.

    With --round-to, a kept width is a multiple of the block (``round_to`` channels; for
    units wider than one channel, such as attention heads, the fewest units whose channels
    make a multiple of ``round_to``), or the full size: a 12-channel group may keep 12 or 8,
    a 64-channel one 64, 56, ..., never 61 (kernels run whole blocks, so 61 channels cost what
    64 do). A group narrower than one block keeps channel granularity.
    """
    step = round_to // math.gcd(round_to, max(int(unit_width), 1)) if round_to > 1 else 1
    if size < step:
        step = 1
    floor = max(1, math.ceil(min_keep * size))
    floor = min(int(math.ceil(floor / step) * step), size)
    top = size - size % step if size % step else size - step
    return [size] + list(range(top, floor - 1, -step))


def _blocks(group, round_to: int, min_keep: float) -> list[int]:
    """Sizes of the successive removal blocks of a group (differences of its width grid)."""
    grid = width_grid(group.size, round_to, min_keep, group.width if group.kind == "heads" else 1)
    return [a - b for a, b in zip(grid, grid[1:])]


def _next_block(st: dict) -> int:
    """Size of a group's next removal block (0 once it is at its floor)."""
    t = 0
    for b in st["blocks"]:
        if t == st["taken"]:
            return b
        t += b
    return 0


class AllocatePass(Pass):
    """Global ranking across groups (scores normalised per group), in blocks of --round-to."""

    name = "allocate"
    requires = ("groups", "scores")
    ensures = ("plan",)

    def call(self, ctx: PruneContext) -> PassResult:
        targets = {m: ctx.option(f"target_{m}") for m in ("macs", "params")}
        targets = {m: float(r) for m, r in targets.items() if r is not None}
        if not targets:
            raise BadInputError("give a target: target_flops (--target-flops) or target_params (--target-params)")
        tracker = CostTracker(ctx)
        ctx.report["cost_model"] = {"macs_before": tracker.original["macs"], "params_before": tracker.original["params"]}
        candidates = [g for g in ctx.groups if g.id not in ctx.protected and g.size > 1]
        if not candidates:
            checker = [w for w in ctx.report.get("warnings", []) if "fails onnx.checker" in w]
            raise NothingToPruneError(
                "nothing to prune: every channel is pinned or protected (run `graphprune analyze` to see why)"
                + (f"; note: {checker[0]}" if checker else ""))
        round_to = int(ctx.option("round_to", PruneOptions.default("round_to")) or 1)
        min_keep = float(ctx.option("min_keep", PruneOptions.default("min_keep")))
        if ctx.option("uniform", False):
            plan = self._uniform(ctx, tracker, candidates, targets, round_to, min_keep)
        else:
            plan = self._global(ctx, tracker, candidates, targets, round_to, min_keep)
        achieved = {m: tracker.total(m) / max(tracker.original[m], 1e-12) for m in targets}
        unmet = {m: a for m, a in achieved.items() if a > targets[m] + 1e-9}
        if unmet:
            m, a = next(iter(unmet.items()))
            raise NothingToPruneError(
                f"cannot reach {m} target {targets[m]:.3f}: the most that can be removed leaves {a:.3f} "
                f"(pinned channels, min-keep {min_keep} and protected layers limit it; see `graphprune analyze`)")
        ctx.plan = plan
        ctx.report["allocation"] = {"targets": targets, "achieved_estimate": achieved}
        return PassResult(info=achieved)

    def _global(self, ctx, tracker, groups, targets, round_to, min_keep) -> PrunePlan:
        dg = ctx.dependency
        heap, state = [], {}
        for g in groups:
            s = ctx.scores[g.id]
            mean = float(np.mean(np.abs(s)))
            norm = s / mean if mean > 0 else s
            order = np.argsort(norm, kind="stable")
            state[g.id] = {"order": order, "norm": norm, "blocks": _blocks(g, round_to, min_keep), "taken": 0,
                           "deltas": _channel_deltas(dg, g)}
            self._push(heap, g.id, state[g.id])
        lo = {m: r - TOLERANCE for m, r in targets.items()}
        orig = tracker.original
        removed: dict[int, list] = {}
        skipped: list[int] = []
        steps: list[tuple[int, int, dict]] = []  # pass 1's blocks (group, size, deltas), in order

        def unmet() -> bool:
            return any(tracker.total(m) > targets[m] * orig[m] for m in targets)

        # pass 1 stays inside [R - tolerance, R]; pass 2 (only when round-to blocks are too
        # coarse to land there) accepts overshooting, so the target is always met
        for strict in (True, False):
            while heap and unmet():
                _, gid, _ = heapq.heappop(heap)
                st = state[gid]
                k = _next_block(st)
                deltas = {d: n * k for d, n in st["deltas"].items()}
                totals = tracker.apply(deltas)
                if strict and any(totals[m] < lo[m] * orig[m] for m in targets):
                    tracker.undo(deltas)  # overshoots: leave this group for pass 2
                    skipped.append(gid)
                    continue
                removed.setdefault(gid, []).extend(st["order"][st["taken"]:st["taken"] + k].tolist())
                st["taken"] += k
                steps.append((gid, k, deltas))
                self._push(heap, gid, st)
            if not unmet():
                break
            if not skipped:
                break
            # pass 2: a whole block overshoots everywhere. Land on the target with part of a
            # block (the group's width then leaves the --round-to grid), else take whole blocks
            while unmet():
                part = self._partial_block(tracker, state, set(skipped), targets, orig, lo)
                if part is not None:
                    gid, j = part
                    st = state[gid]
                    tracker.apply({d: n * j for d, n in st["deltas"].items()})
                    removed.setdefault(gid, []).extend(st["order"][st["taken"]:st["taken"] + j].tolist())
                    st["taken"] += j
                    kept = next(g.size for g in ctx.groups if g.id == gid) - st["taken"]
                    ctx.report.setdefault("warnings", []).append(
                        f"--round-to {round_to} blocks are too coarse to land within {TOLERANCE} of the target: "
                        f"group {gid} keeps {kept} channels, off the multiple-of-{round_to} grid")
                    break
                best = None
                for gid in set(skipped):
                    st = state[gid]
                    k = _next_block(st)
                    if not k:
                        continue
                    deltas = {d: n * k for d, n in st["deltas"].items()}
                    totals = tracker.apply(deltas)
                    tracker.undo(deltas)
                    key = sum(totals[m] / orig[m] for m in targets)
                    if best is None or key > best[0]:
                        best = (key, gid, deltas)
                if best is None:
                    break
                _, gid, deltas = best
                st = state[gid]
                tracker.apply(deltas)
                k = _next_block(st)
                removed.setdefault(gid, []).extend(st["order"][st["taken"]:st["taken"] + k].tolist())
                st["taken"] += k
                if not unmet():
                    self._give_back(tracker, state, removed, steps, targets, orig)
                if any(tracker.total(m) < lo[m] * orig[m] for m in targets):
                    msg = (f"--round-to {round_to} blocks are too coarse to land within {TOLERANCE} of the target; "
                           "the result overshoots it (try --round-to 1)") if round_to > 1 else (
                        f"whole units (attention heads, KV groups) are too coarse to land within {TOLERANCE} of the "
                        "target; the result overshoots it")
                    if msg not in ctx.report.get("warnings", []):
                        ctx.report.setdefault("warnings", []).append(msg)
            break
        return PrunePlan({gid: np.sort(np.array(ix, dtype=np.int64)) for gid, ix in removed.items()})

    @staticmethod
    def _give_back(tracker, state, removed, steps, targets, orig) -> None:
        """After a whole block overshot the target: return pass 1's blocks, latest first, while
        every target still holds (a coarse unit, such as a KV group, came after finer channels
        that it makes unnecessary). A group's blocks go back in reverse order only."""
        held: set[int] = set()
        for gid, k, deltas in reversed(steps):
            if gid in held:
                continue
            totals = tracker.apply({d: -n for d, n in deltas.items()})
            if any(totals[m] > targets[m] * orig[m] for m in targets):
                tracker.apply(deltas)
                held.add(gid)
                continue
            del removed[gid][len(removed[gid]) - k:]
            if not removed[gid]:
                del removed[gid]
            state[gid]["taken"] -= k

    @staticmethod
    def _partial_block(tracker, state, gids, targets, orig, lo):
        """(group, j): the fewest channels of some group's next block that meet every target
        and stay inside the band, lowest-scored first; None when no part of a block does."""
        best = None
        for gid in sorted(gids):
            st = state[gid]
            k = _next_block(st)
            for j in range(1, k):
                deltas = {d: n * j for d, n in st["deltas"].items()}
                totals = tracker.apply(deltas)
                tracker.undo(deltas)
                if any(totals[m] > targets[m] * orig[m] for m in targets):
                    continue
                if all(totals[m] >= lo[m] * orig[m] for m in targets):
                    score = float(np.mean(st["norm"][st["order"][st["taken"]:st["taken"] + j]]))
                    if best is None or score < best[0]:
                        best = (score, gid, j)
                break
        return None if best is None else (best[1], best[2])

    @staticmethod
    def _push(heap, gid, st):
        t, k = st["taken"], _next_block(st)
        if k:
            block = st["norm"][st["order"][t:t + k]]
            heapq.heappush(heap, (float(np.mean(block)), gid, t))

    def _uniform(self, ctx, tracker, groups, targets, round_to, min_keep) -> PrunePlan:
        dg = ctx.dependency
        info = {g.id: (np.cumsum([0] + _blocks(g, round_to, min_keep)), _channel_deltas(dg, g)) for g in groups}

        def counts(r: float) -> dict[int, int]:  # the largest allowed removal <= r of each group
            return {g.id: int(info[g.id][0][np.searchsorted(info[g.id][0], g.size * r, side="right") - 1])
                    for g in groups}

        def cost_at(r: float) -> dict[str, float]:
            c = counts(r)
            deltas: dict[int, float] = {}
            for gid, n in c.items():
                for d, per in info[gid][1].items():
                    deltas[d] = deltas.get(d, 0) + per * n
            totals = tracker.apply(deltas)
            tracker.undo(deltas)
            return totals

        orig = tracker.original
        lo_r, hi_r = 0.0, 1.0
        for _ in range(40):
            mid = (lo_r + hi_r) / 2
            totals = cost_at(mid)
            if all(totals[m] <= targets[m] * orig[m] for m in targets):
                hi_r = mid
            else:
                lo_r = mid
        c = counts(hi_r)
        for g in groups:
            for d, per in info[g.id][1].items():
                tracker.apply({d: per * c[g.id]})
        # the common ratio moves in coarse steps: give blocks back (most important first)
        # while the target still holds, to land inside [R - tolerance, R]
        lo = {m: r - TOLERANCE for m, r in targets.items()}
        changed = True
        while changed and any(tracker.total(m) < lo[m] * orig[m] for m in targets):
            changed = False
            order = sorted(groups, key=lambda g: -float(np.sort(ctx.scores[g.id])[max(c[g.id] - 1, 0)]))
            for g in order:
                allowed = info[g.id][0]
                i = int(np.searchsorted(allowed, c[g.id]))
                if i == 0:
                    continue
                step = int(allowed[i] - allowed[i - 1])
                deltas = {d: -per * step for d, per in info[g.id][1].items()}
                totals = tracker.apply(deltas)
                if any(totals[m] > targets[m] * orig[m] for m in targets):
                    tracker.undo(deltas)
                    continue
                c[g.id] -= step
                changed = True
                if not any(tracker.total(m) < lo[m] * orig[m] for m in targets):
                    break
        if any(tracker.total(m) < lo[m] * orig[m] for m in targets):
            ctx.report.setdefault("warnings", []).append(
                f"--uniform with --round-to {round_to} cannot land within {TOLERANCE} of the target; "
                "the result overshoots it")
        removed = {g.id: np.sort(np.argsort(ctx.scores[g.id], kind="stable")[:c[g.id]])
                   for g in groups if c[g.id] > 0}
        return PrunePlan(removed)
