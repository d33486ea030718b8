"""The Python API: prune() and analyze() over a path or an onnx.ModelProto."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import onnx

from .cost import input_shapes, model_cost
from .errors import BadInputError
from .graph import Model
from .kv_cache import cache_io, cache_shapes
from .model_io import release_run_copies, restore_io_symbols, save_model
from .oprules import OpRuleRegistry, default_registry
from .options import PruneOptions, policy_from
from .pipeline import PassManager, Progress, PruneContext

__all__ = ["prune", "analyze", "PruneResult", "AnalysisResult", "default_pipeline", "analysis_pipeline"]


def default_pipeline() -> PassManager:
    """normalize -> analyze -> score -> allocate -> rewrite -> cleanup -> verify
    -> fidelity-uncompensated -> compensate -> fidelity -> compensation-guard (the uncompensated
    model is kept if compensation lowered held-out fidelity).

    verify (and its mask-equivalence oracle) checks the rewrite before compensation, the
    only point where the oracle holds; compensation and the fidelity passes do nothing
    unless asked (`compensate`, `fidelity`, or calibration data).
    """
    from .fidelity import FidelityPass
    from .passes import (AllocatePass, AnalyzePass, CompensatePass, CompensationGuardPass, DeadNodeCleanupPass,
                         NormalizePass, RecoverPass, RewritePass, ScorePass, VerifyPass)
    from .passes.uniform_heads import UniformHeadsPass

    return PassManager([NormalizePass(), AnalyzePass(), ScorePass(), AllocatePass(), UniformHeadsPass(),
                        RewritePass(),
                        DeadNodeCleanupPass(), VerifyPass(), FidelityPass("uncompensated", "fidelity-uncompensated"),
                        CompensatePass(), FidelityPass("final", "fidelity"), CompensationGuardPass(),
                        RecoverPass()])


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
        # a big model is checked once more, on the written files (the input's own defects aside)
        check = meta.big and not any("fails onnx.checker" in w for w in self.report.get("warnings", []))
        return str(save_model(self.model, path, external_data=meta.had_external_data or None, base_dir=meta.base_dir,
                              progress=self.context.progress.enabled, check=check))


@dataclass
class AnalysisResult:
    groups: list
    pinned: list
    cost: object
    context: PruneContext = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "macs": int(self.cost.macs), "params": int(self.cost.params),
            "cost_shape": {k: list(v) for k, v in self.cost.input_shape.items()},
            "groups": [g.to_dict() | {"nodes": g.nodes} for g in self.groups],
            "pinned": [{"tensor": p.tensor, "axis": p.axis, "channels": p.count, "reason": p.reason}
                       for p in self.pinned],
            "macs_per_node": {k: int(v) for k, v in self.cost.per_node.items()},
            "warnings": list(self.context.report.get("warnings", [])),
        }


def _context(model, registry, options, progress) -> PruneContext:
    m = Model.load(model)
    original = m.copy()
    ctx = PruneContext(model=m, original=original,
                       registry=(registry.copy() if registry is not None else default_registry()),
                       options=options, progress=Progress(progress))
    if m.meta.warnings:  # what onnx.checker says about the input (graphprune/wellformed.py)
        ctx.report.setdefault("warnings", []).extend(m.meta.warnings)
    return ctx


def prune(model: "str | os.PathLike | onnx.ModelProto", target_flops: float | None = None, *,
          registry: OpRuleRegistry | None = None, pipeline: PassManager | None = None, **options) -> PruneResult:
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
    ``head_dim`` (prune every head's dimension uniformly; also a keyword of its own).

    Every option, its default and its allowed values are defined once in
    :class:`graphprune.options.PruneOptions`; an unknown keyword is a :class:`BadInputError` that
    names the closest option.
    """
    o = PruneOptions.from_kwargs(target_flops=target_flops, **options)
    if o.depth or o.drop_branches is not None:  # residual branches first, then width (graphprune/depth.py)
        from .depth import prune_with_depth

        return prune_with_depth(model, o, width_prune=prune, result_cls=PruneResult, registry=registry,
                                pipeline=pipeline)
    if o.target_flops is None and o.target_params is None:
        raise BadInputError("give target_flops or target_params (a fraction in (0, 1] to keep)")
    opts = o.context_options()
    calib, progress = o.calib, o.progress
    t0 = time.perf_counter()
    ctx = _context(model, registry, opts, progress)
    if o.shape:  # the given cost shape must fit the input model (a pruned one may differ on channel axes)
        input_shapes(ctx.original, o.shape, strict=True)
    if calib is not None:
        from .calibration import load_calibration

        ctx.options["calibration"] = load_calibration(
            calib, ctx.original.to_proto(infer=False), samples=o.calib_samples, heldout=o.calib_heldout,
            preprocess=o.calib_preprocess, batch_size=o.calib_batch_size, seed=o.seed)
        ctx.report["calibration"] = ctx.options["calibration"].describe()
    elif o.calib_preprocess is not None:
        raise BadInputError("calib_preprocess needs calib (a folder of images)")
    try:
        (pipeline or default_pipeline()).run(ctx)
    finally:
        release_run_copies()  # the scratch copies big models were run from
    ctx.report["prune_seconds"] = time.perf_counter() - t0
    ctx.report["timings"] = dict(ctx.timings)
    ctx.report["groups"] = _group_report(ctx)
    kv = cache_io(ctx.original.graph)
    if kv:
        ctx.report["kv_cache"] = cache_shapes(ctx.original.graph, ctx.model.graph, kv)
    ctx.report["pinned"] = [{"tensor": p.tensor, "axis": p.axis, "channels": p.count, "reason": p.reason}
                            for p in ctx.dependency.pinned]
    if opts["policy"].get("prune_hidden"):
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
            gqa_uniform: bool = False, prune_kv_cache: bool = False, prune_hidden: bool = False,
            head_dim: bool = False, shape=None) -> AnalysisResult:
    """Groups, pinned channels (with reasons) and MACs per layer, without changing anything.
    `shape`: {input: dims} (or NAME:DxD... strings) the MACs are counted at (see cost.input_shapes)."""
    policy = policy_from(policy, gqa_uniform=gqa_uniform, head_dim=head_dim, prune_hidden=prune_hidden,
                         prune_kv_cache=prune_kv_cache)
    shape = PruneOptions.spec("shape").check("shape", shape)
    ctx = _context(model, registry, {"policy": policy or {}, "shape": shape}, False)
    if shape:
        input_shapes(ctx.original, shape, strict=True)
    (pipeline or analysis_pipeline()).run(ctx)
    return AnalysisResult(ctx.groups, ctx.dependency.pinned, model_cost(ctx.model, shape=shape), ctx)
