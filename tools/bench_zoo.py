#!/usr/bin/env python3
"""Head-to-head benchmark over the model zoo: graphprune vs Torch-Pruning vs onnxsim's pruning.

For every zoo model and exporter (``models/zoo.py``) it prunes to ``--target-flops`` of the
MACs and reports, per tool: success (or the one-line reason), MACs and params ratio, the
mask-equivalence oracle (graphprune only), prune time, peak memory, output fidelity
(relative error and cosine similarity on synthetic inputs) and the onnxruntime CPU latency
ratio (pruned / original; 2 threads, batch 1, median of interleaved runs after warm-up).

* graphprune: ``graphprune.prune(path, target_flops=R, verify=True)`` on the ONNX file.
* Torch-Pruning (PyTorch models): global ``MagnitudeImportance(p=1)``, ``MetaPruner`` with
  ``global_pruning=True``, final classifier ignored, heads grouped via ``num_heads`` where the
  model has them; the pruning ratio is searched (bracketed secant/bisection) until
  ``tp.utils.count_ops_and_params`` gives R of the original MACs. The pruned module is exported with the same exporter.
* onnxsim (``onnxsim.pruning``): ``apply_attention_head_pruning`` then
  ``apply_structured_pruning`` with one sparsity, searched the same way until
  ``graphprune.cost.model_cost`` gives R of the original MACs, on the same ONNX file.

Latency and fidelity of the original and every tool's pruned file are measured together in
one process per (model, exporter), runs interleaved, so all tools see the same machine load.

Each (model, tool) runs in its own subprocess with a timeout, so a crash, a hang or an
out-of-memory kill is a recorded failure, not the end of the run.

Usage::

    python tools/bench_zoo.py [--models ...] [--exporters ...] [--tools ...] [--target-flops 0.5]
                              [--json out.json] [--markdown BENCHMARKS.md] [--timeout 600]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# models.zoo is imported where it is needed: importing the models package imports torch,
# which the graphprune, onnxsim and measurement workers do not need.

TOOLS = ("graphprune", "torch-pruning", "onnxsim")
COLUMNS = (
    "model", "exporter", "tool", "success", "reason", "macs_ratio", "params_ratio", "oracle_equivalent",
    "oracle_max_rel", "prune_s", "peak_mem_mb", "fidelity_rel_err", "fidelity_cosine", "latency_orig_ms",
    "latency_pruned_ms", "latency_ratio",
)
SECTION_TITLE = "## Model zoo at --target-flops {target}"
DEFAULT_TIMEOUT = 600
SEQ = 16
from graphprune.argtypes import number_in  # noqa: E402
from graphprune.options import check_ratio  # noqa: E402
from graphprune.passes.allocate import TOLERANCE  # noqa: E402  (the target band [R - 0.02, R])

# --------------------------------------------------------------------------- small helpers


def first_line(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else str(exc)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", msg)
    if isinstance(exc, BaseException):
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg[:300]


def empty_row(model: str, exporter: str, tool: str) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(model=model, exporter=exporter, tool=tool, success=False, notes={})
    return row


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak_mb`` is the largest value seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # Linux fallback
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def feeds_for(model, seq: int = SEQ, seed: int = 0) -> dict:
    """Batch-1 synthetic inputs (graphprune.bench.feeds_for); masks all ones."""
    import numpy as np
    from graphprune.bench import feeds_for as package_feeds

    feeds = package_feeds(model, batch=1, seq=seq, seed=seed)
    for name, value in feeds.items():
        if "mask" in name.lower() and np.issubdtype(value.dtype, np.integer):
            feeds[name] = np.ones_like(value)
    return feeds


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def measure_models(original, pruned: dict, *, threads: int = 2, runs: int = 20, warmup: int = 2,
                   latency: bool = True, min_time: float = 1.0, max_runs: int = 200) -> dict:
    """Fidelity and latency of each pruned model against ``original`` on the same batch-1 inputs.

    ``pruned`` maps a key (a tool name) to a path or ModelProto. Timed runs go round-robin
    (original, then each pruned model), so load drift on the machine hits all alike; each
    model's latency is the median of its runs: ``runs`` at least, more for fast models, so
    that the original's runs add up to ``min_time`` seconds (at most ``max_runs``). Returns,
    per key, either
    ``{"fidelity_rel_err", "fidelity_cosine", "latency_orig_ms", "latency_pruned_ms",
    "latency_ratio"}`` or ``{"error": "..."}``.
    """
    import onnx
    from graphprune.backends.ort import OrtCpuBackend
    from graphprune.compare import flat_fidelity
    from graphprune.bench import time_sessions

    proto = onnx.load(original, load_external_data=False) if isinstance(original, str) else original
    feeds = feeds_for(proto)
    backend = OrtCpuBackend(threads=threads)   # the package's timed onnxruntime CPU sessions
    s_orig = backend.load(original, feeds)
    out_orig = s_orig.run()
    results: dict = {}
    sessions = {}
    for key, model in pruned.items():
        try:
            sess = backend.load(model, feeds)
            out = sess.run()
        except Exception as exc:
            results[key] = {"error": f"pruned model does not run in onnxruntime: {first_line(exc)}"}
            continue
        try:
            rel, cos = flat_fidelity(out_orig, out)
        except Exception as exc:
            results[key] = {"error": first_line(exc)}
            continue
        results[key] = {"fidelity_rel_err": rel, "fidelity_cosine": cos}
        sessions[key] = sess
    if not latency or not sessions:
        return results
    order = [("original", s_orig), *sessions.items()]
    time_sessions([sess for _, sess in order], 0, max(1, warmup))            # warm-up
    t_single = float(s_orig.time(1)[0]) / 1e3
    runs = max(runs, min(max_runs, math.ceil(min_time / max(t_single, 1e-6))))
    ms = time_sessions([sess for _, sess in order], runs, 0, rounds=runs)    # round-robin, run by run
    times = {key: list(m / 1e3) for (key, _), m in zip(order, ms)}
    t_orig = _median(times["original"]) * 1e3
    for key in sessions:
        t = _median(times[key]) * 1e3
        results[key].update(latency_orig_ms=t_orig, latency_pruned_ms=t, latency_ratio=t / t_orig, latency_runs=runs)
    return results


def apply_measurement(row: dict, m: dict) -> None:
    """Copy one measure_models() entry into a row (an error makes the row a failure)."""
    if "error" in m:
        row["success"] = False
        row["reason"] = row["reason"] or m["error"]
        return
    for k in ("fidelity_rel_err", "fidelity_cosine", "latency_orig_ms", "latency_pruned_ms", "latency_ratio"):
        if k in m:
            row[k] = m[k]
    if "latency_runs" in m:
        row["notes"]["latency_runs"] = m["latency_runs"]


def evaluate(original, pruned, row: dict, *, threads: int = 2, runs: int = 20, latency: bool = True) -> None:
    """Fill a row's fidelity and latency columns (original vs one pruned model)."""
    m = measure_models(original, {"pruned": pruned}, threads=threads, runs=runs, latency=latency)["pruned"]
    if "error" in m:
        raise RuntimeError(m["error"])
    apply_measurement(row, m)


