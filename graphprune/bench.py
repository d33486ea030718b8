"""`graphprune bench MODEL [MODEL ...]`: latency side by side on TensorRT or onnxruntime.

Every model gets the same synthetic inputs; after warm-up, timed runs go round-robin over
the models in a few rounds (order reversed every other round), so load drift on the machine
hits all of them alike. Reported per model: median, p10/p90, relative spread
((p90 - p10) / median), throughput (items per second at the batch size) and the ratio of its
median to the first model's. The output always says which backend ran, and why any better
one was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .argtypes import EXIT_BAD_INPUT, EXIT_OK, ArgParser, parse_shape
from .backends import BACKENDS, Backend, select_backend
from .errors import BadInputError
from .options import add_option_arguments, option, options_from_args
from .runtime import synthetic_inputs

__all__ = ["main", "build_parser", "bench_models", "format_bench", "parse_shape", "time_sessions", "feeds_for",
           "latency_stats", "add_bench_options", "bench_kwargs", "bench_from_args", "shapes_from_args",
           "BenchOptions"]

DEFAULT_RUNS, DEFAULT_WARMUP, DEFAULT_SEQ = 50, 10, 128


def _load_header(model) -> onnx.ModelProto:
    """The model's graph without external weight data (enough to read its inputs)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise BadInputError(f"{path}: not an ONNX model ({type(exc).__name__})") from None


def _graph_inputs(proto: onnx.ModelProto) -> dict[str, list]:
    init = {t.name for t in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in vi.type.tensor_type.shape.dim]
    return out


def feeds_for(model, *, batch: int = 1, shapes: dict | None = None, seq: int = DEFAULT_SEQ,
              seed: int = 0, label: str = "model") -> dict[str, np.ndarray]:
    """Seeded synthetic inputs: `shapes` (name -> dims) where given, else the first dynamic axis
    is `batch` and other dynamic axes are `seq`. Checks the shapes against the model."""
    proto = _load_header(model)
    inputs = _graph_inputs(proto)
    shapes = dict(shapes or {})
    for name, shape in shapes.items():
        if name not in inputs:
            continue
        declared = inputs[name]
        if len(declared) != len(shape):
            raise BadInputError(f"{label}: input {name} has rank {len(declared)}, --shape gives {len(shape)} dims")
        for axis, (d, s) in enumerate(zip(declared, shape)):
            if d is not None and d != s:
                raise BadInputError(f"{label}: input {name} has static size {d} on axis {axis}, --shape gives {s}")
    if batch != 1:
        dyn = [n for n, dims in inputs.items() if n not in shapes and dims and dims[0] is None]
        if not dyn and not shapes:
            raise BadInputError(f"{label}: no input has a dynamic batch axis, so --batch {batch} cannot apply "
                                "(give the full shape with --shape NAME:DxDx...)")
    return synthetic_inputs(proto, batch=batch, seq=seq, seed=seed, shapes={k: v for k, v in shapes.items()
                                                                             if k in inputs})


def latency_stats(ms: np.ndarray, batch: int) -> dict:
    ms = np.asarray(ms, dtype=np.float64)
    median = float(np.median(ms))
    p10, p90 = (float(v) for v in np.percentile(ms, [10, 90]))
    return {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "spread": (p90 - p10) / median if median > 0 else 0.0,
            "throughput": batch * 1e3 / median if median > 0 else float("inf"), "runs": int(ms.size)}


def time_sessions(sessions: list, runs: int, warmup: int, rounds: int = 5) -> list[np.ndarray]:
    """Warm every session up, then time `runs` runs of each, round-robin in `rounds` chunks."""
    for s in sessions:
        if warmup > 0:
            s.time(warmup)
    rounds = max(1, min(rounds, runs))
    chunks = [len(c) for c in np.array_split(np.arange(runs), rounds)]
    times: list[list] = [[] for _ in sessions]
    for r, n in enumerate(chunks):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            times[i].append(sessions[i].time(n))
    return [np.concatenate(t) for t in times]


def _label(model, i: int) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or f"model{i}"
    return os.fspath(model)


