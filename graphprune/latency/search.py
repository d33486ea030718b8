"""Pruning to a measured latency target: the FLOPs-target search (secant steps inside a bisection bracket),
and latency-vs-FLOPs sweeps."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx

from ..backends import Backend
from ..bench import DEFAULT_RUNS, DEFAULT_SEQ, DEFAULT_WARMUP, feeds_for, time_sessions
from ..errors import BadInputError, NothingToPruneError
from ..options import check_ratio, policy_from
from ..pipeline import PassManager
from .round_pass import LatencyRoundPass
from .table import build_latency_table, LatencyTable, _log, _MIN_KEEP, _resolve_backend, _ROUND_TO

__all__ = ["prune_to_latency", "latency_vs_flops", "measure_ratio"]


def measure_ratio(backend: Backend, original_session, model, feeds: dict, runs: int, warmup: int) -> dict:
    """Median latency of `model` and of the original (interleaved runs) and their ratio."""
    sess = backend.load(model, feeds)
    try:
        t_orig, t_new = time_sessions([original_session, sess], runs, warmup)
    finally:
        sess.close()
    orig, new = float(np.median(t_orig)), float(np.median(t_new))
    return {"original_ms": orig, "pruned_ms": new, "ratio": new / orig if orig > 0 else float("nan")}


def _pipeline_with(table: LatencyTable | None, pipeline: PassManager | None, window: float) -> PassManager | None:
    if table is None:
        return pipeline
    from ..api import default_pipeline

    pm = PassManager(list(pipeline.passes)) if pipeline is not None else default_pipeline()
    pm.insert_after("allocate", LatencyRoundPass(table, window))
    return pm


def _kept(report: dict) -> dict:
    return {g["id"]: g["kept"] for g in report.get("groups", [])}


def prune_to_latency(model, target_latency: float, backend: "str | Backend" = "auto", *, runs: int = DEFAULT_RUNS,
                     warmup: int = DEFAULT_WARMUP, threads: int = 0, batch: int = 1, shapes: dict | None = None,
                     seq: int = DEFAULT_SEQ, fp16: bool = False, use_lut: bool = True, lut_counts: int = 12,
                     lut_runs: int = 10, window: float = 0.125, max_steps: int = 8, flops_tolerance: float = 0.01,
                     cache: bool = True, cache_dir: "str | os.PathLike | None" = None,
                     log: Callable[[str], None] | None = None, **prune_kwargs):
    """Prune `model` until its measured latency on `backend` is at most `target_latency` x the original's.

    Searches the FLOPs target (keeping as much as the latency budget allows), with the
    latency table's rounding when `use_lut`; every candidate is measured against the
    original on the same backend (interleaved runs). `prune_kwargs` go to
    :func:`graphprune.prune` (criterion, round_to, min_keep, protect, ...; not the targets).
    Returns the :class:`graphprune.PruneResult`; ``report["latency"]`` holds the backend, the
    measured original/pruned latency, ``measured_ratio`` beside ``macs_ratio``, the LUT's
    prediction and every point of the search. Raises :class:`NothingToPruneError` when no
    FLOPs target reaches the latency target.
    """
    from ..api import prune
    from ..model_io import load_model

    try:
        target = float(target_latency)
    except (TypeError, ValueError):
        raise BadInputError(f"target_latency must be a number in (0, 1], got {target_latency!r}") from None
    if check_ratio(target):
        raise BadInputError(f"target_latency must be in (0, 1] (the fraction of the original latency), got {target}")
    for key in ("target_flops", "target_params"):
        if prune_kwargs.get(key) is not None:
            raise BadInputError(f"prune_to_latency chooses {key} itself; give only target_latency")
        prune_kwargs.pop(key, None)
    if int(max_steps) < 1:
        raise BadInputError(f"max_steps must be >= 1, got {max_steps}")
    bk = _resolve_backend(backend, threads, fp16, log)
    proto, _ = load_model(model)
    source = model if not isinstance(model, onnx.ModelProto) else proto
    feeds = feeds_for(proto, batch=batch, shapes=shapes, seq=seq)
    table = None
    if use_lut:
        table = build_latency_table(source, bk, batch=batch, shapes=shapes, seq=seq,
                                    round_to=prune_kwargs.get("round_to", _ROUND_TO),
                                    min_keep=prune_kwargs.get("min_keep", _MIN_KEEP),
                                    max_counts=lut_counts, runs=lut_runs, cache=cache, cache_dir=cache_dir,
                                    registry=prune_kwargs.get("registry"),
                                    policy=policy_from(prune_kwargs.get("policy"),
                                                       **{k: prune_kwargs.get(k)
                                                          for k in ("head_dim", "prune_kv_cache", "prune_hidden")}),
                                    gqa_uniform=prune_kwargs.get("gqa_uniform", False), log=log)
    pipeline = _pipeline_with(table, prune_kwargs.pop("pipeline", None), window)
    original = bk.load(source, feeds)
    points: list[dict] = []
    results: dict[float, object] = {}

    def evaluate(f: float):
        res = prune(source, target_flops=f, pipeline=pipeline, **prune_kwargs)
        m = measure_ratio(bk, original, res.model, feeds, runs, warmup)
        point = {"target_flops": round(f, 6), "macs_ratio": res.report["macs_ratio"], "latency_ratio": m["ratio"],
                 "original_ms": m["original_ms"], "pruned_ms": m["pruned_ms"]}
        points.append(point)
        results[f] = res
        _log(log, f"target-latency search: target_flops {f:.3f} -> MACs {res.report['macs_ratio']:.3f}, "
                  f"latency {m['ratio']:.3f}")
        return m["ratio"]

    try:
        lo: tuple | None = None           # (f, ratio) largest f known to meet the target
        hi: tuple = (1.0, 1.0)            # smallest f known to miss it (f = 1 is the original)
        floor = 0.0                       # FLOPs targets at or below this cannot be reached
        f = min(1.0, target)
        for _ in range(int(max_steps)):
            try:
                ratio = evaluate(f)
            except NothingToPruneError:
                floor = max(floor, f)
                if lo is not None or hi[0] - floor < flops_tolerance:
                    break
                f = (floor + hi[0]) / 2
                continue
            if ratio <= target:
                lo = (f, ratio) if lo is None or f > lo[0] else lo
            elif f < hi[0]:
                hi = (f, ratio)
            if target >= 1.0 and lo is not None:
                break
            f = _next_flops(lo, hi, floor, target)
            if f is None or (lo is not None and hi[0] - lo[0] < flops_tolerance):
                break
        if lo is None:
            best = min(points, key=lambda p: p["latency_ratio"]) if points else None
            where = (f"; the fastest measured was {best['latency_ratio']:.3f} at target_flops {best['target_flops']}"
                     if best else "")
            raise NothingToPruneError(f"cannot reach latency target {target:.3f} on {bk.label}{where} "
                                      "(pinned channels, min-keep and protected layers limit it)")
        # confirm with twice the runs; when noise made a candidate look faster than it is, the
        # next passing one (fewer FLOPs) gets its turn, up to three in all
        passing = sorted((p["target_flops"] for p in points if p["latency_ratio"] <= target), reverse=True)
        for f_ok in passing[:3]:
            f_key = min(results, key=lambda k: abs(k - f_ok))
            chosen, chosen_f = results[f_key], f_key
            final = measure_ratio(bk, original, chosen.model, feeds, 2 * int(runs), warmup)
            if final["ratio"] <= target:
                break
    finally:
        original.close()
    report = chosen.report
    kept = _kept(report)
    predicted = None
    if table is not None:
        predicted = table.predicted_ratio(kept, final["original_ms"])
    report["latency"] = {
        "backend": bk.name, "backend_label": bk.label, "note": bk.note, "target": target,
        "inputs": {k: list(v.shape) for k, v in feeds.items()}, "runs": 2 * int(runs),
        "original_ms": final["original_ms"], "pruned_ms": final["pruned_ms"], "measured_ratio": final["ratio"],
        "speedup": 1.0 / final["ratio"] if final["ratio"] > 0 else float("inf"), "met": final["ratio"] <= target,
        "macs_ratio": report["macs_ratio"], "target_flops": chosen_f, "lut_predicted_ratio": predicted,
        "lut": None if table is None else {"path": table.path, "cache_hit": table.cache_hit,
                                           "groups": len(table.groups), "backend": table.backend},
        "search": sorted(points, key=lambda p: -p["target_flops"]),
    }
    return chosen


def _next_flops(lo, hi, floor: float, target: float) -> float | None:
    """Next FLOPs target: secant between the bracket ends, kept away from them."""
    hf, hr = hi
    if lo is None:  # extrapolate down along the line through (1, 1) and hi
        slope = (1.0 - hr) / (1.0 - hf) if hf < 1.0 else 1.0
        slope = max(slope, 0.2)
        f = hf - (hr - target) / slope
        f = min(max(f, 0.3 * hf, floor + 0.5 * (hf - floor)), 0.95 * hf)
        return f if f > 0 else None
    lf, lr = lo
    width = hf - lf
    if width <= 0:
        return None
    f = lf + (target - lr) * width / (hr - lr) if hr > lr else lf + width / 2
    return min(max(f, lf + 0.2 * width), hf - 0.2 * width)


def latency_vs_flops(model, targets=(1.0, 0.75, 0.5, 0.35, 0.25), backend: "str | Backend" = "auto", *,
                     runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, threads: int = 0, batch: int = 1, shapes: dict | None = None,
                     seq: int = DEFAULT_SEQ, fp16: bool = False, log: Callable[[str], None] | None = None,
                     **prune_kwargs) -> list[dict]:
    """Prune at each FLOPs target and measure it against the original: the points of the
    "latency vs FLOPs" plot ({"target_flops", "macs_ratio", "latency_ratio", ...}); a target
    that cannot be reached gets an "error" instead."""
    from ..api import prune
    from ..model_io import load_model

    bk = _resolve_backend(backend, threads, fp16, log)
    proto, _ = load_model(model)
    source = model if not isinstance(model, onnx.ModelProto) else proto
    feeds = feeds_for(proto, batch=batch, shapes=shapes, seq=seq)
    original = bk.load(source, feeds)
    points = []
    try:
        for f in targets:
            try:
                res = prune(source, target_flops=f, **prune_kwargs)
            except NothingToPruneError as exc:
                points.append({"target_flops": f, "error": str(exc)})
                continue
            m = measure_ratio(bk, original, res.model, feeds, runs, warmup)
            points.append({"target_flops": f, "macs_ratio": res.report["macs_ratio"], "latency_ratio": m["ratio"],
                           "original_ms": m["original_ms"], "pruned_ms": m["pruned_ms"], "backend": bk.name})
            _log(log, f"target_flops {f}: MACs {res.report['macs_ratio']:.3f}, latency {m['ratio']:.3f}")
    finally:
        original.close()
    return points