def onnx_cost(model) -> tuple[float, float]:
    """(MACs, params) by graphprune's cost model; stale value_info is dropped first."""
    import onnx
    from graphprune.cost import model_cost
    from graphprune.graph import Model

    proto = onnx.load(model) if isinstance(model, str) else model
    proto = copy.deepcopy(proto)
    del proto.graph.value_info[:]
    cost = model_cost(Model.load(proto))
    return float(cost.macs), float(cost.params)


def search(measure: Callable[[float], float], target: float, lo: float, hi: float, *, guess: float | None = None,
           iters: int = 10, tol: float = TOLERANCE) -> tuple[float, float, list]:
    """Find x in [lo, hi] with ``target - tol <= measure(x) <= target``.

    ``measure`` is a kept-MACs fraction that falls as x (a pruning ratio or sparsity)
    grows, with ``measure(lo) == 1``. Bracketed search: secant steps aimed at the middle
    of the window, alternating with bisection so it cannot stall. Returns (x, value,
    trace): the point closest to the target from below, else the strongest one tried.
    """
    trace: list = []

    def f(x: float) -> float:
        v = float(measure(x))
        trace.append((x, v))
        return v

    aim = target - tol / 2
    a, fa = lo, 1.0  # above the target
    b, fb = None, None  # at or below the target
    best = None
    x = guess if guess is not None and lo < guess < hi else (lo + hi) / 2
    for i in range(iters):
        v = f(x)
        if v <= target:
            if best is None or v > best[1]:
                best = (x, v)
            if v >= target - tol:
                break
            b, fb = x, v
        else:
            a, fa = x, v
        if b is None:  # nothing at or below the target yet: try the strongest setting
            if x >= hi:
                break
            x = hi
            continue
        secant = a + (fa - aim) * (b - a) / (fa - fb) if fa != fb else (a + b) / 2
        x = secant if i % 2 == 0 and a < secant < b else (a + b) / 2
    if best is None:  # never at or below the target: the setting that came closest
        x, v = min(trace, key=lambda t: (t[1], -t[0]))
        return x, v, trace
    return best[0], best[1], trace


# --------------------------------------------------------------------------- graphprune


