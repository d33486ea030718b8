"""Prune to a latency target, with a per-layer latency lookup table (HALP-style).

FLOPs are a poor proxy for speed: a layer pruned from 64 to 61 channels can get slower on
hardware that computes in blocks of 8 or 16. This module measures instead:

* :func:`build_latency_table` times, for every prunable group, a small sub-model made of the
  group's own layers (every Conv/ConvTranspose/Gemm/MatMul whose weight the group slices, in
  isolation, at the input shapes they see in the model) at candidate channel counts, on the
  chosen backend. Tables are cached per model hash and backend in
  ``$GRAPHPRUNE_LATENCY_CACHE`` (default ``~/.cache/graphprune/latency``).
* :class:`LatencyRoundPass` runs after ``allocate`` and moves each pruned group's channel
  count, within ``window`` (a fraction of the group, at least one round-to step), to the
  count that is fastest for its width: the table's local minimum once the group's linear
  trend is removed (a width the hardware runs unusually fast wins; a slow odd width loses).
* :func:`prune_to_latency` searches the FLOPs target (secant steps inside a bisection
  bracket) that gives the largest model whose *measured* latency is at most ``R`` x the
  original's, prunes with the table's rounding, measures the result against the original
  (interleaved runs) and records the measured ratio in ``report["latency"]``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .backends import Backend, select_backend
from .bench import DEFAULT_SEQ, feeds_for, time_sessions
from .oprules import WeightLayout, rule_for
from .errors import BadInputError, NothingToPruneError
from .options import PruneOptions, check_ratio, policy_from
from .pipeline import Pass, PassManager, PassResult, PruneContext
from .roles import WEIGHT_ROLES

_ROUND_TO, _MIN_KEEP = PruneOptions.default("round_to"), PruneOptions.default("min_keep")

__all__ = ["LatencyTable", "LatencyRoundPass", "build_latency_table", "prune_to_latency", "latency_vs_flops",
           "latency_cache_dir", "model_digest", "measure_ratio"]

LUT_VERSION = 2
_CACHE_ENV = "GRAPHPRUNE_LATENCY_CACHE"
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.float64): TensorProto.DOUBLE}


def latency_cache_dir() -> Path:
    """``$GRAPHPRUNE_LATENCY_CACHE`` or ``~/.cache/graphprune/latency``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune" / "latency"


