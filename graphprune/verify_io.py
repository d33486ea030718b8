"""The oracle on graphs whose inputs/outputs change shape (KV-cache pruning).

When heads are pruned with ``prune_kv_cache``, the pruned model takes and returns
smaller cache tensors. The masked original still takes the full cache: its removed
heads may hold any values (every consumer of them is masked), so they are fed random
ones to prove it. The pruned model is fed the kept slices of the same inputs, and its
outputs are compared with the kept slices of the masked original's.
"""
from __future__ import annotations

import numpy as np
import onnx

from .compare import compare_outputs
from .runtime import run_model

__all__ = ["io_slices", "slice_arrays", "compare_sliced"]


def io_slices(dg, removed_labels: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """{graph input/output name: {axis: kept indices}} for every resized graph input/output."""
    names = getattr(dg, "resizable_io", set())
    out: dict[str, dict[int, np.ndarray]] = {}
    for dim, rm in dg.removed_elements(removed_labels).items():
        if dim.tensor in names:
            size = dg.dim_size[dg.dim_index[dim]]
            out.setdefault(dim.tensor, {})[dim.axis] = np.setdiff1d(np.arange(size), rm)
    return out


def slice_arrays(arrays: dict[str, np.ndarray], slices: dict) -> dict[str, np.ndarray]:
    """The kept slices of named arrays (feeds or outputs); others unchanged."""
    out = {}
    for name, a in arrays.items():
        for axis, kept in slices.get(name, {}).items():
            a = np.take(a, kept, axis=axis)
        out[name] = a
    return out


def compare_sliced(masked: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, slices: dict,
                   optimize: bool = True) -> dict:
    """Run the masked original on `feeds` and the pruned model on their kept slices; compare
    the pruned outputs with the kept slices of the masked ones (`optimize`: onnxruntime's
    graph optimisations, off to compare quantized weights in float, unfused)."""
    names = [o.name for o in masked.graph.output]
    want = slice_arrays(dict(zip(names, run_model(masked, feeds, optimize=optimize))), slices)
    pruned_inputs = {i.name for i in pruned.graph.input}
    got = run_model(pruned, {k: v for k, v in slice_arrays(feeds, slices).items() if k in pruned_inputs},
                    optimize=optimize)
    return compare_outputs([want[n] for n in names], got)
