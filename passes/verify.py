"""Verify: the output passes onnx.checker (full shape inference); costs after; optional oracle."""
from __future__ import annotations

import onnx

from graphprune.cost import model_cost
from graphprune.model_io import check_model
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["VerifyPass"]

# full_check raises ValidationError for structure and InferenceError for types and shapes
_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


class VerifyPass(Pass):
    name = "verify"

    def call(self, ctx: PruneContext) -> PassResult:
        proto = ctx.model.to_proto()
        try:  # weights declared as inputs: the same checks without serializing any weight
            check_model(proto, full_check=True)
        except _CHECK_ERRORS as exc:
            # a defect the input already had is reported, not blamed on the rewrite
            try:
                check_model(ctx.original.to_proto(materialize_data=False), full_check=True)
            except _CHECK_ERRORS as orig_exc:
                warnings = ctx.report.setdefault("warnings", [])
                if not any("fails onnx.checker" in w for w in warnings):  # said once (on load, or here)
                    warnings.append(f"the input model fails onnx.checker too: {str(orig_exc).splitlines()[0]}")
            else:
                raise exc
        shape = ctx.option("shape", None)
        before, after = model_cost(ctx.original, shape=shape), model_cost(ctx.model, shape=shape)
        ctx.report.update({
            "macs_before": int(before.macs), "macs_after": int(after.macs),
            "params_before": int(before.params), "params_after": int(after.params),
            "macs_ratio": after.macs / before.macs if before.macs else 1.0,
            "params_ratio": after.params / before.params if before.params else 1.0,
            "cost_shape": {k: list(v) for k, v in before.input_shape.items()},
        })
        for note in dict.fromkeys(n for n in (before.note, after.note) if n):
            ctx.report.setdefault("warnings", []).append(note)
        if ctx.option("verify", False):
            from graphprune.runtime import load_verify_inputs
            from graphprune.verify import check_mask_equivalence

            given = ctx.option("verify_inputs", None)
            feeds = None if given is None else load_verify_inputs(given, ctx.original.to_proto(infer=False,
                                                                                               materialize_data=False))
            ctx.report["oracle"] = check_mask_equivalence(ctx.original, proto, ctx.dependency, ctx.plan, ctx.groups,
                                                          feeds=feeds)
        return PassResult()