def model_digest(model) -> str:
    """sha256 of the model file (or of the serialized proto)."""
    h = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        h.update(model.SerializeToString())
    else:
        with open(os.fspath(model), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


# --------------------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    """Per group: the measured latency (ms) of its layers at candidate channel counts."""

    backend: str
    inputs: dict
    # group id -> {"name", "size", "counts", "ms" (sum over layers), "layers", "layer_ms" (per layer, per count),
    #              "skipped" (layers not timed, why), "failed" (counts the backend could not run)}
    groups: dict = field(default_factory=dict)
    path: str | None = None
    cache_hit: bool = False

    def __contains__(self, gid: int) -> bool:
        return gid in self.groups and bool(self.groups[gid]["counts"])

    def counts(self, gid: int) -> list[int]:
        return list(self.groups[gid]["counts"]) if gid in self.groups else []

    def ms(self, gid: int, count: float) -> float | None:
        """Latency at `count` channels (linear between measured counts); None without an entry."""
        entry = self.groups.get(gid)
        if not entry or not entry["counts"]:
            return None
        return float(np.interp(count, entry["counts"], entry["ms"]))

    def preferred_count(self, gid: int, count: int, allowed, tolerance: float = 0.03) -> int:
        """Among `allowed` measured counts (plus `count`), the one that is fastest *for its width*.

        Latency is compared after removing the group's linear trend (its average cost per
        channel), so a count wins only by being a local minimum of the table: a width the
        hardware runs unusually fast (or the neighbour of an unusually slow one). The
        allocated `count` stays unless another beats it by more than `tolerance` of its latency.
        """
        entry = self.groups.get(gid)
        measured = set(self.counts(gid))
        options = sorted({int(c) for c in allowed if int(c) in measured} | {int(count)})
        if not entry or len(entry["counts"]) < 2 or len(options) < 2:
            return count
        c, ms = np.asarray(entry["counts"], dtype=np.float64), np.asarray(entry["ms"], dtype=np.float64)
        slope = max(float(np.polyfit(c, ms, 1)[0]), 0.0)  # ms per channel, never rewarding width
        excess = {o: self.ms(gid, o) - slope * o for o in options}
        best = min(options, key=lambda o: (excess[o], -o))
        if excess[count] - excess[best] <= tolerance * self.ms(gid, count):
            return count
        return best

    def predicted_ratio(self, kept: dict, original_ms: float | None = None) -> float | None:
        """The table's estimate of pruned / original latency for `kept[gid]` channels per group.

        Each timed layer scales by the product, over the groups it belongs to, of its own
        latency ratio at the kept count (a conv shrinks with both its input and output
        groups); the untimed rest of the model (`original_ms` minus the layers' full-width
        sum, when given) is assumed not to change.
        """
        full: dict[str, list] = {}
        factor: dict[str, float] = {}
        for gid, entry in self.groups.items():
            counts = entry.get("counts") or []
            if not counts or not entry.get("layer_ms"):
                continue
            c = kept.get(gid, entry["size"])
            for name, ms in entry["layer_ms"].items():
                at_full = float(np.interp(entry["size"], counts, ms))
                at_kept = float(np.interp(c, counts, ms))
                full.setdefault(name, []).append(at_full)
                factor[name] = factor.get(name, 1.0) * (at_kept / at_full if at_full > 0 else 1.0)
        if not full:
            return None
        base = {name: float(np.mean(v)) for name, v in full.items()}
        t_full = sum(base.values())
        t_kept = sum(base[name] * factor[name] for name in base)
        rest = max(float(original_ms) - t_full, 0.0) if original_ms else 0.0
        return (rest + t_kept) / (rest + t_full) if rest + t_full > 0 else None

    def to_dict(self) -> dict:
        return {"version": LUT_VERSION, "backend": self.backend, "inputs": self.inputs,
                "groups": {str(k): v for k, v in self.groups.items()}}

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "LatencyTable":
        return cls(d["backend"], d["inputs"], {int(k): v for k, v in d["groups"].items()}, path)


def _grid(group, round_to: int, min_keep: float) -> list[int]:
    """The allocator's width grid for a group (kept counts allowed under --round-to)."""
    from .passes.allocate import width_grid

    return width_grid(group.size, round_to, min_keep, group.width if group.kind == "heads" else 1)


def _candidate_counts(group, round_to: int, min_keep: float, max_counts: int) -> list[int]:
    allowed = _grid(group, round_to, min_keep)
    if len(allowed) > max_counts:  # evenly spaced, always with the full width
        idx = np.unique(np.round(np.linspace(0, len(allowed) - 1, max_counts)).astype(int))
        allowed = [allowed[i] for i in idx]
    return sorted(set(allowed))


# --------------------------------------------------------------------------- layer sub-models


@dataclass
class _Layer:
    """One weighted node of a group, as it appears in the model with concrete shapes."""

    name: str
    op: str
    attrs: dict
    x_shape: list
    w_shape: list
    w_dtype: np.dtype
    axes: dict  # weight axis -> elements per channel of the group
    layout: WeightLayout = None  # from the op rule

    def shapes_at(self, removed: int) -> "tuple[list, list, dict] | None":
        """(x shape, weight shape, attrs) with `removed` channels of the group gone."""
        w = list(self.w_shape)
        for axis, per in self.axes.items():
            w[axis] = int(round(w[axis] - removed * per))
        if any(d < 1 for d in w):
            return None
        x, attrs = list(self.x_shape), dict(self.attrs)
        lay = self.layout
        if lay.groups > 1:  # the op rule's weight layout: which axis counts channels per group
            groups = lay.groups
            if lay.is_depthwise(self.w_shape, self.x_shape[lay.x_axis]):
                groups = w[lay.out_axis] if lay.in_per_group else w[lay.in_axis]
                if lay.in_per_group:
                    w[lay.in_axis] = 1
                attrs["group"] = groups
            x[lay.x_axis] = w[lay.in_axis] * groups if lay.in_per_group else w[lay.in_axis]
            if lay.in_per_group and w[lay.out_axis] % groups:
                return None
        else:
            x[lay.x_axis] = w[lay.in_axis]
        return x, w, attrs


def _concrete(shape, symbols: dict, batch: int, seq: int) -> list | None:
    if shape is None:
        return None
    out = []
    for k, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d > 0:
            out.append(int(d))
        elif isinstance(d, str) and d in symbols:
            out.append(int(symbols[d]))
        else:
            out.append(batch if k == 0 else seq)
    return out


def _group_layers(ctx: PruneContext, group, symbols: dict, batch: int, seq: int) -> tuple[list, list]:
    """The group's weighted layers (Conv/ConvTranspose/Gemm/MatMul) and what was skipped, why."""
    import onnx_graphsurgeon as gs

    from .graph import tensor_shape

    tensors = ctx.model.graph.tensors()
    by_node: dict[str, _Layer] = {}
    skipped = []
    for m in group.members:
        if not m.is_weight or m.role not in WEIGHT_ROLES:
            continue
        t = tensors.get(m.tensor)
        if not isinstance(t, gs.Constant):
            continue
        per = float(np.mean([len(ix) for ix in m.indices])) if m.indices else 0.0
        for node in t.outputs:
            rule = rule_for(node, ctx.model.opset)
            lay = rule.weight_layout(node) if rule is not None else None
            if lay is None or len(node.inputs) <= lay.weight or node.inputs[lay.weight] is not t:
                if rule is None or rule.cost_terms(node):  # per-channel parameters (BN, Add, Mul): no MACs
                    skipped.append(f"{node.name or node.op}: {node.op} not timed")
                continue
            node_key = node.name or f"{node.op}->{node.outputs[0].name}"
            layer = by_node.get(node_key)
            if layer is None:
                x_shape = _concrete(tensor_shape(node.inputs[0]), symbols, batch, seq)
                w_shape = list(np.asarray(t.values).shape) if t.values is not None else None
                if x_shape is None or w_shape is None:
                    skipped.append(f"{node.name}: shape unknown")
                    continue
                if len(w_shape) != 2 + len(lay.kernel_axes):
                    skipped.append(f"{node.name}: batched {node.op} weight not timed")
                    continue
                dtype = np.dtype(np.asarray(t.values).dtype)
                if dtype not in _NP_TO_ONNX:
                    skipped.append(f"{node.name}: {dtype} weight not timed")
                    continue
                attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, (gs.Tensor, gs.Graph))}
                layer = by_node[node_key] = _Layer(node_key, node.op, attrs, x_shape, w_shape, dtype, {}, lay)
            layer.axes[m.axis % len(layer.w_shape)] = layer.axes.get(m.axis % len(layer.w_shape), 0.0) + per
    return list(by_node.values()), sorted(set(skipped))