def _analysis_hint(path: str) -> str:
    """A short summary of graphprune analyze, to explain 'nothing to prune'."""
    try:
        import graphprune

        a = graphprune.analyze(path)
        reasons: dict[str, int] = {}
        for p in a.pinned:
            key = re.sub(r"\S+/\S+|\b\w*[0-9]\w*\b", "…", p.reason)[:90]
            reasons[key] = reasons.get(key, 0) + 1
        top = "; ".join(f"{r} (x{n})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:2])
        return (f"[analyze: MACs {a.cost.macs:.3g}, params {a.cost.params:.3g}, {len(a.groups)} groups, "
                f"{len(a.pinned)} pinned{': ' + top if top else ''}]")
    except Exception as exc:  # the hint must never hide the original failure
        return f"[analyze failed too: {first_line(exc)}]"


def _save_path(save_dir: str | None, row: dict) -> str | None:
    if not save_dir:
        return None
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return os.fspath(Path(save_dir) / f"{row['model']}.{row['exporter']}.{row['tool']}.onnx")


def bench_graphprune(path: str, target_flops: float = 0.5, *, model: str = "", exporter: str = "",
                     threads: int = 2, runs: int = 20, latency: bool = True, measure: bool = True,
                     save_dir: str | None = None) -> dict:
    """One graphprune row: prune ``path`` with verify=True, then (``measure``) fidelity and
    latency in this process; ``save_dir`` keeps the pruned file (path in notes)."""
    row = empty_row(model or Path(path).stem, exporter, "graphprune")
    try:
        import graphprune
        from graphprune.errors import NothingToPruneError
    except ImportError as exc:
        row["reason"] = f"graphprune not importable: {first_line(exc)}"
        return row

    sampler = PeakRSS()

    class RecordPeak(graphprune.Pass):
        """Records the peak RSS and time once the rewrite is done (before the oracle)."""

        name = "bench-record-peak"

        def call(self, ctx):
            ctx.report["bench_peak_before_verify_mb"] = max(sampler.peak, sampler._rss()) / 2**20
            ctx.report["bench_t_before_verify"] = time.perf_counter()
            return graphprune.PassResult()

    pipeline = graphprune.default_pipeline()
    try:
        pipeline.insert_before("verify", RecordPeak())
    except Exception:
        pass
    t0 = time.perf_counter()
    try:
        with sampler:
            result = graphprune.prune(path, target_flops=target_flops, verify=True, pipeline=pipeline)
    except NothingToPruneError as exc:
        row["reason"] = f"{first_line(exc)} {_analysis_hint(path)}"
        row["prune_s"] = time.perf_counter() - t0
        return row
    except Exception as exc:
        row["reason"] = first_line(exc)
        row["prune_s"] = time.perf_counter() - t0
        return row
    t_end = time.perf_counter()
    rep = result.report
    t_verify_start = rep.pop("bench_t_before_verify", None)
    row["prune_s"] = (t_verify_start or t_end) - t0
    row["peak_mem_mb"] = rep.pop("bench_peak_before_verify_mb", None) or sampler.peak_mb
    row["notes"]["verify_s"] = t_end - (t_verify_start or t_end)
    row["notes"]["peak_mem_with_oracle_mb"] = sampler.peak_mb
    row["notes"]["timings"] = {k: round(v, 3) for k, v in rep.get("timings", {}).items()}
    mb, ma = rep.get("macs_before"), rep.get("macs_after")
    pb, pa = rep.get("params_before"), rep.get("params_after")
    row["macs_ratio"] = rep.get("macs_ratio", ma / mb if mb else None)
    row["params_ratio"] = rep.get("params_ratio", pa / pb if pb else None)
    row["notes"].update(macs_before=mb, macs_after=ma, params_before=pb, params_after=pa)
    oracle = rep.get("oracle") or {}
    row["oracle_equivalent"] = oracle.get("equivalent")
    rels = [v.get("max_rel") for k, v in oracle.items() if isinstance(v, dict) and "max_rel" in v]
    row["oracle_max_rel"] = max(rels) if rels else None
    if row["macs_ratio"] is not None and row["macs_ratio"] > target_flops + TOLERANCE:
        row["reason"] = (f"target not reached: keeps {row['macs_ratio']:.3f} of the MACs "
                         "(graphprune returned without an error)")
    out = _save_path(save_dir, row)
    try:
        if out:
            row["notes"]["pruned_path"] = result.save(out)
        if measure:
            evaluate(path, result.model, row, threads=threads, runs=runs, latency=latency)
    except Exception as exc:
        row["reason"] = first_line(exc)
        return row
    row["success"] = row["reason"] is None
    return row


# --------------------------------------------------------------------------- onnxsim


def _onnxsim_prune(proto, sparsity: float, notes: dict):
    from onnxsim import pruning

    model = proto
    if hasattr(pruning, "apply_attention_head_pruning"):
        try:
            model = pruning.apply_attention_head_pruning(model, sparsity=sparsity)
        except Exception as exc:
            notes["attention_head_pruning_error"] = first_line(exc)
            model = proto
    return pruning.apply_structured_pruning(model, sparsity=sparsity)


def bench_onnxsim(path: str, target_flops: float = 0.5, *, model: str = "", exporter: str = "",
                  threads: int = 2, runs: int = 20, latency: bool = True, measure: bool = True,
                  save_dir: str | None = None) -> dict:
    """One onnxsim row: sparsity searched to reach ``target_flops`` of graphprune-counted MACs."""
    row = empty_row(model or Path(path).stem, exporter, "onnxsim")
    try:
        import onnxsim.pruning as pruning
    except ImportError as exc:
        row["reason"] = f"onnxsim.pruning not importable: {first_line(exc)}"
        return row
    if not hasattr(pruning, "apply_structured_pruning"):
        row["reason"] = "onnxsim.pruning has no apply_structured_pruning"
        return row
    import onnx

    proto = onnx.load(path)
    try:
        macs0, params0 = onnx_cost(proto)
    except Exception as exc:
        row["reason"] = f"cost model failed on the original: {first_line(exc)}"
        return row
    if macs0 <= 0:
        row["reason"] = "graphprune's cost model counts 0 MACs in this file"
        return row
    cache: dict[float, Any] = {}
    t_search = time.perf_counter()

    def kept_macs(s: float) -> float:
        pruned = _onnxsim_prune(proto, s, row["notes"])
        macs, params = onnx_cost(pruned)
        cache[s] = (macs / macs0, params / params0)
        return macs / macs0

    try:
        s, ratio, trace = search(kept_macs, target_flops, 0.0, 0.95)
    except Exception as exc:
        row["reason"] = first_line(exc)
        return row
    row["notes"]["search_s"] = time.perf_counter() - t_search
    row["notes"]["sparsity"] = s
    row["notes"]["search_trace"] = [(round(x, 4), round(v, 4)) for x, v in trace]
    # the measured run: once more at the chosen sparsity
    t0 = time.perf_counter()
    try:
        with PeakRSS() as sampler:
            pruned = _onnxsim_prune(proto, s, row["notes"])
    except Exception as exc:
        row["reason"] = first_line(exc)
        return row
    row["prune_s"] = time.perf_counter() - t0
    row["peak_mem_mb"] = sampler.peak_mb
    row["macs_ratio"], row["params_ratio"] = cache[s]
    if ratio > target_flops + 1e-9:
        row["reason"] = (f"target not reached: sparsity {s:.2f} leaves {ratio:.3f} of the MACs "
                         "(only isolated producer->consumer chains are pruned)")
    elif ratio >= 1 - 1e-9:
        row["reason"] = "nothing pruned"
    out = _save_path(save_dir, row)
    try:
        if out:
            onnx.save(pruned, out)
            row["notes"]["pruned_path"] = out
        if measure:
            evaluate(path, pruned, row, threads=threads, runs=runs, latency=latency)
    except Exception as exc:
        row["reason"] = first_line(exc)
        return row
    row["success"] = row["reason"] is None
    return row


# --------------------------------------------------------------------------- Torch-Pruning


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float | None, what: str):
    """Raise StepTimeout (naming the innermost library frame) if the block runs too long."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        frames = []
        f = frame
        while f is not None:  # innermost first
            frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
            f = f.f_back
        where = _pick_frame(frames)
        raise StepTimeout(f"{what} did not finish in {seconds:g} s" + (f", stuck in {where}" if where else ""))

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _tp_prune(spec, base, ratio: float, example):
    import torch
    import torch_pruning as tp

    module = copy.deepcopy(base)
    cfg = dict(spec.tp_config(module)) if spec.tp_config else {}
    kwargs = dict(importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True, pruning_ratio=ratio,
                  max_pruning_ratio=0.9, ignored_layers=cfg.pop("ignored_layers", []))
    if cfg.get("num_heads"):
        kwargs["num_heads"] = cfg.pop("num_heads")
        if cfg.pop("prune_num_heads", False):
            kwargs.update(prune_num_heads=True, prune_head_dims=cfg.pop("prune_head_dims", False),
                          head_pruning_ratio=ratio)
    kwargs.update(cfg)
    pruner = tp.pruner.MetaPruner(module, example, **kwargs)
    pruner.step()
    if spec.tp_finalize:
        spec.tp_finalize(module, pruner)
    with torch.no_grad():
        module(*example)
    return module.eval()


def bench_torch_pruning(name: str, exporters: Sequence[str], target_flops: float = 0.5, *, threads: int = 2,
                        runs: int = 20, latency: bool = True, measure: bool = True,
                        save_dir: str | None = None, step_timeout: float | None = None,
                        original_paths: dict | None = None) -> list[dict]:
    """Torch-Pruning rows for a PyTorch zoo model, one per exporter of the pruned module."""
    rows = [empty_row(name, e, "torch-pruning") for e in exporters]

    def fail_all(reason: str) -> list[dict]:
        for r in rows:
            r["reason"] = reason
        return rows

    try:
        import torch
        import torch_pruning as tp
    except ImportError as exc:
        return fail_all(f"torch_pruning not importable: {first_line(exc)}")
    from models.zoo import build_zoo_model, export_torch_spec, torch_spec

    torch.set_num_threads(max(1, threads))
    try:
        spec = torch_spec(name)
        base = spec.make_module().eval()
        example = spec.make_inputs(1, SEQ)
        for p in base.parameters():
            p.requires_grad_(True)
        macs0, params0 = tp.utils.count_ops_and_params(base, example)
    except Exception as exc:
        return fail_all(f"model setup failed: {first_line(exc)}")
    found: dict[float, tuple] = {}
    errors: list[str] = []

    def kept_macs(r: float) -> float:
        try:
            with _alarm(step_timeout, f"Torch-Pruning (ratio {r:.2f})"):
                m = _tp_prune(spec, base, r, example)
        except Exception as exc:
            errors.append(first_line(exc))
            raise
        macs, params = tp.utils.count_ops_and_params(m, example)
        found[r] = (macs / macs0, params / params0)
        return macs / macs0

    t_search = time.perf_counter()
    try:
        ratio, tp_macs, trace = search(kept_macs, target_flops, 0.0, 0.9,
                                        guess=1 - math.sqrt(target_flops))
    except Exception as exc:
        return fail_all(errors[-1] if errors else first_line(exc))
    search_s = time.perf_counter() - t_search
    t0 = time.perf_counter()
    try:
        with PeakRSS() as sampler, _alarm(step_timeout, f"Torch-Pruning (ratio {ratio:.2f})"):
            pruned = _tp_prune(spec, base, ratio, example)
    except Exception as exc:
        return fail_all(first_line(exc))
    prune_s = time.perf_counter() - t0
    peak_rss = max(sampler.peak_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    tmpdir = None if save_dir else tempfile.TemporaryDirectory(prefix="bench_tp_")
    tmp = Path(save_dir or tmpdir.name)
    for row, exporter in zip(rows, exporters):
        row["prune_s"] = prune_s
        row["peak_mem_mb"] = sampler.peak_mb
        row["notes"].update(pruning_ratio=ratio, tp_macs_ratio=tp_macs, tp_params_ratio=found.get(ratio, (None,) * 2)[1],
                            search_s=search_s, search_trace=[(round(x, 4), round(v, 4)) for x, v in trace],
                            peak_mem_process_mb=peak_rss)
        if tp_macs > target_flops + 1e-9:
            row["reason"] = f"target not reached: pruning ratio {ratio:.2f} leaves {tp_macs:.3f} of the MACs"
        try:
            original = (original_paths or {}).get(exporter) or build_zoo_model(name, exporter, None)
            out = _save_path(str(tmp), row)
            export_torch_spec(spec, out, exporter, module=pruned)
            if save_dir:
                row["notes"]["pruned_path"] = out
            m0, p0 = onnx_cost(original)
            m1, p1 = onnx_cost(out)
            row["macs_ratio"], row["params_ratio"] = m1 / m0, p1 / p0
            if measure:
                evaluate(original, out, row, threads=threads, runs=runs, latency=latency)
        except Exception as exc:
            row["reason"] = first_line(exc)
            continue
        row["success"] = row["reason"] is None
    if tmpdir is not None:
        tmpdir.cleanup()
    return rows


# --------------------------------------------------------------------------- subprocess isolation


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _hang_location(log_path: Path) -> str | None:
    """The innermost frame of the last faulthandler dump in a worker log (most recent first)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    blocks = text.split("most recent call first):")
    if len(blocks) < 2:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', blocks[-1])
    return _pick_frame([(f, int(n), fn) for f, n, fn in frames])


