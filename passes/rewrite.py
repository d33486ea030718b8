"""Rewrite: emit the physically smaller graph for a plan."""
from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.graph import tensor_shape
from graphprune.oprules import RewriteContext
from graphprune.pipeline import Pass, PassResult, PruneContext
from graphprune.shape_eval import ShapeEvaluator

__all__ = ["RewritePass", "apply_plan"]


def kept_indices(dg, removed_labels: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    kept = {}
    for dim, rm in dg.removed_elements(removed_labels).items():
        size = dg.dim_size[dg.dim_index[dim]]
        kept[(dim.tensor, dim.axis)] = np.setdiff1d(np.arange(size), rm)
    return kept


def apply_plan(ctx: PruneContext) -> dict[tuple[str, int], np.ndarray]:
    """Slice weights, fix attributes and shape constants; returns the kept indices used."""
    dg, model = ctx.dependency, ctx.model
    graph = model.graph
    labels = ctx.plan.removed_labels(ctx.groups)
    kept = kept_indices(dg, labels)
    model.shapes.runs  # build the shape evaluator on the original graph
    folded = {(dg.dims[d].tensor, dg.dims[d].axis): f[1] for d, f in getattr(dg, "dim_fold", {}).items()}
    tensors = graph.tensors()
    orig_shapes = {name: tensor_shape(t) for name, t in tensors.items()}
    used = set(tensors)
    counter = itertools.count()
    # shape sub-graphs as they run after the rewrite: Shape of a pruned tensor reads the kept sizes
    resize = {}
    for (n, a), idx in kept.items():
        size = folded.get((n, a)) or (orig_shapes.get(n) or [None] * (a + 1))[a]
        if isinstance(size, int) and size > 0:
            resize[(n, a)] = (len(idx), size)
    after = ShapeEvaluator(graph, model.meta.opset_imports, resize=resize)

    def namer(base: str) -> str:
        while True:
            name = f"{base}_gp{next(counter)}"
            if name not in used:
                used.add(name)
                return name

    changed = {name for name, _axis in kept}
    for node in list(graph.nodes):
        rule = ctx.registry.lookup(node.domain or "", node.op, model.opset)
        names = [t.name for t in (*node.inputs, *node.outputs) if t.name]
        if any(orig_shapes.get(n) is None for n in names) and not any(n in changed for n in names):
            continue  # a tensor of unknown shape: the analysis pinned the node, nothing of it changed
        if rule is not None:
            rule.rewrite(RewriteContext(node, kept, orig_shapes, graph, namer, model.opset, model.value,
                                        folded, model.shapes.runs, runs_after=after.runs))
    by_tensor: dict[str, list] = {}
    for (name, axis), idx in kept.items():
        by_tensor.setdefault(name, []).append((axis, idx))
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    io -= getattr(dg, "resizable_io", set())  # KV-cache inputs/outputs (prune_kv_cache) take the new sizes
    bar = ctx.progress.bar(len(by_tensor), "rewrite: slicing weights")
    for name, axes in by_tensor.items():
        t = tensors[name]
        if isinstance(t, gs.Constant):
            values = np.asarray(t.values)
            for axis, idx in axes:
                values = np.take(values, idx, axis=axis)
            model.store(t, values)  # inline, or spilled to a scratch file in a big model
        elif name in io:
            raise AssertionError(f"graph input/output {name} would change shape")
        bar.update()
    bar.close()
    # intermediate shapes follow the kept counts (shape inference re-checks them; ops it cannot
    # see through, such as custom ones, keep correct shapes this way)
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in io:
            shape = orig_shapes.get(t.name)
            if shape is None:
                continue
            # a folded axis (dynamic x units) stays dynamic: its size is left to shape inference
            t.shape = [(None if (t.name, k) in folded else len(kept[(t.name, k)])) if (t.name, k) in kept else d
                       for k, d in enumerate(shape)]
    return kept


class RewritePass(Pass):
    name = "rewrite"
    requires = ("plan", "dependency")

    def call(self, ctx: PruneContext) -> PassResult:
        kept = apply_plan(ctx)
        ctx.report["changed_axes"] = len(kept)
        return PassResult(modified=bool(kept))
