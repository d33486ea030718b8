"""The mask-equivalence oracle and output fidelity checks (onnxruntime)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .dependency import DependencyGraph, Dim
from .compare import compare_outputs
from .graph import Model
from .oprules.quant import QUANTIZED_OPS, bypass_activation_qdq, exact_integer_matmuls
from .quantized import zero_fill
from .roles import ROLE_OUT, ROLE_PARAM, ROLE_REDUCE
from .runtime import run_model, synthetic_inputs

NOISE_FACTOR = 4.0  # an oracle error within this factor of float32 reordering noise passes

__all__ = ["masked_model", "check_mask_equivalence", "compare_outputs"]


def masked_model(original: Model, dg: DependencyGraph, removed_labels: np.ndarray,
                 zero_producers: bool = True) -> onnx.ModelProto:
    """The original graph with the removed channels zeroed in every consumer.

    Consumers are the weight axes that reduce over channels (Conv/Gemm/MatMul input
    columns); zeroing them removes the channels' contribution and nothing else. The
    channels' producer rows and per-channel parameters are zeroed too, which changes
    nothing downstream of a zeroed consumer and makes a removed head-dimension element
    contribute nothing to an activation x activation contraction (Q.K^T).

    Zeroing is not enough where an op takes statistics over an axis that loses elements
    (hidden-width pruning: LayerNorm/RMSNorm, or the ReduceMean of a decomposed norm): the
    pruned op averages over the D' kept channels, not over D. Such nodes (the op rules mark
    their statistics axes, see ``RuleContext.statistics``) run in the reference on the kept
    elements only: every input axis that loses elements is gathered to the kept ones, and
    every output axis that loses elements is scattered back to its full width with zeros at
    the removed positions. Gather and Where are exact, so the oracle stays exact.

    `zero_producers=False` zeroes the consumers only (the oracle's definition): the reference
    when zeroing producers makes NaN (a removed channel that turns constant divides 0 by 0 in a
    normalisation, a zeroed divisor) that the consumers' zeros would not remove (0 x NaN = NaN).
    """
    proto = original.to_proto(infer=False)
    model = Model.from_proto(proto, original.meta)
    tensors = model.graph.tensors()
    removed = dg.removed_elements(removed_labels)
    for dim, idx in removed.items():
        d = dg.dim_index[dim]
        if dg.dim_role.get(d) not in ((ROLE_REDUCE, ROLE_OUT, ROLE_PARAM) if zero_producers else (ROLE_REDUCE,)):
            continue
        t = tensors[dim.tensor]
        if not isinstance(t, gs.Constant):
            continue
        model.store(t, zero_fill(t, dim.axis, idx))  # 0, or the zero point of a quantized weight
    _restrict_statistics(model, dg, removed)
    return model.to_proto(infer=False)


def _restrict_statistics(model: Model, dg: DependencyGraph, removed: dict) -> None:
    """Nodes whose statistics axes lose elements compute over the kept elements only."""
    flagged = {key for key, dims in dg.stat_axes.items() if any(dg.dims[d] in removed for d in dims)}
    if not flagged:
        return
    graph = model.graph
    names = set(graph.tensors())
    counter = iter(range(1 << 62))

    def fresh(base: str) -> str:
        while True:
            name = f"{base}_gpmask{next(counter)}"
            if name not in names:
                names.add(name)
                return name

    lost: dict[str, list] = {}  # tensor -> [(axis, original size, kept indices)]
    for dim, idx in sorted(removed.items(), key=lambda kv: (kv[0].tensor, kv[0].axis)):
        size = dg.dim_size[dg.dim_index[dim]]
        lost.setdefault(dim.tensor, []).append((dim.axis, size, np.setdiff1d(np.arange(size), idx)))

    for node in list(graph.nodes):
        if not node.outputs or node.outputs[0].name not in flagged:
            continue
        for i, t in enumerate(list(node.inputs)):
            for k, _, kept in lost.get(t.name, ()) if t.name else ():
                if isinstance(t, gs.Constant):
                    t = gs.Constant(fresh(t.name), np.ascontiguousarray(np.take(np.asarray(t.values), kept, axis=k)))
                else:
                    small = gs.Variable(fresh(t.name), dtype=t.dtype)
                    graph.nodes.append(gs.Node("Gather", name=fresh(f"{node.name}_keep"), attrs={"axis": k},
                                               inputs=[t, gs.Constant(fresh("kept"), kept.astype(np.int64))],
                                               outputs=[small]))
                    t = small
            node.inputs[i] = t
        for j, out in enumerate(list(node.outputs)):
            axes = lost.get(out.name, []) if out.name else []
            if not axes:
                continue
            rank = len(out.shape if out.shape is not None else dg.tensor(out.name).shape)
            small = gs.Variable(fresh(out.name), dtype=out.dtype)
            node.outputs[j] = small
            for n, (k, size, kept) in enumerate(axes):
                last = n == len(axes) - 1
                position = np.zeros(size, np.int64)
                position[kept] = np.arange(len(kept))
                mask_shape = [1] * rank
                mask_shape[k] = size
                mask = np.zeros(size, bool)
                mask[kept] = True
                spread = gs.Variable(fresh(out.name), dtype=out.dtype)
                full = out if last else gs.Variable(fresh(out.name), dtype=out.dtype)
                zero = np.zeros((), dtype=out.dtype if out.dtype is not None else np.float32)
                graph.nodes.append(gs.Node("Gather", name=fresh(f"{node.name}_spread"), attrs={"axis": k},
                                           inputs=[small, gs.Constant(fresh("position"), position)],
                                           outputs=[spread]))
                graph.nodes.append(gs.Node("Where", name=fresh(f"{node.name}_scatter"),
                                           inputs=[gs.Constant(fresh("kept_mask"), mask.reshape(mask_shape)),
                                                   spread, gs.Constant(fresh("zero"), zero)],
                                           outputs=[full]))
                small = full
    graph.toposort()


# sizes tried for the dynamic non-batch axes: 8 first (cheap); where an input has dynamic spatial
# axes (detectors and other fully convolutional nets need a multiple of their total stride: 8x8
# images collapse to 1x1 before an upsample+concat) larger sizes follow when the original fails
SYNTHETIC_SIZES = (8, 64, 256, 640)


def _original_runs(original: Model, masked: onnx.ModelProto, batch: int, seed: int,
                   sizes=SYNTHETIC_SIZES) -> tuple[dict, int]:
    """The oracle needs the *original* to run on synthetic inputs: try each size for the dynamic
    non-batch axes and return the first feeds it runs on (and that size); say so in one line
    when none works (e.g. an export that only runs at the sequence length it was traced with)."""
    proto = original.to_proto(infer=False)
    for attempt, size in enumerate(sizes):
        feeds = synthetic_inputs(masked, batch=batch, seq=size, seed=seed)
        try:
            outputs = run_model(proto, feeds)
        except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            if attempt + 1 < len(sizes) and _has_dynamic_spatial_axes(masked):
                continue
            from .errors import BadInputError

            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"--verify: the original model itself does not run on synthetic inputs ({shapes}; "
                                f"batch {batch}, other dynamic axes {size}): {msg[:300]}") from None
        _refuse_nonfinite(proto, outputs, f"synthetic inputs (batch {batch})")
        return feeds, size


def _refuse_nonfinite(proto: onnx.ModelProto, outputs: list, where: str) -> None:
    """NaN is never agreement: an original whose outputs hold NaN/Inf cannot be checked (one line)."""
    from .compare import nonfinite_outputs
    from .errors import BadInputError

    bad = nonfinite_outputs([o.name for o in proto.graph.output], outputs)
    if bad:
        raise BadInputError(f"--verify: the original model's outputs hold NaN/Inf on {where}: {', '.join(bad[:3])}; "
                            f"NaN never counts as agreement, so the oracle cannot check this model")


def _has_dynamic_spatial_axes(model: onnx.ModelProto) -> bool:
    """Whether some graph input has a dynamic spatial axis (axis 2 or later: H/W, audio time);
    a dynamic sequence (axis 1) stays at 8, larger sizes would only slow a large model down."""
    init = {t.name for t in model.graph.initializer}
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for vi in model.graph.input if vi.name not in init
               for d in list(vi.type.tensor_type.shape.dim)[2:])


def _check_at_scale(masked: onnx.ModelProto, pruned: onnx.ModelProto, slices: dict, seed: int, rtol: float,
                     size: int) -> dict:
    """The oracle for a big model: one batch at one short sequence; the masked original, then
    the pruned model, each run by onnxruntime from a scratch copy of its weights, one
    session at a time (never both models in memory). The peak is onnxruntime's own: about the
    model's size, more where it materialises a weight's transpose (a tied embedding)."""
    from .errors import BadInputError
    from .model_io import session_payload
    from .verify_io import slice_arrays

    feeds = synthetic_inputs(masked, batch=1, seq=size, seed=seed + 1)
    names = [o.name for o in masked.graph.output]
    try:  # each session is released when run_model returns
        want = slice_arrays(dict(zip(names, run_model(session_payload(masked)[0], feeds))), slices)
    except Exception as exc:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"--verify: the original model itself does not run on synthetic inputs ({shapes}): "
                            f"{msg[:300]}") from None
    pruned_inputs = {i.name for i in pruned.graph.input}
    got = run_model(session_payload(pruned)[0],
                    {k: v for k, v in slice_arrays(feeds, slices).items() if k in pruned_inputs})
    cmp = compare_outputs([want[n] for n in names], got)
    return {"batch1": cmp, "at_scale": f"big model: one batch at sequence {size}, models run one at a time",
            "equivalent": bool(cmp["max_rel"] <= rtol)}


def _comparable(masked: onnx.ModelProto, pruned: onnx.ModelProto, results: dict) -> tuple:
    """(masked, pruned, optimize) as the oracle runs them: quantized arithmetic compared in float or
    exactly, where the masked reference's extra nodes would change what onnxruntime fuses."""
    float_masked = bypass_activation_qdq(masked)
    # quantized models run unfused: onnxruntime's fusions (QDQ -> integer kernels, DynamicQuantizeLinear
    # + MatMulInteger -> DynamicQuantizeMatMul) quantize differently where the masked reference's extra
    # Gather/Where nodes stop a fusion
    optimize = not any(n.op_type in QUANTIZED_OPS for n in masked.graph.node)
    if float_masked is not masked:  # fake-quantized activations: compare without their rounding
        masked, pruned = float_masked, bypass_activation_qdq(pruned)
        results["quantized_activations"] = "compared without activation Q/DQ rounding"
    from .oprules.nbits import float_activation_nbits

    if float_activation_nbits(masked) is not masked:  # MatMulNBits' on-the-fly int8 activations: compare in float
        masked, pruned = float_activation_nbits(masked), float_activation_nbits(pruned)
        results["quantized_activations"] = "MatMulNBits compared with float activations (accuracy_level 0)"
    exact_masked = exact_integer_matmuls(masked)
    if exact_masked is not masked:  # integer matmuls: exact arithmetic, not saturating kernels
        masked, pruned = exact_masked, exact_integer_matmuls(pruned)
        results["quantized_activations"] = "integer matmuls compared in exact arithmetic"
    return masked, pruned, optimize


def check_mask_equivalence(original: Model, pruned: onnx.ModelProto, dg: DependencyGraph, plan, groups,
                           batches=(1, 5), seed: int = 0, rtol: float = 1e-4, sizes=SYNTHETIC_SIZES,
                           feeds: dict | None = None) -> dict:
    """Run masked original and pruned model on the same inputs; report the worst error.

    `feeds` (the user's inputs, --verify-inputs) replace the synthetic ones: one run, reported as
    "inputs"."""
    labels = plan.removed_labels(groups)
    masked = masked_model(original, dg, labels)
    results = {}
    ok = True
    from .verify_io import compare_sliced, io_slices

    slices = io_slices(dg, labels)  # resized KV-cache inputs/outputs: the pruned model sees kept slices
    if original.meta.big:
        return _check_at_scale(masked, pruned, slices, seed, rtol, sizes[0])
    masked, pruned_cmp, optimize = _comparable(masked, pruned, results)
    given = feeds
    if given is not None:  # the user's inputs: the original must give numbers on them
        proto = original.to_proto(infer=False)
        _refuse_nonfinite(proto, run_model(proto, given), "the --verify-inputs arrays")
    for b in (["inputs"] if given is not None else batches):
        if given is None:
            feeds, size = _original_runs(original, masked, b, seed + b, sizes)
            sizes = (size,)  # the other batches use the size that ran
        cmp = compare_sliced(masked, pruned_cmp, feeds, slices, optimize=optimize)
        if cmp.get("nonfinite") and "reference" not in results:  # NaN the masking made? (the original is finite)
            ref, ref_pruned, ref_opt = _comparable(masked_model(original, dg, labels, zero_producers=False), pruned,
                                                   {})
            again = compare_sliced(ref, ref_pruned, feeds, slices, optimize=ref_opt)
            if not again.get("nonfinite"):
                masked, pruned_cmp, optimize, cmp = ref, ref_pruned, ref_opt, again
                results["reference"] = ("consumers zeroed only: zeroing the removed channels' producers too made "
                                        "NaN/Inf in the masked original")
        if cmp["max_rel"] > rtol and np.isfinite(cmp["max_rel"]):
            # some graphs are ill-conditioned in float32 (saturated sigmoids, deep nets with large
            # activations): measure the masked original against itself with onnxruntime's graph
            # optimisations off (a different float summation order) and accept errors within
            # NOISE_FACTOR of that floor, saying so
            noise = compare_outputs(run_model(masked, feeds), run_model(masked, feeds, optimize=False))["max_rel"]
            cmp["noise_floor"] = noise
            cmp["within_noise"] = bool(cmp["max_rel"] <= NOISE_FACTOR * noise)
        results[f"batch{b}" if given is None else "inputs"] = cmp
        ok = ok and (cmp["max_rel"] <= rtol or cmp.get("within_noise", False))
    results["equivalent"] = ok
    return results