def _layers_model(layers: list, removed: int, opset: int, seed: int = 0) -> "tuple[onnx.ModelProto, dict] | None":
    """One graph holding every layer side by side (own input, weight, output) and its feeds."""
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits, feeds = [], [], [], [], {}
    for i, layer in enumerate(layers):
        shapes = layer.shapes_at(removed)
        if shapes is None:
            continue
        x_shape, w_shape, attrs = shapes
        elem = _NP_TO_ONNX[layer.w_dtype]
        x, w, y = f"x{i}", f"w{i}", f"y{i}"
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(w_shape) * 0.05).astype(layer.w_dtype), w))
        inputs.append(helper.make_tensor_value_info(x, elem, x_shape))
        outputs.append(helper.make_tensor_value_info(y, elem, [None] * len(x_shape)))
        nodes.append(helper.make_node(layer.op, [x, w], [y], name=layer.name, **attrs))
        feeds[x] = rng.standard_normal(x_shape).astype(layer.w_dtype)
    if not nodes:
        return None
    graph = helper.make_graph(nodes, "latency_probe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return model, feeds


def _time_model(backend: Backend, model: onnx.ModelProto, feeds: dict, runs: int, warmup: int) -> float | None:
    try:
        from .model_io import check_model

        check_model(model, full_check=False)
        sess = backend.load(model, feeds)
    except Exception:
        return None
    try:
        (ms,) = time_sessions([sess], runs, warmup, rounds=1)
    except Exception:
        return None
    finally:
        sess.close()
    return float(np.min(ms))  # the layer's own cost: other load on the machine only adds to a run


def _resolve_backend(backend, threads: int, fp16: bool, log) -> Backend:
    if isinstance(backend, Backend):
        return backend
    bk = select_backend(backend, threads=threads, fp16=fp16)
    if bk.note:
        _log(log, f"graphprune: {bk.note}")
    return bk


def _symbols(proto: onnx.ModelProto, feeds: dict) -> dict:
    """Symbolic dim names of the graph inputs -> the sizes the feeds give them."""
    out = {}
    for vi in proto.graph.input:
        if vi.name not in feeds:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param and k < feeds[vi.name].ndim:
                out.setdefault(d.dim_param, int(feeds[vi.name].shape[k]))
    return out


def build_latency_table(model, backend: "str | Backend" = "auto", *, batch: int = 1, shapes: dict | None = None,
                        seq: int = DEFAULT_SEQ, threads: int = 0, fp16: bool = False, round_to: int = _ROUND_TO,
                        min_keep: float = _MIN_KEEP, max_counts: int = 12, runs: int = 10, warmup: int = 2,
                        cache: bool = True, cache_dir: "str | os.PathLike | None" = None, registry=None,
                        policy: dict | None = None, gqa_uniform: bool = False,
                        log: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every prunable group's layers at up to `max_counts` candidate channel counts.

    Candidates follow the allocator's grid (multiples of `round_to` where the group allows,
    at least `min_keep`). Cached per model hash, backend and input shapes; a cached table is
    reused and only missing counts are measured.
    """
    from .api import analyze
    from .model_io import load_model

    bk = _resolve_backend(backend, threads, fp16, log)
    proto, _ = load_model(model)
    feeds = feeds_for(proto, batch=batch, shapes=shapes, seq=seq)
    inputs = {k: list(v.shape) for k, v in feeds.items()}
    analysis = analyze(proto, registry=registry, policy=policy, gqa_uniform=gqa_uniform)
    ctx = analysis.context
    symbols = _symbols(proto, feeds)
    key = hashlib.sha256(json.dumps({"v": LUT_VERSION, "backend": bk.cache_key(), "inputs": inputs,
                                     "policy": policy or {}, "gqa": gqa_uniform}, sort_keys=True).encode())
    digest = model_digest(model if not isinstance(model, onnx.ModelProto) else proto)
    path = Path(cache_dir).expanduser() if cache_dir else latency_cache_dir()
    path = path / f"{digest[:20]}-{bk.name}-{key.hexdigest()[:12]}.json"
    table = LatencyTable(bk.cache_key(), inputs, {}, str(path))
    if cache and path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()), str(path))
        except (ValueError, KeyError):
            table = LatencyTable(bk.cache_key(), inputs, {}, str(path))
    opset = max(13, min(ctx.model.opset or 17, 21))
    measured_any = False
    for g in analysis.groups:
        if g.id in ctx.protected or g.size < 2:
            continue
        wanted = _candidate_counts(g, int(round_to), float(min_keep), int(max_counts))
        entry = table.groups.get(g.id)
        if entry is not None and (entry.get("name") != g.name or entry.get("size") != g.size):
            entry = None  # a different analysis (registry/policy): measure again
        have = dict(zip(entry["counts"], entry["ms"])) if entry else {}
        failed = set(entry.get("failed", [])) if entry else set()
        missing = [c for c in wanted if c not in have and c not in failed]
        if entry is not None and not missing:
            continue
        layers, skipped = _group_layers(ctx, g, symbols, batch, seq)
        old_layers = (entry or {}).get("layer_ms", {})
        per_layer = {layer.name: dict(zip((entry or {}).get("counts", []), old_layers.get(layer.name, [])))
                     for layer in layers}
        for c in missing:
            total = 0.0 if layers else None
            for layer in layers:  # one model per layer, so the table can tell layers apart
                built = _layers_model([layer], g.size - c, opset)
                ms = _time_model(bk, *built, runs, warmup) if built else None
                if ms is None:
                    total = None
                    break
                per_layer[layer.name][c] = ms
                total += ms
            if total is None:
                failed.add(c)  # the backend cannot run this width (e.g. uneven conv groups)
            else:
                have[c] = total
        measured_any = measured_any or bool(missing)
        counts = [c for c in sorted(have) if all(c in v for v in per_layer.values())]
        table.groups[g.id] = {"name": g.name, "size": g.size, "counts": counts, "ms": [have[c] for c in counts],
                              "layers": [layer.name for layer in layers],
                              "layer_ms": {k: [v[c] for c in counts] for k, v in per_layer.items()},
                              "skipped": skipped, "failed": sorted(failed)}
        _log(log, f"latency table: group {g.id} ({g.size} ch, {len(layers)} layers): {len(missing)} counts timed")
    table.cache_hit = not measured_any
    if cache and measured_any:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table.to_dict()))
            os.replace(tmp, path)
        except OSError as exc:
            _log(log, f"graphprune: warning: cannot write the latency cache {path}: {exc.strerror or exc}")
    return table


# --------------------------------------------------------------------------- the rounding pass


class LatencyRoundPass(Pass):
    """After `allocate`: move each pruned group's count, within `window` x its size (at least
    one round-to step), to the count that is fastest for its width (see
    :meth:`LatencyTable.preferred_count`). Which channels go still follows the scores: extra
    removals take the next-lowest, give-backs the highest."""

    name = "latency-round"
    requires = ("plan", "scores", "groups")

    def __init__(self, table: LatencyTable, window: float = 0.125, tolerance: float = 0.03):
        self.table, self.window, self.tolerance = table, float(window), float(tolerance)

    def call(self, ctx: PruneContext) -> PassResult:
        round_to = int(ctx.option("round_to", _ROUND_TO) or 1)
        min_keep = float(ctx.option("min_keep", _MIN_KEEP))
        changed = {}
        for g in ctx.groups:
            removed = ctx.plan.removed.get(g.id)
            if g.id in ctx.protected or removed is None or len(removed) == 0 or g.id not in self.table:
                continue
            n, k = g.size, g.size - len(removed)
            grid = _grid(g, round_to, min_keep)
            reach = max(max((a - b for a, b in zip(grid, grid[1:])), default=1), int(round(self.window * n)))
            allowed = [c for c in grid if abs(c - k) <= reach]
            best = self.table.preferred_count(g.id, k, allowed, self.tolerance)
            if best == k:
                continue
            scores = ctx.scores[g.id]
            rm = sorted((int(i) for i in removed), key=lambda i: (scores[i], i))
            if best < k:
                taken = set(rm)
                extra = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in taken][:k - best]
                rm = rm + extra
            else:
                rm = rm[:len(rm) - (best - k)]
            ctx.plan.removed[g.id] = np.sort(np.array(rm, dtype=np.int64))
            changed[g.id] = [k, best]
        ctx.report["latency_round"] = {str(gid): {"allocated": a, "chosen": b} for gid, (a, b) in changed.items()}
        return PassResult(info={"changed_groups": len(changed)})


# --------------------------------------------------------------------------- measuring and searching


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
    from .api import default_pipeline

    pm = PassManager(list(pipeline.passes)) if pipeline is not None else default_pipeline()
    pm.insert_after("allocate", LatencyRoundPass(table, window))
    return pm


def _kept(report: dict) -> dict:
    return {g["id"]: g["kept"] for g in report.get("groups", [])}


def prune_to_latency(model, target_latency: float, backend: "str | Backend" = "auto", *, runs: int = 30,
                     warmup: int = 5, threads: int = 0, batch: int = 1, shapes: dict | None = None,
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
    from .api import prune
    from .model_io import load_model

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
                     runs: int = 30, warmup: int = 5, threads: int = 0, batch: int = 1, shapes: dict | None = None,
                     seq: int = DEFAULT_SEQ, fp16: bool = False, log: Callable[[str], None] | None = None,
                     **prune_kwargs) -> list[dict]:
    """Prune at each FLOPs target and measure it against the original: the points of the
    "latency vs FLOPs" plot ({"target_flops", "macs_ratio", "latency_ratio", ...}); a target
    that cannot be reached gets an "error" instead."""
    from .api import prune
    from .model_io import load_model

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
