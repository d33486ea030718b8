"""The mask-equivalence oracle and output fidelity checks (onnxruntime)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .dependency import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE, DependencyGraph
from .graph import Model
from .runtime import run_model, synthetic_inputs

__all__ = ["masked_model", "check_mask_equivalence", "compare_outputs"]


def masked_model(original: Model, dg: DependencyGraph, removed_labels: np.ndarray) -> onnx.ModelProto:
    """The original graph with the removed channels zeroed in every consumer.

    Consumers are the weight axes that reduce over channels (Conv/Gemm/MatMul input
    columns); zeroing them removes the channels' contribution and nothing else. The
    channels' producer rows and per-channel parameters are zeroed too, which changes
    nothing downstream of a zeroed consumer and makes a removed head-dimension element
    contribute nothing to an activation x activation contraction (Q.K^T).
    """
    proto = original.to_proto(infer=False)
    model = Model.from_proto(proto, original.meta)
    tensors = model.graph.tensors()
    for dim, idx in dg.removed_elements(removed_labels).items():
        d = dg.dim_index[dim]
        if dg.dim_role.get(d) not in (ROLE_REDUCE, ROLE_OUT, ROLE_PARAM):
            continue
        t = tensors[dim.tensor]
        if not isinstance(t, gs.Constant):
            continue
        values = np.array(t.values, copy=True)
        sl = [slice(None)] * values.ndim
        sl[dim.axis] = idx
        values[tuple(sl)] = 0
        t.values = values
        t.data_location = None
    return model.to_proto(infer=False)


def compare_outputs(a: list, b: list) -> dict:
    worst_abs, worst_rel = 0.0, 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "shape_mismatch": [list(x.shape), list(y.shape)]}
        diff = np.abs(x - y)
        worst_abs = max(worst_abs, float(diff.max(initial=0)))
        worst_rel = max(worst_rel, float(diff.max(initial=0) / (np.abs(x).max(initial=0) + 1e-12)))
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def check_mask_equivalence(original: Model, pruned: onnx.ModelProto, dg: DependencyGraph, plan, groups,
                           batches=(1, 3), seed: int = 0, rtol: float = 1e-4) -> dict:
    """Run masked original and pruned model on the same inputs; report the worst error."""
    labels = plan.removed_labels(groups)
    masked = masked_model(original, dg, labels)
    results = {}
    ok = True
    from .verify_io import compare_sliced, io_slices

    slices = io_slices(dg, labels)  # resized KV-cache inputs/outputs: the pruned model sees kept slices
    for b in batches:
        feeds = synthetic_inputs(masked, batch=b, seed=seed + b)
        cmp = compare_sliced(masked, pruned, feeds, slices)
        results[f"batch{b}"] = cmp
        ok = ok and cmp["max_rel"] <= rtol
    results["equivalent"] = ok
    return results