_TOOL_PATHS = ("torch_pruning", "onnxsim", "graphprune", "/passes/", "onnxruntime", "torch/onnx")


def _pick_frame(frames: list) -> str | None:
    """'func (file:line)' of the innermost frame inside a pruning tool (else any library
    frame outside this harness), from a most-recent-first list of (file, line, func)."""
    usable = [fr for fr in frames if "bench_zoo.py" not in fr[0] and "/threading.py" not in fr[0]
              and not fr[0].startswith("<")]
    preferred = [fr for fr in usable if any(t in fr[0] for t in _TOOL_PATHS)]
    pick = (preferred or usable or [None])[0]
    if pick is None:
        return None
    file, line, func = pick
    short = re.sub(r".*/site-packages/", "", file)
    short = re.sub(r"^" + re.escape(str(ROOT)) + "/", "", short)
    return f"{func} ({short}:{line})"


def run_isolated(task: dict, timeout: float, logdir: Path) -> dict:
    """Run one worker task in a subprocess; returns its JSON result or a failure record."""
    logdir.mkdir(parents=True, exist_ok=True)
    exps = task.get("exporter") or "+".join(task.get("exporters") or [])
    tag = "_".join(str(v) for v in (task.get("kind"), task.get("model"), exps) if v)
    if task.get("kind") == "measure" and len(task.get("pruned") or {}) == 1:
        tag += "_" + next(iter(task["pruned"]))
    result_path = logdir / f"{tag}.result.json"
    log_path = logdir / f"{tag}.log"
    if result_path.exists():
        result_path.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task), "--result", str(result_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)  # the worker's faulthandler dumps its stack to the log
                time.sleep(1.0)
            _kill_group(proc)
            proc.wait()
            log.flush()
            where = _hang_location(log_path)
            partial = []
            with contextlib.suppress(OSError, ValueError):
                partial = json.loads(result_path.read_text()).get("rows", [])
            return {"ok": False, "reason": f"timeout after {timeout:g} s{' in ' + where if where else ''}",
                    "wall_s": time.perf_counter() - t0, "maxrss_mb": None, "rows": partial}
        finally:
            _kill_group(proc)  # stray grandchildren
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    if rc == 0 and result_path.exists():
        out = json.loads(result_path.read_text())
        out["wall_s"] = wall
        return out
    partial = []
    with contextlib.suppress(OSError, ValueError):
        partial = json.loads(result_path.read_text()).get("rows", [])
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    if rc == -signal.SIGKILL:
        why += " (out of memory?)"
    last = re.sub(r"\x1b\[[0-9;]*m", "", tail[-1])[:200] if tail else ""
    return {"ok": False, "reason": f"worker crashed: {why}{': ' + last if last else ''}", "wall_s": wall,
            "maxrss_mb": usage.ru_maxrss / 1024, "rows": partial}


def _write_json(path: str, data: dict) -> None:
    from graphprune.paths import write_text_atomic

    write_text_atomic(path, json.dumps(data, default=_json_default))


def worker_main(task: dict, result_path: str) -> int:
    """Run one task in this (sub)process. Tasks over several exporters write their result
    file after each exporter, so a crash or timeout keeps the rows already done."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=False)
    kind = task["kind"]
    opts = dict(target_flops=task["target_flops"], threads=task["threads"], runs=task["runs"],
                latency=task["latency"], measure=False, save_dir=task.get("save_dir"))
    paths = task.get("paths", {})  # exporter -> built ONNX file
    out: dict = {"ok": True, "rows": []}

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if kind == "build":
        from models.zoo import build_zoo_model

        try:
            t0 = time.perf_counter()
            path = build_zoo_model(task["model"], task["exporter"], None)
            out = {"ok": True, "path": path, "build_s": time.perf_counter() - t0}
        except Exception as exc:
            out = {"ok": False, "reason": first_line(exc)}
    elif kind in ("graphprune", "onnxsim"):
        fn = bench_graphprune if kind == "graphprune" else bench_onnxsim
        for exporter in task["exporters"]:
            out["rows"].append(fn(paths[exporter], model=task["model"], exporter=exporter, **opts))
            out["maxrss_mb"] = rss()
            _write_json(result_path, out)
    elif kind == "torch-pruning":
        out["rows"] = bench_torch_pruning(task["model"], task["exporters"], step_timeout=task.get("tp_step_timeout"),
                                          original_paths=paths, **opts)
    elif kind == "measure":
        out = {"ok": True, "measurements": measure_models(paths[task["exporter"]], task["pruned"],
                                                          threads=task["threads"], runs=task["runs"],
                                                          latency=task["latency"])}
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    out["maxrss_mb"] = rss()
    _write_json(result_path, out)
    return 0


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


# --------------------------------------------------------------------------- environment


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.M)
        info["cpu"] = names[0].strip() if names else platform.processor()
        info["logical_cpus"] = len(re.findall(r"^processor\s*:", cpuinfo, flags=re.M))
    except OSError:
        info["cpu"] = platform.processor()
    info["os_cpu_count"] = os.cpu_count()
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", Path("/proc/meminfo").read_text(), flags=re.M)
        if mem:
            info["ram_gib"] = round(int(mem.group(1)) / 2**20, 1)
    return info


_VERSION_DISTS = ("graphprune", "onnx", "onnxruntime", "numpy", "torch", "torchvision", "transformers",
                  "onnxscript", "torch-pruning", "onnxsim", "magika", "rapidocr-onnxruntime")


def versions() -> dict:
    out = {}
    for d in _VERSION_DISTS:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = None
    with contextlib.suppress(Exception):
        out["graphprune_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                                  capture_output=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "graphprune", "passes"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout.strip()
        if dirty and out.get("graphprune_commit"):
            out["graphprune_commit"] += "+dirty"
    return out


# --------------------------------------------------------------------------- report


def _fmt(v, spec: str = ".2f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def _sci(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1e}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def apply_target_rule(rows: list[dict], target: float, tol: float = TOLERANCE) -> None:
    """A prune that keeps more than ``target + tol`` of the MACs missed the target: that is a
    failure for every tool (the peers' searches mark it themselves; graphprune may return
    without an error). Idempotent."""
    for r in rows:
        ratio = r.get("macs_ratio")
        if r["tool"] == "graphprune" and r["success"] and ratio is not None and ratio > target + tol:
            r["success"] = False
            r["reason"] = (f"target not reached: keeps {ratio:.3f} of the MACs "
                           "(graphprune returned without an error)")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for tool in TOOLS:
        rs = [r for r in rows if r["tool"] == tool]
        if not rs:
            continue
        ok = [r for r in rs if r["success"]]
        med = lambda xs: (sorted(xs)[len(xs) // 2] if xs else None)
        out.append({
            "tool": tool, "attempted": len(rs), "succeeded": len(ok),
            "oracle_ok": sum(1 for r in ok if r.get("oracle_equivalent")) if tool == "graphprune" else None,
            "median_macs_ratio": med([r["macs_ratio"] for r in ok if r["macs_ratio"] is not None]),
            "median_latency_ratio": med([r["latency_ratio"] for r in ok if r["latency_ratio"] is not None]),
            "median_rel_err": med([r["fidelity_rel_err"] for r in ok if r["fidelity_rel_err"] is not None]),
            "median_prune_s": med([r["prune_s"] for r in ok if r["prune_s"] is not None]),
        })
    return out


def markdown_section(result: dict) -> str:
    target = result["target_flops"]
    rows = result["rows"]
    apply_target_rule(rows, target)
    m = result["machine"]
    v = result["versions"]
    lines = [SECTION_TITLE.format(target=target), ""]
    lines += [
        f"Every zoo model (`models/zoo.py`) and exporter, pruned to {target} of the MACs by graphprune, "
        "Torch-Pruning (PyTorch models) and onnxsim's ONNX pruning. Generated by `tools/bench_zoo.py`; "
        "regenerate with:", "", "```bash", result["command"], "```", "",
        f"Machine: {m.get('cpu')}, {m.get('usable_cpus', m.get('logical_cpus'))} usable cores, "
        f"{m.get('ram_gib')} GiB RAM ({m.get('platform')}, Python {m.get('python')}). "
        f"Run {result['started']}, {result['total_s'] / 60:.1f} min in all (1-min load average "
        f"{m.get('loadavg_start', '?').split()[0] if m.get('loadavg_start') else '?'} at the start, "
        f"{m.get('loadavg_end', '?').split()[0] if m.get('loadavg_end') else '?'} at the end).", "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", "",
        "Columns: **MACs**/**params** = pruned/original, all by graphprune's cost model (graphprune: from its "
        "report; peers: on their pruned ONNX files; Torch-Pruning's own count, which its search targets, is in "
        "the JSON); **oracle** = graphprune's mask-equivalence check "
        "(max relative error over batch 1 and 3); **prune s** = time of one prune at the chosen setting "
        "(graphprune: without its oracle; peers: one run at the searched ratio, the search itself is in the JSON); "
        "**peak MB** = peak RSS of the pruning process during that prune; **rel err**/**cos** = relative L2 error "
        "and cosine similarity of pruned vs original outputs on batch-1 synthetic inputs (random weights: a "
        "measure of how much the function changed, not of accuracy); **lat** = onnxruntime CPU latency "
        f"pruned/original, {result['threads']} threads, batch 1, median of at least {result['runs']} interleaved runs "
        "after warm-up (more for fast models: at least 1 s of runs of the original).",
        "",
    ]
    summ = summarize(rows)
    if summ:
        lines += ["| tool | rows | succeeded | oracle holds | median MACs | median lat | median rel err | "
                  "median prune s |", "|---|---|---|---|---|---|---|---|"]
        for s in summ:
            lines.append(f"| {s['tool']} | {s['attempted']} | {s['succeeded']} | "
                         f"{'—' if s['oracle_ok'] is None else s['oracle_ok']} | {_fmt(s['median_macs_ratio'])} | "
                         f"{_fmt(s['median_latency_ratio'])} | {_sci(s['median_rel_err'])} | "
                         f"{_fmt(s['median_prune_s'], '.1f')} |")
        lines.append("")
    lines += ["| model | exporter | tool | ok | MACs | params | oracle (max rel) | prune s | peak MB | rel err | cos "
              "| lat | reason |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        oracle = "—"
        if r["tool"] == "graphprune" and r["oracle_equivalent"] is not None:
            oracle = f"{'yes' if r['oracle_equivalent'] else 'NO'} ({_sci(r['oracle_max_rel'])})"
        lines.append("| " + " | ".join([
            r["model"], r["exporter"], r["tool"], "yes" if r["success"] else "**no**", _fmt(r["macs_ratio"]),
            _fmt(r["params_ratio"]), oracle, _fmt(r["prune_s"], ".1f"), _fmt(r["peak_mem_mb"], ".0f"),
            _sci(r["fidelity_rel_err"]), _fmt(r["fidelity_cosine"], ".3f"), _fmt(r["latency_ratio"]),
            _md_escape(r["reason"] or ""),
        ]) + " |")
    lines += ["", "Notes: the torchvision and transformers models have random weights, so fidelity says how much "
              "each tool changed the function, not accuracy; torchvision's ViT-B/16 zero-initialises its "
              "classification head (every output is 0: rel err 0, cosine undefined) and ConvNeXt's layer scale "
              "starts at 1e-6 (its blocks barely contribute, so pruning inside them barely changes the output). "
              "Rows marked **no** with numbers are prunes that ran but missed the target or broke the model."]
    below = [r for r in rows if r["tool"] == "graphprune" and r["success"] and r["macs_ratio"] is not None
             and r["macs_ratio"] < target - TOLERANCE]
    if below:
        lines += ["", "graphprune landed below the target window [R-0.02, R] (pruned more than asked) on: "
                  + ", ".join(f"{r['model']} ({r['exporter']}, {r['macs_ratio']:.2f})" for r in below) + "."]
    failures = [r for r in rows if r["tool"] == "graphprune" and not r["success"]]
    lines += ["", f"### graphprune failures ({len(failures)})", ""]
    if failures:
        by_reason: dict[str, list[str]] = {}
        for r in failures:
            by_reason.setdefault(r["reason"] or "unknown", []).append(f"{r['model']} ({r['exporter']})")
        for reason, models in by_reason.items():
            lines.append(f"- {', '.join(models)}: {_md_escape(reason)}")
    else:
        lines.append("none")
    broken = [r for r in rows if r["tool"] == "graphprune" and r["oracle_equivalent"] is False]
    lines += ["", f"### graphprune prunes that fail the mask-equivalence oracle ({len(broken)})", ""]
    lines += ([f"- {r['model']} ({r['exporter']}): max relative error {_sci(r['oracle_max_rel'])}" for r in broken]
              or ["none"])
    builds = [b for b in result.get("builds", []) if not b.get("ok")]
    if builds:
        lines += ["", "Models that could not be built (no tool ran on them):", ""]
        lines += [f"- {b['model']} ({b['exporter']}): {_md_escape(b.get('reason', ''))}" for b in builds]
    lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace (or append) this target's zoo section of BENCHMARKS.md, keeping other sections."""
    title = section.splitlines()[0]
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmarks\n\nMeasured results; each section says how to reproduce it.\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == title), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- driver


