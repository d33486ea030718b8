"""Depth pruning: rank residual branches, choose which go, remove them, width-prune the rest.

Branch criteria live in a registry (`register_branch_criterion`); a criterion returns one
importance per branch, lower = safer to remove:

- ``weight-norm`` (data-free, no run): the product over the branch's MAC nodes of their
  weights' Frobenius norms, divided by the branch's MAC count's square root (a branch whose
  last projection is zero scores 0).
- ``cosine`` (default; synthetic inputs, or calibration data when given): 1 - cos(x, x + f(x))
  at the residual Add, averaged over samples (FinerCut/ShortGPT-style input/output similarity).
- ``output-change``: the relative change of the graph outputs when the branch alone is zeroed.
- ``finercut``: FinerCut's greedy one-at-a-time removal: at each step the branch whose removal,
  together with those already chosen, changes the outputs least; scores are the step numbers.

Allocation (``depth=True`` with a MACs/params target R): branches are taken in order of
importance per MAC saved, lowest first, until the cost is <= R; a branch whose removal would
take the cost below R - 0.02 is skipped (a smaller one may still fit), and at most
``max_depth_fraction`` of the branches go (default 0.25, FinerCut's share);
width pruning then takes the rest to R on the depth-pruned graph (target R x original /
depth-pruned). ``drop_branches=N`` removes exactly the N lowest-ranked branches, then width
prunes to the target if one is given. Branches containing a ``protect`` node never go.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .branches import ResidualBranch, find_branches, protected_branches, remove_branches, zero_branches
from .cost import model_cost
from .errors import BadInputError
from .graph import Model
from .runtime import run_model, synthetic_inputs

__all__ = ["BRANCH_CRITERIA", "register_branch_criterion", "branch_criterion_names", "score_branches",
           "choose_branches", "prune_with_depth", "check_depth_equivalence", "BAND"]

BAND = 0.02  # the target band is [R - BAND, R]

BranchCriterion = Callable[[Model, list, list], list]
BRANCH_CRITERIA: dict[str, BranchCriterion] = {}


def register_branch_criterion(name: str):
    """Decorator: ``fn(model, branches, feeds) -> [importance per branch]`` (lower goes first)."""
    def deco(fn: BranchCriterion) -> BranchCriterion:
        BRANCH_CRITERIA[name] = fn
        return fn
    return deco


def branch_criterion_names() -> list[str]:
    return sorted(BRANCH_CRITERIA)


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    types = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.input)}
    for n in names:
        if n not in have:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[n]) if n in types else vi.MergeFrom(
                onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            m.graph.output.append(vi)
            have.add(n)
    return m


@register_branch_criterion("cosine")
def _cosine(model: Model, branches: list, feeds: list) -> list:
    proto = model.to_proto()
    names = [n for b in branches for n in (b.shortcut, b.output)]
    probe = _with_outputs(proto, names)
    outs = [o.name for o in probe.graph.output]
    score = np.zeros(len(branches))
    for feed in feeds:
        vals = dict(zip(outs, run_model(probe, feed)))
        for k, b in enumerate(branches):
            x = np.asarray(vals[b.shortcut], np.float64).ravel()
            y = np.asarray(vals[b.output], np.float64).ravel()
            cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))
            score[k] += (1.0 - cos) / len(feeds)
    return [max(float(s), 0.0) for s in score]


def _output_change(proto: onnx.ModelProto, base: list, chosen: list, feeds: list) -> float:
    ref = zero_branches(proto, chosen)
    err = 0.0
    for feed, want in zip(feeds, base):
        got = run_model(ref, feed)
        for a, b in zip(want, got):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if np.issubdtype(a.dtype, np.floating) and a.size:
                err += float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30))
    return err / max(len(feeds), 1)


@register_branch_criterion("output-change")
def _output_change_score(model: Model, branches: list, feeds: list) -> list:
    proto = model.to_proto()
    base = [run_model(proto, f) for f in feeds]
    return [_output_change(proto, base, [b], feeds) for b in branches]


@register_branch_criterion("finercut")
def _finercut(model: Model, branches: list, feeds: list) -> list:
    proto = model.to_proto()
    base = [run_model(proto, f) for f in feeds]
    left, chosen, score = list(branches), [], {}
    while left:
        errs = [_output_change(proto, base, chosen + [b], feeds) for b in left]
        best = left.pop(int(np.argmin(errs)))
        score[best.id] = float(len(chosen))
        chosen.append(best)
    return [score[b.id] for b in branches]


@register_branch_criterion("weight-norm")
def _weight_norm(model: Model, branches: list, feeds: list) -> list:
    nodes = {(n.name or n.outputs[0].name): n for n in model.graph.nodes}
    per_node = model_cost(model).per_node
    out = []
    for b in branches:
        s = 1.0
        for name in b.nodes:
            if per_node.get(name, 0) <= 0:
                continue
            w = [t for t in nodes[name].inputs[1:2] if isinstance(t, gs.Constant)]
            if w:
                s *= float(np.linalg.norm(np.asarray(w[0].values, np.float64)))
        out.append(s / np.sqrt(max(b.macs, 1.0)))
    return out


def _feeds(model: Model, calib, samples: int, seed: int) -> list[dict]:
    if calib is not None:
        feeds = []
        for batch in calib.batches() if hasattr(calib, "batches") else calib:
            feeds.append(batch)
            if len(feeds) >= samples:
                break
        if feeds:
            return feeds
    proto = model.to_proto(infer=False)
    return [synthetic_inputs(proto, batch=1, seq=8, seed=seed + k) for k in range(2)]


def score_branches(model: Model, branches: list, criterion: str = "cosine", calib=None, seed: int = 0,
                   samples: int = 4) -> list[float]:
    if criterion not in BRANCH_CRITERIA:
        raise BadInputError(f"unknown branch criterion {criterion!r} (choose from {', '.join(branch_criterion_names())})")
    if not branches:
        return []
    return [float(s) for s in BRANCH_CRITERIA[criterion](model, branches, _feeds(model, calib, samples, seed))]


def choose_branches(branches: list, scores: list, total: float, *, target: float | None = None,
                    count: int | None = None, protected: set = frozenset(), cost: str = "macs",
                    max_fraction: float = 0.25) -> list:
    """Branches to remove: exactly `count`, or by importance per MAC while the cost stays >= target - BAND."""
    free = [(s, b) for s, b in zip(scores, branches) if b.id not in protected]
    if count is not None:
        if count > len(free):
            raise BadInputError(f"--drop-branches {count}: only {len(free)} residual branches can be removed "
                                f"({len(branches)} found, {len(branches) - len(free)} protected)")
        return [b for _, b in sorted(free, key=lambda sb: (sb[0], sb[1].id))[:count]]
    if target is None:
        return []
    limit = int(max_fraction * len(branches))
    chosen, left = [], total
    for s, b in sorted(free, key=lambda sb: (sb[0] / max(getattr(sb[1], cost), 1.0), sb[1].id)):
        if left <= target * total or len(chosen) >= limit:
            break
        after = left - getattr(b, cost)
        if after < (target - BAND) * total:
            continue  # this one would overshoot the band: a smaller one may fit, width pruning takes the rest
        chosen.append(b)
        left = after
    return chosen


def check_depth_equivalence(original: onnx.ModelProto, pruned: onnx.ModelProto, chosen: list, dg=None, plan=None,
                            groups=None, batches=(1, 5), seeds: int = 0, rtol: float = 1e-4) -> dict:
    """Oracle for depth (+ width): the pruned model against the original with the removed branches'
    outputs zeroed and (when a width plan is given) the removed channels zeroed in their consumers.
    Inputs are fed by name (removed KV-cache inputs are not fed to the pruned model) and outputs
    compared by name (removed KV-cache outputs are skipped)."""
    from .runtime import session
    from .verify import compare_outputs, masked_model
    from .verify_io import io_slices, slice_arrays

    ref = zero_branches(original, chosen)
    slices: dict = {}
    if dg is not None and plan is not None:
        labels = plan.removed_labels(groups)
        ref = masked_model(Model.from_proto(ref), dg, labels)
        slices = io_slices(dg, labels)  # KV-cache inputs/outputs resized by head pruning: kept slices
    results, ok = {}, True
    sr, sp = session(ref), session(pruned)
    pruned_in = {i.name for i in sp.get_inputs()}
    names = [o.name for o in sp.get_outputs()]
    for b in batches:
        feeds = synthetic_inputs(ref, batch=b, seq=8 + b, seed=seeds + b)
        want = slice_arrays(dict(zip([o.name for o in sr.get_outputs()], sr.run(None, feeds))), slices)
        got = sp.run(None, {k: v for k, v in slice_arrays(feeds, slices).items() if k in pruned_in})
        cmp = compare_outputs([want[n] for n in names], got)
        results[f"batch{b}"] = cmp
        ok = ok and bool(cmp["max_rel"] <= rtol)
    results["equivalent"] = ok
    return results


_DEPTH_ONLY = ("depth", "drop_branches", "branch_criterion", "max_depth_fraction", "target_flops", "target_params",
               "verify", "verify_inputs")


def prune_with_depth(model, o, *, width_prune, result_cls, registry=None, pipeline=None):
    """Depth then width pruning for :class:`graphprune.options.PruneOptions` `o` (see the module
    docstring). `width_prune` is :func:`graphprune.prune` and `result_cls` its PruneResult (passed
    in: this module sits below the API); the result's report has a ``depth`` section."""
    from dataclasses import fields

    prune, PruneResult = width_prune, result_cls

    if o.target_flops is None and o.target_params is None and o.drop_branches is None:
        raise BadInputError("give target_flops or target_params (a fraction in (0, 1] to keep) or drop_branches")
    m = Model.load(model)
    original = m.to_proto()
    branches = find_branches(m, o.shape)
    protected = protected_branches(branches, o.protect)
    before = model_cost(m, shape=o.shape)  # at the concrete input shape, as the width pass counts
    data = None
    if o.calib is not None:
        from .calibration import load_calibration

        data = load_calibration(o.calib, original, samples=min(o.calib_samples, 8),
                                preprocess=o.calib_preprocess, seed=o.seed)
    scores = score_branches(m, branches, o.branch_criterion, calib=data, seed=o.seed)
    use_params = o.target_params is not None and o.target_flops is None
    cost, total, target = ("params", before.params, o.target_params) if use_params else \
        ("macs", before.macs, o.target_flops)
    chosen = choose_branches(branches, scores, total, target=target if o.depth else None,
                             count=o.drop_branches, protected=protected, cost=cost,
                             max_fraction=o.max_depth_fraction)
    shallow = remove_branches(m, chosen)
    mid = model_cost(shallow, shape=o.shape)
    depth_report = {"branches": len(branches), "criterion": o.branch_criterion,
                    "protected": [b.add for b in branches if b.id in protected],
                    "removed": [b.to_dict() | {"score": scores[b.id]} for b in chosen],
                    "scores": {b.add: scores[b.id] for b in branches},
                    "macs_after_depth": int(mid.macs), "params_after_depth": int(mid.params)}
    shallow_proto = shallow.to_proto()
    width_ratio = None
    if target is not None:
        now = mid.macs if cost == "macs" else mid.params
        width_ratio = target * total / now if now else 1.0
    if width_ratio is not None and width_ratio < 1.0:
        width = {f.name: getattr(o, f.name) for f in fields(o) if f.name not in _DEPTH_ONLY}
        width["target_flops" if cost == "macs" else "target_params"] = width_ratio
        try:
            res = prune(shallow_proto, registry=registry, pipeline=pipeline, **width)
        except BadInputError as exc:
            raise BadInputError(f"after removing {len(chosen)} residual branches ({cost} at "
                                f"{now / total:.3f} of the original) width pruning cannot reach {target}: {exc}") from None
        pruned, report, ctx = res.model, res.report, res.context
        dg, plan, groups = ctx.dependency, ctx.plan, ctx.groups
    else:
        from .pipeline import Progress, PruneContext

        pruned, report, dg, plan, groups = shallow_proto, {"groups": [], "pinned": []}, None, None, None
        ctx = PruneContext(model=shallow, original=m, options={}, progress=Progress(False))
    after = model_cost(Model.from_proto(pruned), shape=o.shape)
    report.update({"macs_before": int(before.macs), "macs_after": int(after.macs),
                   "params_before": int(before.params), "params_after": int(after.params),
                   "macs_ratio": after.macs / before.macs if before.macs else 1.0,
                   "params_ratio": after.params / before.params if before.params else 1.0,
                   "cost_shape": {k: list(v) for k, v in before.input_shape.items()}, "depth": depth_report})
    report.setdefault("prune_seconds", 0.0)
    if o.verify or o.verify_inputs is not None:
        onnx.checker.check_model(pruned, full_check=True)
        report["oracle"] = check_depth_equivalence(original, pruned, chosen, dg, plan, groups, seeds=o.seed)
    return PruneResult(pruned, report, ctx)
