"""The per-layer latency lookup table: every prunable group timed at candidate channel counts on one backend,
cached per model hash, backend and input shapes."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..backends import Backend, select_backend
from ..bench import DEFAULT_SEQ, feeds_for, time_sessions
from ..errors import BadInputError
from ..options import PruneOptions
from ..paths import write_text_atomic
from .cache import latency_cache_dir, LUT_VERSION, model_digest
from .layers import _group_layers, _layers_model, _symbols

__all__ = ["LatencyTable", "build_latency_table"]


_ROUND_TO, _MIN_KEEP = PruneOptions.default("round_to"), PruneOptions.default("min_keep")


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


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
    from ..passes.allocate import width_grid

    return width_grid(group.size, round_to, min_keep, group.width if group.kind == "heads" else 1)


def _candidate_counts(group, round_to: int, min_keep: float, max_counts: int) -> list[int]:
    allowed = _grid(group, round_to, min_keep)
    if len(allowed) > max_counts:  # evenly spaced, always with the full width
        idx = np.unique(np.round(np.linspace(0, len(allowed) - 1, max_counts)).astype(int))
        allowed = [allowed[i] for i in idx]
    return sorted(set(allowed))


def _time_model(backend: Backend, model: onnx.ModelProto, feeds: dict, runs: int, warmup: int) -> float | None:
    try:
        from ..model_io import check_model

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
    from ..api import analyze
    from ..model_io import load_model

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
            write_text_atomic(path, json.dumps(table.to_dict()))
        except BadInputError as exc:
            _log(log, f"graphprune: warning: the latency cache is not saved: {exc}")
    return table
