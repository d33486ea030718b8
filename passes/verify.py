"""Verify: the output passes onnx.checker (full shape inference); costs after; optional oracle."""
from __future__ import annotations

import onnx

from graphprune.cost import model_cost
from graphprune.graph import _without_big_weights
from graphprune.pipeline import Pass, PassResult, PruneContext

__all__ = ["VerifyPass"]

# full_check raises ValidationError for structure and InferenceError for types and shapes
_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


class VerifyPass(Pass):
    name = "verify"

    def call(self, ctx: PruneContext) -> PassResult:
        proto = ctx.model.to_proto()
        if proto.ByteSize() < 2**31 - 1:
            try:  # weights declared as inputs: the same checks without serializing every weight
                onnx.checker.check_model(_without_big_weights(proto)[0], full_check=True)
            except _CHECK_ERRORS as exc:
                # a defect the input already had is reported, not blamed on the rewrite
                try:
                    onnx.checker.check_model(_without_big_weights(ctx.original.to_proto())[0], full_check=True)
                except _CHECK_ERRORS as orig_exc:
                    ctx.report.setdefault("warnings", []).append(
                        f"the input model fails onnx.checker too: {str(orig_exc).splitlines()[0]}")
                else:
                    raise exc
        before, after = model_cost(ctx.original), model_cost(ctx.model)
        ctx.report.update({
            "macs_before": int(before.macs), "macs_after": int(after.macs),
            "params_before": int(before.params), "params_after": int(after.params),
            "macs_ratio": after.macs / before.macs if before.macs else 1.0,
            "params_ratio": after.params / before.params if before.params else 1.0,
        })
        if ctx.option("verify", False):
            from graphprune.verify import check_mask_equivalence

            ctx.report["oracle"] = check_mask_equivalence(ctx.original, proto, ctx.dependency, ctx.plan, ctx.groups)
        return PassResult()
