"""The Python API: prune() and analyze() over a path or an onnx.ModelProto."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import onnx

from .cost import model_cost
from .errors import BadInputError
from .graph import Model
from .kv_cache import cache_io, cache_shapes
from .model_io import restore_io_symbols, save_model
from .oprules import OpRuleRegistry, default_registry
from .pipeline import PassManager, Progress, PruneContext

__all__ = ["prune", "analyze", "PruneResult", "AnalysisResult", "default_pipeline", "analysis_pipeline"]


def default_pipeline() -> PassManager:
    """normalize -> analyze -> score -> allocate -> rewrite -> cleanup -> verify
    -> fidelity-uncompensated -> compensate -> fidelity.

    verify (and its mask-equivalence oracle) checks the rewrite before compensation, the
    only point where the oracle holds; compensation and the fidelity passes do nothing
    unless asked (`compensate`, `fidelity`, or calibration data).
    """
    from .fidelity import FidelityPass
    from .passes import (AllocatePass, AnalyzePass, CompensatePass, DeadNodeCleanupPass, NormalizePass,
                         RewritePass, ScorePass, VerifyPass)

    return PassManager([NormalizePass(), AnalyzePass(), ScorePass(), AllocatePass(), RewritePass(),
                        DeadNodeCleanupPass(), VerifyPass(), FidelityPass("uncompensated", "fidelity-uncompensated"),
                        CompensatePass(), FidelityPass("final", "fidelity")])


def analysis_pipeline() -> PassManager:
    from .passes import AnalyzePass, NormalizePass

    return PassManager([NormalizePass(), AnalyzePass()])


@dataclass
class PruneResult:
    """The pruned model and the report (MACs/params before and after, groups, removed channels)."""

    model: onnx.ModelProto
    report: dict
    context: PruneContext = field(repr=False)

    def save(self, path: "str | os.PathLike") -> str:
        meta = self.context.model.meta
        return str(save_model(self.model, path, external_data=meta.had_external_data or None, base_dir=meta.base_dir))


@dataclass
class AnalysisResult:
    groups: list
    pinned: list
    cost: object
    context: PruneContext = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "macs": int(self.cost.macs), "params": int(self.cost.params),
            "groups": [g.to_dict() | {"nodes": g.nodes} for g in self.groups],
            "pinned": [{"tensor": p.tensor, "axis": p.axis, "channels": p.count, "reason": p.reason}
                       for p in self.pinned],
            "macs_per_node": {k: int(v) for k, v in self.cost.per_node.items()},
        }


def _validate_ratio(name: str, value) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0 < v <= 1:
        raise BadInputError(f"{name} must be in (0, 1] (the fraction to keep), got {v}")
    return v


def _context(model, registry, options, progress) -> PruneContext:
    m = Model.load(model)
    original = m.copy()
    return PruneContext(model=m, original=original,
                        registry=(registry.copy() if registry is not None else default_registry()),
                        options=options, progress=Progress(progress))


def prune(model: "str | os.PathLike | onnx.ModelProto", target_flops: float | None = None, *,
          target_params: float | None = None, criterion: str = "l1", round_to: int = 8, min_keep: float = 0.1,
          protect: list[str] | tuple = (), uniform: bool = False, seed: int = 0, verify: bool = False,
          registry: OpRuleRegistry | None = None, pipeline: PassManager | None = None, progress: bool = False,
          policy: dict | None = None, gqa_uniform: bool = False, prune_kv_cache: bool = False,
          calib=None, calib_samples: int = 128,
          calib_preprocess=None, calib_heldout: int | None = None, calib_batch_size: int = 8,
          compensate: str = "none", compensate_damp: float | None = None, fidelity: bool | None = None,
          stats_memory: int | None = None, prune_hidden: bool = False, depth: bool = False,
          drop_branches: int | None = None, branch_criterion: str = "cosine", **options) -> PruneResult:
    """Prune `model` to `target_flops` (fraction of MACs kept) and/or `target_params`.

    `registry` holds op rules (default: built-ins plus user-registered), `pipeline` the
    passes (default: :func:`default_pipeline`). `gqa_uniform` prunes query heads evenly
    inside every KV group instead of removing whole KV groups. `prune_kv_cache` lets head pruning
    change the shapes of KV-cache graph inputs/outputs (past/present keys and values); the
    report's ``kv_cache`` lists them before and after. The input is never modified.

    Accuracy without fine-tuning: `calib` is calibration data (a .npz/.npy path, a folder of
    images preprocessed by `calib_preprocess`, an iterable of feed dicts or arrays, or a
    :class:`graphprune.calibration.CalibrationData`); the first `calib_samples` samples
    calibrate, up to `calib_heldout` following ones measure fidelity. Data-aware criteria
    (wanda, flap, obs) read activation statistics from it; `compensate` ("bias" or "obs")
    re-fits the consumers of removed channels (`compensate_damp`: fixed dampening instead
    of cross-validated; `compensate_select="cv"`: chosen by 2-fold cross-validation over
    calibration batches instead of GCV over rows). `fidelity` (default: on with `calib` or `compensate`) reports
    relative error, cosine and top-1 agreement against the original on held-out samples,
    before and after compensation. `stats_memory` bounds the bytes of Hessians held at once.

    `prune_hidden` (or ``policy={"prune_hidden": True}``) lets the hidden (residual stream)
    width go too: one group through every residual Add, LayerNorm/RMSNorm and embedding;
    normalisation statistics are then taken over the kept channels, so the oracle does the
    same, and fidelity against the original is reported (on by default). `policy` also takes
    ``head_dim`` (prune every head's dimension uniformly).
    """
    if depth or drop_branches is not None:  # residual branches go first, width pruning after (depth.py)
        from .depth import prune_with_depth

        return prune_with_depth(model, target_flops, target_params=target_params, depth=depth,
                                drop_branches=drop_branches, branch_criterion=branch_criterion, protect=protect,
                                seed=seed, verify=verify, calib=calib, criterion=criterion, round_to=round_to,
                                min_keep=min_keep, uniform=uniform, registry=registry, pipeline=pipeline,
                                progress=progress, policy=policy, gqa_uniform=gqa_uniform,
                                prune_kv_cache=prune_kv_cache, prune_hidden=prune_hidden, **options)
    policy = dict(policy or {})
    if gqa_uniform:
        policy["gqa_uniform"] = True
    if prune_kv_cache:
        policy["prune_kv_cache"] = True
    if prune_hidden:
        policy["prune_hidden"] = True
    tf = _validate_ratio("target_flops", target_flops)
    tp = _validate_ratio("target_params", target_params)
    if tf is None and tp is None:
        raise BadInputError("give target_flops or target_params (a fraction in (0, 1] to keep)")
    if round_to is None or int(round_to) < 1:
        raise BadInputError(f"round_to must be >= 1, got {round_to}")
    if not 0 <= float(min_keep) <= 1:
        raise BadInputError(f"min_keep must be in [0, 1], got {min_keep}")
    from .passes import criterion_names

    if criterion not in criterion_names():
        raise BadInputError(f"unknown criterion {criterion!r} (choose from {', '.join(criterion_names())})")
    from .passes import COMPENSATE_MODES

    if compensate not in COMPENSATE_MODES:
        raise BadInputError(f"unknown compensate mode {compensate!r} (choose from {', '.join(COMPENSATE_MODES)})")
    if options.get("compensate_select", "gcv") not in ("gcv", "cv"):
        raise BadInputError(f"compensate_select must be gcv or cv, got {options['compensate_select']!r}")
    if compensate_damp is not None and not float(compensate_damp) >= 0:
        raise BadInputError(f"compensate_damp must be >= 0, got {compensate_damp}")
    if fidelity is None:
        fidelity = calib is not None or compensate != "none" or bool(policy.get("prune_hidden"))
    opts = dict(options, target_macs=tf, target_params=tp, criterion=criterion, round_to=int(round_to),
                min_keep=float(min_keep), protect=list(protect), uniform=uniform, seed=seed, verify=verify,
                policy=policy, compensate=compensate, compensate_damp=compensate_damp, fidelity=bool(fidelity))
    if stats_memory is not None:
        opts["stats_memory"] = int(stats_memory)
    t0 = time.perf_counter()
    ctx = _context(model, registry, opts, progress)
    if calib is not None:
        from .calibration import load_calibration

        ctx.options["calibration"] = load_calibration(
            calib, ctx.original.to_proto(infer=False), samples=calib_samples, heldout=calib_heldout,
            preprocess=calib_preprocess, batch_size=int(calib_batch_size), seed=seed)
        ctx.report["calibration"] = ctx.options["calibration"].describe()
    elif calib_preprocess is not None:
        raise BadInputError("calib_preprocess needs calib (a folder of images)")
    (pipeline or default_pipeline()).run(ctx)
    ctx.report["prune_seconds"] = time.perf_counter() - t0
    ctx.report["timings"] = dict(ctx.timings)
    ctx.report["groups"] = _group_report(ctx)
    kv = cache_io(ctx.original.graph)
    if kv:
        ctx.report["kv_cache"] = cache_shapes(ctx.original.graph, ctx.model.graph, kv)
    ctx.report["pinned"] = [{"tensor": p.tensor, "axis": p.axis, "channels": p.count, "reason": p.reason}
                            for p in ctx.dependency.pinned]
    if policy.get("prune_hidden"):
        ctx.report["hidden"] = _hidden_report(ctx)
        if not ctx.report["hidden"]:
            ctx.report["hidden_pinned"] = _hidden_pin_reason(ctx.dependency)
    return PruneResult(restore_io_symbols(ctx.model.to_proto(), ctx.model.meta), ctx.report, ctx)


def _hidden_report(ctx: PruneContext) -> list[dict]:
    """Hidden widths before/after: the groups whose channels normalisation statistics run over."""
    from .dependency import Dim

    dg = ctx.dependency
    stat = {dg.dims[d] for dims in dg.stat_axes.values() for d in dims}
    removed = ctx.plan.removed if ctx.plan else {}
    out = []
    for g in ctx.groups:
        member = next((m for m in g.members if Dim(m.tensor, m.axis) in stat), None)
        if member is None:
            continue
        before = dg.dim_size[dg.dim_index[Dim(member.tensor, member.axis)]]
        gone = sum(len(member.indices[i]) for i in removed.get(g.id, []))
        out.append({"group": g.id, "name": g.name, "before": int(before), "after": int(before - gone)})
    return out


def _hidden_pin_reason(dg) -> str:
    """Why the width normalisation statistics run over was not prunable (first reasons found)."""
    import numpy as np

    stat = sorted({d for dims in dg.stat_axes.values() for d in dims if not dg.dim_opaque[d] and dg.dim_size[d] > 1})
    if not stat:
        return "no normalisation over a channel axis found"
    labels = np.unique(np.concatenate([dg.elements(d) for d in stat]))
    reasons = sorted({reason for d, reason in dg.dim_pin.items() if np.isin(dg.elements(d), labels).any()})
    return "; ".join(reasons[:3]) or "no producer weight to prune"


def _group_report(ctx: PruneContext) -> list[dict]:
    out = []
    removed = ctx.plan.removed if ctx.plan else {}
    for g in ctx.groups:
        rm = removed.get(g.id, [])
        out.append(g.to_dict() | {
            "nodes": g.nodes, "protected": g.id in ctx.protected,
            "kept": g.size - len(rm), "removed": [int(i) for i in rm],
        })
    return out


def analyze(model: "str | os.PathLike | onnx.ModelProto", *, registry: OpRuleRegistry | None = None,
            pipeline: PassManager | None = None, policy: dict | None = None,
            gqa_uniform: bool = False, prune_kv_cache: bool = False, prune_hidden: bool = False) -> AnalysisResult:
    """Groups, pinned channels (with reasons) and MACs per layer, without changing anything."""
    policy = dict(policy or {}, **({"gqa_uniform": True} if gqa_uniform else {}),
                  **({"prune_hidden": True} if prune_hidden else {}))
    if prune_kv_cache:
        policy["prune_kv_cache"] = True
    ctx = _context(model, registry, {"policy": policy or {}}, False)
    (pipeline or analysis_pipeline()).run(ctx)
    return AnalysisResult(ctx.groups, ctx.dependency.pinned, model_cost(ctx.model), ctx)
