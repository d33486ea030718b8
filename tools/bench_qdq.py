#!/usr/bin/env python3
"""Quantized (QDQ) models: quantize example models with onnxruntime's static quantizer (QDQ
format, per-channel and per-tensor INT8 weights, 4 synthetic calibration batches), prune each
to ``--target-flops`` with the oracle on, and report groups, MACs ratio, oracle error, whether
the weights are still INT8, and the onnxruntime CPU latency of both files (its optimisations
fuse QDQ pairs into integer kernels).

Usage::

    python tools/bench_qdq.py [--models resnet_basic,mobilenet_v2,...] [--cached bert_block,hf_bert]
        [--target-flops 0.5] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

START, END = "<!-- qdq:start -->", "<!-- qdq:end -->"
TITLE = "## Quantized (QDQ) models"


def _quantize_dynamic(src: str, dest: str, per_channel: bool) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dest, per_channel=per_channel, weight_type=QuantType.QInt8)
    return dest


def _quantize(src: str, dest: str, per_channel: bool) -> str:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from graphprune.runtime import synthetic_inputs

    model = onnx.load(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([synthetic_inputs(model, batch=1, seed=i) for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(src, dest, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel)
    return dest


def _sources(args, tmp: Path) -> list[tuple[str, str]]:
    from models.export import export_onnx
    from models.transformer import build_transformer_onnx

    out = []
    for name in args.models:
        out.append((name, export_onnx(name, tmp / f"{name}.onnx", dynamo=False, input_shape=(1, 3, 64, 64))))
    for name in args.transformers:
        out.append((name, build_transformer_onnx(name, False, tmp)))
    return out


def measure(args) -> list[dict]:
    import onnx

    import graphprune
    from graphprune.bench import bench_models

    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-qdq-") as d:
        tmp = Path(d)
        for name, src in _sources(args, tmp):
            modes = [("static", True), ("static", False)]
            if name in args.transformers:
                modes += [("dynamic", True), ("dynamic", False)]
            for mode, per_channel in modes:
                quantize = _quantize if mode == "static" else _quantize_dynamic
                q = quantize(src, str(tmp / f"{name}.{mode}{int(per_channel)}.onnx"), per_channel)
                row = {"model": name, "weights": f"{mode}, {'per-channel' if per_channel else 'per-tensor'}"}
                t0 = time.perf_counter()
                try:
                    res = graphprune.prune(q, target_flops=args.target_flops, verify=True)
                except Exception as exc:
                    rows.append(row | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    continue
                out = res.save(tmp / f"{name}.{mode}{int(per_channel)}.pruned.onnx")
                row["prune_s"] = time.perf_counter() - t0
                oracle = res.report["oracle"]
                row["oracle"] = oracle["equivalent"]
                row["oracle_err"] = max(v["max_rel"] for k, v in oracle.items() if k.startswith("batch"))
                row["groups"] = len(res.context.groups)
                row["macs_ratio"] = graphprune.analyze(out).cost.macs / graphprune.analyze(q).cost.macs
                ints = [t for t in onnx.load(out).graph.initializer if t.data_type in (2, 3) and len(t.dims) >= 2]
                row["int8_weights"] = len(ints)
                b = bench_models([q, out], backend="ort-cpu", threads=2, runs=args.runs, warmup=3, seq=32)
                row["orig_ms"], row["pruned_ms"] = b["models"][0]["median_ms"], b["models"][1]["median_ms"]
                row["speedup"] = b["models"][1]["speedup"]
                rows.append(row)
                print(f"{name} {row['weights']}: MACs {row['macs_ratio']:.3f}, oracle "
                      f"{'holds' if row['oracle'] else 'FAILS'} ({row['oracle_err']:.1e}), "
                      f"{row['orig_ms']:.2f} -> {row['pruned_ms']:.2f} ms", flush=True)
    return rows


def section(rows: list[dict], command: str, seconds: float) -> str:
    import platform

    import onnxruntime

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [START, TITLE, "", f"`{command}` ({_dt.date.today().isoformat()}, {seconds:.0f} s; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load} at the "
             f"end, onnxruntime {onnxruntime.__version__})", "",
             "Each model quantized by onnxruntime's `quantize_static` (QDQ format, INT8, 4 synthetic calibration "
             "batches; \"static\") and, for the transformer blocks, by `quantize_dynamic` (DynamicQuantizeLinear + "
             "MatMulInteger, INT8 weights; \"dynamic\"), then `graphprune.prune(q, target_flops=0.5, verify=True)`. The oracle compares the "
             "pruned model with the masked original without the activations' fake-quant rounding (see README); "
             "latency is onnxruntime CPU, 2 threads, batch 1 (sequence 32), both files as saved (its optimiser fuses the QDQ "
             "pairs into integer kernels; with a load average above the CPU count the latency columns are noise).", "",
             "| model | quantization | groups | MACs ratio | oracle (max rel err) | INT8 weights kept | prune s "
             "| original ms | pruned ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['weights']} | | | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['weights']} | {r['groups']} | {r['macs_ratio']:.3f} | "
                     f"{'yes' if r['oracle'] else 'NO'} ({r['oracle_err']:.1e}) | {r['int8_weights']} | "
                     f"{r['prune_s']:.1f} | {r['orig_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", "The latency columns are indicative only: most of these models run in about a millisecond at batch 1, "
              "and onnxruntime replaces a DQ -> op -> Q pattern by an integer kernel only where its fusion rules "
              "match, so the same model can time very differently per-channel and per-tensor. The claims here are "
              "the MACs ratio, the exact oracle and that the weights stay INT8.", "", END]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    from graphprune.paths import write_text_atomic

    write_text_atomic(path, doc)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python tools/bench_qdq.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet_basic,resnet_bottleneck,mobilenet_v2,mobilenet_v3,densenet,shufflenet")
    p.add_argument("--transformers", default="bert_block,gpt2_block", help="models/ transformer blocks ('none')")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--markdown", help="replace the QDQ section of this file")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m and m != "none"]
    args.transformers = [m for m in args.transformers.split(",") if m and m != "none"]
    t0 = time.perf_counter()
    rows = measure(args)
    text = section(rows, "python tools/bench_qdq.py " + " ".join(argv), time.perf_counter() - t0)
    print(text)
    if args.markdown:
        write_markdown(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
