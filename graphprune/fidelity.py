"""Output fidelity of a pruned model against the original on held-out samples.

Per output: relative error ‖y − ŷ‖ / ‖y‖ over all held-out samples, the mean per-sample
cosine similarity, and for classifier-like outputs ([batch, classes], classes > 1) the
top-1 agreement with the original (and, with 5 classes or more, top-5 agreement: the
original's top-1 class is among the candidate's five highest). The original's outputs
are computed once per run.
"""
from __future__ import annotations

import numpy as np
import onnx

from .activations import run_batches
from .pipeline import Pass, PassResult

__all__ = ["measure_fidelity", "FidelityPass", "summarize"]


def _outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _collect(model: onnx.ModelProto, batches) -> dict[str, list]:
    names = _outputs(model)
    out: dict[str, list] = {n: [] for n in names}
    for values in run_batches(model, names, batches):
        for n in names:
            out[n].append(np.asarray(values[n]))
    return out


def measure_fidelity(reference: "onnx.ModelProto | dict", candidate: onnx.ModelProto, batches) -> dict:
    """Compare `candidate` with `reference` (a model, or its outputs from :func:`reference_outputs`)."""
    batches = list(batches)
    ref = reference if isinstance(reference, dict) else _collect(reference, batches)
    got = _collect(candidate, batches)
    per_output = {}
    for name, ys in ref.items():
        if name not in got:
            continue
        num = den = 0.0
        cos, agree, agree5, total = [], 0, 0, 0
        classifier = True
        for y, yh in zip(ys, got[name]):
            y, yh = np.asarray(y, np.float64), np.asarray(yh, np.float64)
            if y.shape != yh.shape:
                per_output[name] = {"shape_mismatch": [list(y.shape), list(yh.shape)]}
                break
            num += float(((y - yh) ** 2).sum())
            den += float((y ** 2).sum())
            a = y.reshape(y.shape[0], -1) if y.ndim else y.reshape(1, 1)
            b = yh.reshape(a.shape)
            na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
            cos.extend(((a * b).sum(1) / np.maximum(na * nb, 1e-30)).tolist())
            classifier = classifier and y.ndim == 2 and y.shape[1] > 1
            if classifier:
                agree += int((y.argmax(1) == yh.argmax(1)).sum())
                if y.shape[1] >= 5:
                    top5 = np.argpartition(-yh, 4, axis=1)[:, :5]
                    agree5 += int((top5 == y.argmax(1)[:, None]).any(1).sum())
                total += y.shape[0]
        else:
            m = {"rel_err": float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)),
                 "cosine": float(np.mean(cos)) if cos else 1.0, "samples": len(cos)}
            if classifier and total:
                m["top1_agreement"] = agree / total
                if ys[0].shape[1] >= 5:
                    m["top5_agreement"] = agree5 / total
            per_output[name] = m
    return {"outputs": per_output, **summarize(per_output)}


def summarize(per_output: dict) -> dict:
    """Worst case over outputs: max relative error, min cosine, min top-1 agreement."""
    ok = [m for m in per_output.values() if "rel_err" in m]
    if not ok:
        return {"rel_err": float("inf"), "cosine": 0.0}
    out = {"rel_err": max(m["rel_err"] for m in ok), "cosine": min(m["cosine"] for m in ok)}
    top = [m["top1_agreement"] for m in ok if "top1_agreement" in m]
    if top:
        out["top1_agreement"] = min(top)
    top5 = [m["top5_agreement"] for m in ok if "top5_agreement" in m]
    if top5:
        out["top5_agreement"] = min(top5)
    return out


def reference_outputs(ctx, calib) -> dict:
    """The original model's outputs on the held-out batches, computed once per run."""
    cached = ctx.options.get("_reference_outputs")
    if cached is None or cached[0] is not calib:
        cached = (calib, _collect(ctx.original.to_proto(), calib.heldout))
        ctx.options["_reference_outputs"] = cached
    return cached[1]


class FidelityPass(Pass):
    """Records fidelity of the current model under ``report["fidelity"][stage]``.

    Runs when the ``fidelity`` option is set (on by default with calibration data or
    compensation); held-out calibration samples, or synthetic ones without ``--calib``.
    Stage "uncompensated" runs only when compensation follows and is stored as
    ``before_compensation``; the final stage as ``after_compensation`` (or ``pruned``).
    """

    def __init__(self, stage: str = "final", name: str = "fidelity"):
        self.stage = stage
        self.name = name

    def call(self, ctx) -> PassResult:
        if not ctx.option("fidelity", False):
            return PassResult()
        if self.stage == "uncompensated" and (ctx.option("compensate", "none") or "none") == "none":
            return PassResult()
        from .calibration import context_calibration

        calib = context_calibration(ctx)
        if not calib.heldout:
            return PassResult()
        ref = reference_outputs(ctx, calib)
        batches = calib.heldout
        if ctx.plan is not None and getattr(ctx.dependency, "resizable_io", None):
            from .verify_io import io_slices, slice_arrays

            # KV-cache inputs/outputs lost heads: the pruned model reads the kept slices of the
            # cache; the resized outputs are not compared (logits are)
            slices = io_slices(ctx.dependency, ctx.plan.removed_labels(ctx.groups))
            if slices:
                batches = [slice_arrays(b, slices) for b in batches]
                ref = {k: v for k, v in ref.items() if k not in slices}
        metrics = measure_fidelity(ref, ctx.model.to_proto(), batches)
        fid = ctx.report.setdefault("fidelity", {})
        fid.setdefault("heldout_samples", calib.heldout_samples)
        fid.setdefault("data", "synthetic" if calib.synthetic else "held-out calibration samples")
        compensated = (ctx.option("compensate", "none") or "none") != "none"
        key = "before_compensation" if self.stage == "uncompensated" else (
            "after_compensation" if compensated else "pruned")
        fid[key] = metrics
        return PassResult(info={k: v for k, v in metrics.items() if k != "outputs"})