def bench_models(models: list, *, backend: "str | Backend" = "auto", runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP, threads: int = 0, batch: int = 1, shapes: dict | None = None,
                 seq: int = DEFAULT_SEQ, fp16: bool = False, seed: int = 0, rounds: int = 5,
                 labels: list[str] | None = None) -> dict:
    """Latency of each model (path or ModelProto) on one backend, side by side.

    Returns ``{"backend", "backend_label", "note", "runs", "warmup", "batch", "threads",
    "models": [{"model", "inputs", "median_ms", "p10_ms", "p90_ms", "spread", "throughput",
    "ratio", "speedup", ...}]}``; "ratio" is the model's median over the first model's and
    "speedup" its inverse. `backend` is a name ("auto" = best available) or a Backend.
    """
    if not models:
        raise BadInputError("give at least one model")
    for name, value in (("runs", runs), ("batch", batch), ("seq", seq)):
        if int(value) < 1:
            raise BadInputError(f"{name} must be >= 1, got {value}")
    if int(warmup) < 0 or int(threads) < 0:
        raise BadInputError("warmup and threads must be >= 0")
    labels = list(labels) if labels else [_label(m, i) for i, m in enumerate(models)]
    shapes = dict(shapes or {})
    protos = [_load_header(m) for m in models]
    known = set().union(*(_graph_inputs(p) for p in protos))
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise BadInputError(f"--shape names {', '.join(unknown)}, not an input of any model "
                            f"(inputs: {', '.join(sorted(known)) or 'none'})")
    feeds = [feeds_for(p, batch=batch, shapes=shapes, seq=seq, seed=seed, label=lab)
             for p, lab in zip(protos, labels)]
    bk = backend if isinstance(backend, Backend) else select_backend(backend, threads=threads, fp16=fp16)
    sessions = []
    try:
        for m, f in zip(models, feeds):
            sessions.append(bk.load(m, f))
        times = time_sessions(sessions, int(runs), int(warmup), rounds)
    finally:
        for s in sessions:
            s.close()
    rows = []
    for lab, f, t in zip(labels, feeds, times):
        rows.append({"model": lab, "inputs": {k: list(v.shape) for k, v in f.items()}} | latency_stats(t, batch))
    first = rows[0]["median_ms"]
    for row in rows:
        row["ratio"] = row["median_ms"] / first if first > 0 else float("nan")
        row["speedup"] = first / row["median_ms"] if row["median_ms"] > 0 else float("nan")
    return {"backend": bk.name, "backend_label": bk.label, "note": bk.note, "runs": int(runs),
            "warmup": int(warmup), "batch": int(batch), "threads": int(threads), "models": rows}


def format_bench(result: dict) -> str:
    """The table `graphprune bench` prints."""
    lines = [f"backend  {result['backend_label']}   batch {result['batch']}   "
             f"{result['runs']} timed runs after {result['warmup']} warm-up, round-robin"]
    width = max(12, *(len(_short(r["model"])) for r in result["models"]))
    lines.append(f"{'model':<{width}}  {'median ms':>10}  {'p10 ms':>9}  {'p90 ms':>9}  {'spread':>7}  "
                 f"{'items/s':>9}  vs first")
    for i, r in enumerate(result["models"]):
        faster = "faster" if r["speedup"] >= 1 else "slower"
        vs = "1.000" if i == 0 else f"{r['ratio']:.3f} ({r['speedup']:.2f}x {faster})"
        lines.append(f"{_short(r['model']):<{width}}  {r['median_ms']:>10.3f}  {r['p10_ms']:>9.3f}  "
                     f"{r['p90_ms']:>9.3f}  "
                     f"{100 * r['spread']:>6.1f}%  {r['throughput']:>9.1f}  {vs}")
    return "\n".join(lines)


def _short(path: str, n: int = 60) -> str:
    return path if len(path) <= n else "..." + path[-(n - 3):]


# --------------------------------------------------------------------------- CLI


BENCH = "bench"