def _split(values: Sequence[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def select_entries(models: Sequence[str], exporters: Sequence[str]) -> list:
    from models.zoo import zoo_entries

    entries = [e for e in zoo_entries() if (not models or e.name in models)
               and (not exporters or e.exporter in exporters)]
    unknown = set(models) - {e.name for e in zoo_entries()}
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(sorted(unknown))}")
    return entries


def _loadavg() -> str | None:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


def run_benchmark(args: argparse.Namespace, command: str) -> dict:
    models, exporters, tools = _split(args.models), _split(args.exporters), _split(args.tools) or list(TOOLS)
    unknown_tools = set(tools) - set(TOOLS)
    if unknown_tools:
        raise SystemExit(f"unknown tool(s): {', '.join(sorted(unknown_tools))}; choose from {', '.join(TOOLS)}")
    entries = select_entries(models, exporters)
    workdir = Path(args.workdir)
    logdir = workdir / "logs"
    save_dir = workdir / "pruned"
    common = dict(target_flops=args.target_flops, threads=args.threads, runs=args.runs, latency=not args.no_latency,
                  save_dir=str(save_dir))
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_start = _loadavg()
    t_start = time.perf_counter()
    rows: list[dict] = []
    builds: list[dict] = []

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def record(out: dict, model: str, exporters_: list[str], tool: str) -> None:
        got = {r["exporter"]: r for r in out.get("rows") or []}
        for e in exporters_:
            r = got.get(e)
            if r is None:
                r = empty_row(model, e, tool)
                r["reason"] = out.get("reason", "no result") if not out.get("ok") else "no result"
            r["notes"]["worker_wall_s"] = out.get("wall_s")
            r["notes"]["worker_maxrss_mb"] = out.get("maxrss_mb")
            rows.append(r)

    def measure(model: str, exporter: str) -> None:
        todo = [r for r in rows if r["model"] == model and r["exporter"] == exporter
                and r["notes"].get("pruned_path") and r["fidelity_rel_err"] is None]
        if not todo:
            return
        pruned = {r["tool"]: r["notes"]["pruned_path"] for r in todo}
        task = dict(common, kind="measure", model=model, exporter=exporter, pruned=pruned, paths=paths)
        out = run_isolated(task, args.timeout, logdir)
        if not out.get("ok") and len(todo) > 1:  # a crash: measure each tool alone to find the culprit
            meas = {}
            for r in todo:
                one = run_isolated(dict(task, pruned={r["tool"]: pruned[r["tool"]]}), args.timeout, logdir)
                meas[r["tool"]] = (one["measurements"][r["tool"]] if one.get("ok")
                                   else {"error": f"measurement failed: {one.get('reason')}"})
        elif not out.get("ok"):
            meas = {r["tool"]: {"error": f"measurement failed: {out.get('reason')}"} for r in todo}
        else:
            meas = out["measurements"]
        for r in todo:
            apply_measurement(r, meas.get(r["tool"], {"error": "not measured"}))
            r["notes"]["measure_wall_s"] = out.get("wall_s")
            if not args.keep_pruned:
                with contextlib.suppress(OSError):
                    os.unlink(r["notes"]["pruned_path"])

    from models.zoo import cached_zoo_path, missing_requirements

    by_model: dict[str, list] = {}
    for e in entries:
        by_model.setdefault(e.name, []).append(e)
    previous: dict = {}
    if args.resume and args.json and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        started = previous.get("started", started)
    old_rows = previous.get("rows", [])
    done = {(r["model"], r["exporter"], r["tool"]) for r in old_rows}

    def checkpoint(partial: bool) -> dict:
        order = {t: i for i, t in enumerate(TOOLS)}
        model_order = {n: i for i, n in enumerate(by_model)}
        rows.sort(key=lambda r: (model_order.get(r["model"], 99), r["exporter"], order.get(r["tool"], 9)))
        machine = machine_info()
        machine["loadavg_start"], machine["loadavg_end"] = load_start, _loadavg()
        result = {"command": command, "started": started,
                  "total_s": previous.get("total_s", 0.0) + time.perf_counter() - t_start,
                  "partial": partial, "target_flops": args.target_flops, "threads": args.threads, "runs": args.runs,
                  "timeouts": {"tool": args.timeout, "torch_pruning": args.tp_timeout or args.timeout,
                               "torch_pruning_step": args.tp_step_timeout, "build": args.build_timeout},
                  "machine": machine, "versions": versions(), "columns": list(COLUMNS),
                  "builds": builds, "rows": rows}
        if args.json:
            from graphprune.paths import write_text_atomic

            write_text_atomic(args.json, json.dumps(result, indent=1, default=_json_default) + "\n")
        return result

    paths: dict[str, str] = {}  # exporter -> built file, for the model at hand
    for name, ents in by_model.items():
        expected = {(name, e.exporter, t) for e in ents for t in tools if t != "torch-pruning" or e.is_torch}
        if expected and expected <= done:  # --resume: this model is complete in the earlier JSON
            rows.extend(r for r in old_rows if r["model"] == name)
            builds.extend(b for b in previous.get("builds", []) if b.get("model") == name)
            log(f"{name}: kept from {args.json}")
            continue
        built = []
        paths = {}
        for e in ents:
            missing = missing_requirements(e)
            cached = None if missing else cached_zoo_path(name, e.exporter)
            if missing:
                b = {"model": name, "exporter": e.exporter, "ok": False,
                     "reason": f"missing Python package(s): {', '.join(missing)}"}
            elif cached:
                b = {"model": name, "exporter": e.exporter, "ok": True, "path": cached, "cached": True, "wall_s": 0.0}
            else:
                task = dict(common, kind="build", model=name, exporter=e.exporter)
                b = dict(run_isolated(task, args.build_timeout, logdir), model=name, exporter=e.exporter)
            builds.append(b)
            took = "cached" if b.get("cached") else f"{b.get('wall_s') or 0:.1f}s"
            log(f"build {name}.{e.exporter}: {'ok' if b['ok'] else 'FAIL ' + b.get('reason', '')} ({took})")
            if b["ok"]:
                built.append(e)
                paths[e.exporter] = b["path"]
            else:
                for tool in tools:
                    if tool == "torch-pruning" and not e.is_torch:
                        continue
                    r = empty_row(name, e.exporter, tool)
                    r["reason"] = f"model build failed: {b.get('reason')}"
                    rows.append(r)
        exps = [e.exporter for e in built]
        if "graphprune" in tools:
            for exp in exps:  # one process per file: graphprune imports fast
                task = dict(common, kind="graphprune", model=name, exporters=[exp], paths=paths)
                record(run_isolated(task, args.timeout, logdir), name, [exp], "graphprune")
        if "onnxsim" in tools and exps:  # one process per model: importing onnxsim.pruning is slow
            task = dict(common, kind="onnxsim", model=name, exporters=exps, paths=paths)
            record(run_isolated(task, args.timeout * len(exps), logdir), name, exps, "onnxsim")
        torch_built = [e.exporter for e in built if e.is_torch]
        if "torch-pruning" in tools and torch_built:
            task = dict(common, kind="torch-pruning", model=name, exporters=torch_built, paths=paths,
                        tp_step_timeout=args.tp_step_timeout)
            record(run_isolated(task, args.tp_timeout or args.timeout, logdir), name, torch_built, "torch-pruning")
        for exp in exps:
            measure(name, exp)
            for r in rows:
                if r["model"] == name and r["exporter"] == exp:
                    status = "ok" if r["success"] else f"FAIL {r['reason']}"
                    log(f"  {r['tool']:13s} {name}.{exp}: macs {_fmt(r['macs_ratio'])} "
                        f"lat {_fmt(r['latency_ratio'])} err {_sci(r['fidelity_rel_err'])} {status}")
        checkpoint(partial=True)
    return checkpoint(partial=False)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench_zoo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="zoo model names (default: all); see python -m models.zoo --list")
    p.add_argument("--exporters", nargs="+", help="torchscript, dynamo, tf2onnx, paddle2onnx, onnx-caffe2 "
                                                  "(default: all)")
    p.add_argument("--tools", nargs="+", help=f"subset of {', '.join(TOOLS)} (default: all)")
    p.add_argument("--target-flops", type=number_in(check_ratio), default=0.5, help="fraction of MACs to keep (default 0.5)")
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--markdown", help="replace the zoo section of this markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per (model, tool) subprocess")
    p.add_argument("--tp-timeout", type=float, help="seconds for a Torch-Pruning subprocess (default: --timeout)")
    p.add_argument("--tp-step-timeout", type=float, default=120,
                   help="seconds for one Torch-Pruning prune at one ratio (default 120)")
    p.add_argument("--build-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to export one model")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20)")
    p.add_argument("--no-latency", action="store_true", help="skip latency (fidelity only)")
    p.add_argument("--resume", action="store_true",
                   help="with --json: keep the models that JSON already has in full, run the rest")
    p.add_argument("--keep-pruned", action="store_true", help="keep the pruned files under WORKDIR/pruned")
    p.add_argument("--workdir", default=str(ROOT / "out" / "bench_zoo"), help="logs and temporary files")
    p.add_argument("--from-json", metavar="JSON",
                   help="do not run: render the markdown of an earlier --json result (with --markdown, update it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker), args.result)
    if args.from_json:
        section = markdown_section(json.loads(Path(args.from_json).read_text()))
        if args.markdown:
            write_markdown(Path(args.markdown), section)
        else:
            print(section)
        return 0
    shown = list(sys.argv[1:] if argv is None else argv)
    command = "python tools/bench_zoo.py " + " ".join(shlex.quote(a) for a in shown)
    result = run_benchmark(args, command.strip())
    section = markdown_section(result)
    if args.markdown:
        write_markdown(Path(args.markdown), section)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
