"""Intermediate targets for ``--recover``: which activations of the original to match, and at
which of their channels.

A pruned activation keeps a subset of the original's channels, in order. Matching the teacher's
tensor at the kept channels against the student's tensor gives a dense training signal at every
anchor (the logits alone give one number per class per sample). Anchors are chosen by a general
rule, on the original graph:

- outputs of normalisation nodes (LayerNorm and kin: a transformer's residual stream);
- residual joins: an ``Add``/``Sum`` of two activations of the same inferred shape, one of them the
  output of a weighted node (Conv/Gemm/MatMul: the branch), unless its only consumer is a
  normalisation node (whose output is an anchor already);
- the input of a global pooling node (the last feature map of a CNN);

present by name in the pruned graph and not a graph output, ordered by depth and capped at
:data:`MAX_ANCHORS`, spread evenly over depth (the last one always kept).

Kept channels come from the pruning plan where there is one (``ctx.plan``, ``ctx.groups``,
``ctx.dependency``: the removed element indices of every activation dimension). Where there is
none (``graphprune.recover`` on a model pruned earlier) they are recovered from the activations
themselves: kept channels are an increasing subsequence of the original's, so the alignment that
maximises the summed per-channel correlation is found exactly by dynamic programming.
"""
from __future__ import annotations

import numpy as np
import onnx

from graphprune.op_families import GLOBAL_POOL_OPS as _GLOBAL_POOLS
from graphprune.op_families import NORM_OPS
from graphprune.op_families import WEIGHTED_OPS as _WEIGHTED

__all__ = ["MAX_ANCHORS", "NORM_OPS", "anchor_tensors", "plan_kept_channels", "align_channels",
           "infer_kept_channels", "select_kept"]

MAX_ANCHORS = 16
MIN_ALIGN_CORRELATION = 0.5   # an inferred alignment below this mean correlation is not trusted


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:   # noqa: BLE001 - shapes only sharpen the residual-join rule
        inferred = proto
    out = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                                 for d in t.shape.dim)
    return out


def anchor_tensors(original: onnx.ModelProto, pruned: onnx.ModelProto, cap: int = MAX_ANCHORS) -> list[str]:
    """Names of the original's activations to match (see the module docstring), shallow to deep."""
    g = original.graph
    consts = {t.name for t in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    producer = {o: n.op_type for n in g.node for o in n.output}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shapes = None
    picked: dict[str, int] = {}
    for depth, n in enumerate(g.node):
        if n.op_type in NORM_OPS and n.output and n.output[0]:
            picked[n.output[0]] = depth
        elif n.op_type in _GLOBAL_POOLS and n.input and n.input[0]:
            picked.setdefault(n.input[0], depth)
        elif n.op_type in ("Add", "Sum") and len(n.input) == 2 and not (set(n.input) & consts) and n.output:
            users = consumers.get(n.output[0], [])
            if (users and all(u.op_type in NORM_OPS for u in users)) or \
                    not any(producer.get(i) in _WEIGHTED for i in n.input):
                continue
            if shapes is None:
                shapes = _shapes(original)
            a, b = (shapes.get(i) for i in n.input)
            if a is not None and a == b and None not in a:
                picked[n.output[0]] = depth
    present = {o for n in pruned.graph.node for o in n.output}
    outputs = {o.name for o in (*pruned.graph.output, *g.output)}
    names = sorted((d, t) for t, d in picked.items() if t in present and t not in outputs)
    names = [t for _, t in names]
    if len(names) > cap:
        idx = np.unique(np.round(np.linspace(len(names) - 1, 0, cap)).astype(int))
        names = [names[i] for i in sorted(idx)]
    return names


def plan_kept_channels(ctx, teacher: dict) -> dict[str, list[tuple[int, np.ndarray]]]:
    """{tensor: [(axis, kept indices in the original), ...]} for the tensors of `teacher` (name ->
    the original's activation on some batch, for its shape) that the plan narrowed; tensors the
    plan left whole are absent."""
    plan, dg, groups = getattr(ctx, "plan", None), getattr(ctx, "dependency", None), getattr(ctx, "groups", None)
    if plan is None or dg is None or not groups:
        return {}
    removed: dict[tuple[str, int], set] = {}
    by_id = {g.id: g for g in groups}
    for gid, idx in plan.removed.items():
        idx = np.asarray(sorted(int(i) for i in idx), dtype=np.int64)
        if idx.size == 0 or gid not in by_id:
            continue
        for dim, rm in dg.removed_elements(by_id[gid].channel_labels[idx]).items():
            if dim.tensor in teacher:
                removed.setdefault((dim.tensor, dim.axis), set()).update(int(i) for i in rm)
    out: dict[str, list] = {}
    for (tensor, axis), rm in sorted(removed.items()):
        full = np.shape(teacher[tensor])[axis]
        out.setdefault(tensor, []).append((axis, np.setdiff1d(np.arange(full), np.fromiter(rm, np.int64))))
    return out


def align_channels(teacher: np.ndarray, student: np.ndarray, axis: int) -> tuple[np.ndarray, float]:
    """The increasing choice of `student.shape[axis]` channels of `teacher` (along `axis`) that
    maximises the summed correlation with the student's channels, and the mean correlation."""
    c, k = teacher.shape[axis], student.shape[axis]
    t = np.moveaxis(np.asarray(teacher, np.float64), axis, 0).reshape(c, -1)
    s = np.moveaxis(np.asarray(student, np.float64), axis, 0).reshape(k, -1)
    t = t - t.mean(1, keepdims=True)
    s = s - s.mean(1, keepdims=True)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    corr = t @ s.T                                  # [c, k]
    # best[i] after column j: best sum with student channel j matched to teacher channel i
    best = corr[:, 0].copy()
    back = np.zeros((c, k), dtype=np.int64)
    for j in range(1, k):
        prev = np.full(c, -np.inf)
        prev[1:] = np.maximum.accumulate(best[:-1])      # best over i' < i
        arg = np.zeros(c, dtype=np.int64)
        arg[1:] = _running_argmax(best[:-1])
        best = prev + corr[:, j]
        back[:, j] = arg
    i = int(np.argmax(best))
    total = float(best[i])
    idx = [i]
    for j in range(k - 1, 0, -1):
        i = int(back[i, j])
        idx.append(i)
    return np.asarray(idx[::-1], dtype=np.int64), total / k


def _running_argmax(v: np.ndarray) -> np.ndarray:
    acc = np.maximum.accumulate(v)
    pos = np.where(v == acc, np.arange(len(v)), 0)
    return np.maximum.accumulate(pos)


def infer_kept_channels(teacher: dict, student: dict) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Kept channels of the tensors whose student shape is narrower than the teacher's on exactly
    one axis, by :func:`align_channels` on one batch of both models' activations."""
    out = {}
    for name, t in teacher.items():
        s = student.get(name)
        if s is None or t.ndim != s.ndim or t.shape == s.shape:
            continue
        axes = [a for a in range(t.ndim) if t.shape[a] != s.shape[a]]
        if len(axes) != 1 or s.shape[axes[0]] > t.shape[axes[0]] or axes[0] == 0:
            continue
        idx, quality = align_channels(t, s, axes[0])
        if quality >= MIN_ALIGN_CORRELATION:
            out[name] = [(axes[0], idx)]
    return out


def select_kept(torch, value, spec):
    """The teacher tensor `value` at the kept channels `spec` ([(axis, indices)])."""
    for axis, idx in spec or ():
        value = value.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=value.device))
    return value