@dataclass
class BenchOptions:
    """The latency options of `graphprune bench`, a prune's `--bench` and `--target-latency`: defaults,
    checks and help defined once; the argument group is built from this (graphprune/options.py)."""

    backend: str = option(
        "auto", "auto (default: TensorRT, else onnxruntime CUDA, else PyTorch CUDA via onnx2torch, else onnxruntime "
                "CPU), trt, ort-cuda, torch-cuda, ort-cpu; an unavailable one falls back to the next, with a "
                "one-line note", choices=("auto", *BACKENDS), commands=(BENCH,))
    runs: int = option(DEFAULT_RUNS, "timed runs per model (default: {default})", kind="int>=1", metavar="N",
                       commands=(BENCH,))
    warmup: int = option(DEFAULT_WARMUP, "untimed runs first (default: {default})", kind="int>=0", metavar="N",
                         commands=(BENCH,))
    threads: int = option(0, "onnxruntime intra-op threads (default: 0 = onnxruntime's choice)", kind="int>=0",
                          metavar="N", commands=(BENCH,))
    batch: int = option(1, "size of each input's dynamic first axis (default: {default})", kind="int>=1",
                        metavar="N", commands=(BENCH,))
    seq: int = option(DEFAULT_SEQ, "size of other dynamic axes, e.g. sequence length (default: {default})",
                      kind="int>=1", metavar="N", commands=(BENCH,))
    shape: tuple = option(tuple, "full shape of one input, e.g. input:1x3x224x224 (repeatable; overrides "
                                 "--batch/--seq; prune also counts MACs at it)", action="append", metavar="NAME:DxD...", commands=(BENCH,))
    fp16: bool = option(False, "TensorRT: build the engine with fp16 enabled; PyTorch CUDA: run the module in fp16",
                        kind="flag", commands=(BENCH,))


def add_bench_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The latency options shared by `graphprune bench` and a prune's `--bench`/`--target-latency`.

    With `prefix` (e.g. "bench-") every option is named `--{prefix}NAME` (dest `{prefix}NAME`
    with underscores), for parsers that already use a name such as --batch; pass the same
    prefix to :func:`bench_from_args`.
    """
    add_option_arguments(p, BENCH, BenchOptions, prefix=prefix)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="graphprune bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Latency of one or more ONNX models side by side (the first is the reference): "
                            "median, p10/p90, spread, throughput and the ratio to the first model.",
                epilog="examples:\n  graphprune bench model.onnx model.pruned.onnx --threads 2\n"
                       "  graphprune bench model.onnx model.pruned.onnx --shape input:8x3x224x224 --json bench.json\n"
                       "  graphprune bench model.onnx --backend trt --fp16\n")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files; ratios are relative to the first")
    add_bench_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def _arg(args, name: str, prefix: str):
    return getattr(args, f"{prefix}{name}".replace("-", "_"))


def shapes_from_args(args, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The --shape options as {input name: shape}."""
    shapes = {}
    for text in _arg(args, "shape", prefix) or ():
        name, shape = parse_shape(text)
        if name in shapes and shapes[name] != shape:
            raise BadInputError(f"--shape gives input {name} twice with different shapes")
        shapes[name] = shape
    return shapes


def bench_kwargs(args, prefix: str = "") -> dict:
    """Keyword arguments for bench_models / prune_to_latency from :func:`add_bench_options`' options."""
    kwargs = options_from_args(args, BENCH, BenchOptions, prefix=prefix)
    del kwargs["shape"]  # given as {input name: shape}
    return kwargs | {"shapes": shapes_from_args(args, prefix)}


def bench_from_args(models: list, args, labels: list[str] | None = None, prefix: str = "") -> dict:
    """bench_models with the options of :func:`add_bench_options`."""
    return bench_models(models, labels=labels, **bench_kwargs(args, prefix))


def write_json(path: "str | os.PathLike", data: dict) -> None:
    from .paths import write_text_atomic

    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; give a file name")
    write_text_atomic(path, json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`graphprune bench ...`; returns the exit code (2 and one line on stderr for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, one line already printed)
        return int(exc.code or 0)
    try:
        from .paths import check_input, check_outputs, input_identities

        models = [check_input(m) for m in args.models]  # fail before spending minutes measuring
        inputs = {k: v for m in models for k, v in input_identities(m).items()}
        json_out = check_outputs([("--json", args.json)], inputs).get("--json")
        result = bench_from_args([str(m) for m in models], args)
        if result["note"]:
            print(f"graphprune: {result['note']}", file=sys.stderr)
        print(format_bench(result))
        if json_out is not None:
            write_json(json_out.path, result)
    except BadInputError as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK
