#!/usr/bin/env python3
"""Measured speed-up of graphprune's pruned models against their MACs reduction.

For every example CNN (``models/cnn.py``, exported at ``--size`` x ``--size`` where the
builder allows, else at its own input size) and, when ``models/zoo.py`` can build them, the
zoo entries named by ``--zoo``: prune with ``graphprune.prune(target_flops=R)``, then time the
original and the pruned file side by side with ``graphprune.bench.bench_models`` (one
backend, interleaved runs, median) at each batch size. The goal of issue 6 is a measured
speed-up of at least 0.9 x the MACs reduction (0.9 / MACs ratio; 0.5 MACs -> 1.8x).

With ``--target-latency R`` it also runs ``graphprune.latency.prune_to_latency`` (latency
lookup table + measured search) at batch 1 and reports its MACs ratio and measured ratio.

Usage::

    python tools/bench_latency.py [--models resnet_basic,...] [--zoo efficientnet_lite0,...|none]
        [--size 224] [--target-flops 0.5] [--threads 2] [--batches 1,8] [--runs 30] [--warmup 5]
        [--backend ort-cpu] [--target-latency 0.5] [--json out.json] [--markdown BENCHMARKS.md]
    python tools/bench_latency.py --from-json out.json --markdown BENCHMARKS.md   # rewrite the section only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

START, END = "<!-- latency:start -->", "<!-- latency:end -->"
TITLE = "## Latency: measured speed-up vs MACs reduction"
DEFAULT_ZOO = ("efficientnet_lite0", "caffe2_resnet50", "caffe2_squeezenet", "caffe2_shufflenet", "hf_bert",
               "minilm_l6")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {}
    for dist in ("graphprune", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx", "torch", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "python": platform.python_version(),
            "load_average": load,
            "platform": platform.platform(), "versions": versions}


# --------------------------------------------------------------------------- models


def cnn_models(names: list[str], size: int, outdir: Path) -> list[dict]:
    """Export each example CNN at size x size (or its own input size when that fails)."""
    import torch
    from models.cnn import CNN_MODELS, INPUT_SHAPES
    from models.export import export_onnx

    out = []
    for name in names:
        if name not in CNN_MODELS:
            out.append({"model": name, "error": f"unknown CNN (choose from {', '.join(CNN_MODELS)})"})
            continue
        path = outdir / f"{name}.{size}.onnx"
        shape = (1, 3, size, size)
        try:
            with torch.no_grad():
                CNN_MODELS[name]()(torch.zeros(shape))  # e.g. a flatten head fixes the spatial size
            export_onnx(name, path, dynamo=False, input_shape=shape)
        except Exception:
            shape = tuple(INPUT_SHAPES[name])
            path = outdir / f"{name}.{shape[-1]}.onnx"
            export_onnx(name, path, dynamo=False, input_shape=shape)
        out.append({"model": name, "source": "models/cnn.py", "path": str(path),
                    "input": "x".join(str(d) for d in shape[1:])})
    return out


def zoo_models(names: list[str]) -> list[dict]:
    """Build the named zoo entries (first exporter that is torchscript or a shipped ONNX file)."""
    if not names:
        return []
    try:
        from models import zoo
    except Exception as exc:  # another helper owns models/zoo.py: skip what is missing
        return [{"model": n, "error": f"models.zoo unavailable: {_first_line(exc)}"} for n in names]
    out = []
    for name in names:
        entries = [e for e in zoo.zoo_entries() if e.name == name and e.exporter != "dynamo"]
        if not entries:
            out.append({"model": name, "error": "not in the zoo"})
            continue
        entry = entries[0]
        missing = zoo.missing_requirements(entry)
        if missing:
            out.append({"model": name, "error": f"needs {', '.join(missing)}"})
            continue
        try:
            path = zoo.build_zoo_model(name, entry.exporter, None)
        except Exception as exc:
            out.append({"model": name, "error": f"build failed: {_first_line(exc)}"})
            continue
        out.append({"model": name, "source": f"zoo ({entry.exporter})", "path": str(path), "input": _input_desc(path)})
    return out


def _input_desc(path: str) -> str:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    init = {t.name for t in proto.graph.initializer}
    parts = []
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        dims = [str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in vi.type.tensor_type.shape.dim]
        parts.append(f"{vi.name}[{'x'.join(dims)}]")
    return ", ".join(parts)


# --------------------------------------------------------------------------- measuring


def measure(item: dict, args, outdir: Path) -> list[dict]:
    import graphprune
    from graphprune.bench import bench_models

    rows = []
    t0 = time.perf_counter()
    try:
        result = graphprune.prune(item["path"], target_flops=args.target_flops)
    except Exception as exc:
        return [{**item, "error": f"prune failed: {_first_line(exc)}"}]
    pruned = outdir / f"{Path(item['path']).stem}.pruned.onnx"
    result.save(pruned)
    prune_s = time.perf_counter() - t0
    # MACs of both files by the same analysis (normalised graphs), independent of the prune report
    r = dict(result.report)
    before, after = graphprune.analyze(item["path"]).cost.macs, graphprune.analyze(str(pruned)).cost.macs
    r.update(report_macs_ratio=r["macs_ratio"], macs_before=before, macs_after=after, macs_ratio=after / before)
    for threads, batch in [(t, b) for t in args.threads for b in args.batches]:
        try:
            b = bench_models([item["path"], str(pruned)], backend=args.backend, runs=args.runs, warmup=args.warmup,
                             threads=threads, batch=batch, seq=args.seq)
        except Exception as exc:
            rows.append({**item, "batch": batch, "threads": threads, "error": f"bench failed: {_first_line(exc)}"})
            continue
        orig, new = b["models"]
        rows.append({**item, "batch": batch, "threads": threads, "backend": b["backend_label"],
                     "macs_before": r["macs_before"], "report_macs_ratio": r["report_macs_ratio"],
                     "macs_ratio": r["macs_ratio"], "params_ratio": r["params_ratio"], "prune_s": prune_s,
                     "orig_ms": orig["median_ms"], "pruned_ms": new["median_ms"], "orig_spread": orig["spread"],
                     "pruned_spread": new["spread"], "speedup": new["speedup"],
                     "speedup_p10": orig["p10_ms"] / new["p10_ms"] if new["p10_ms"] > 0 else float("nan"),
                     "goal_speedup": 0.9 / r["macs_ratio"], "goal_met": new["speedup"] >= 0.9 / r["macs_ratio"],
                     "efficiency": new["speedup"] * r["macs_ratio"]})
        print(f"  {threads} threads, batch {batch}: MACs {r['macs_ratio']:.3f}  "
              f"{orig['median_ms']:.2f} -> {new['median_ms']:.2f} ms  "
              f"speed-up {new['speedup']:.2f}x (goal {0.9 / r['macs_ratio']:.2f}x)", flush=True)
    if args.target_latency:
        from graphprune.latency import prune_to_latency

        try:
            res = prune_to_latency(item["path"], args.target_latency, args.backend, threads=args.threads[0],
                                   runs=args.runs, warmup=args.warmup, seq=args.seq,
                                   cache_dir=outdir / "latency-cache")
            lat = res.report["latency"]
            macs = graphprune.analyze(res.model).cost.macs / graphprune.analyze(item["path"]).cost.macs
            rows.append({**item, "batch": 1, "threads": args.threads[0],
                         "mode": f"--target-latency {args.target_latency}",
                         "backend": lat["backend_label"], "macs_ratio": macs,
                         "macs_before": res.report["macs_before"], "orig_ms": lat["original_ms"],
                         "pruned_ms": lat["pruned_ms"], "speedup": lat["speedup"],
                         "latency_ratio": lat["measured_ratio"],
                         "lut_predicted_ratio": lat["lut_predicted_ratio"], "target_met": lat["met"],
                         "search_steps": len(lat["search"])})
            print(f"  --target-latency {args.target_latency}: MACs {macs:.3f}, measured latency "
                  f"{lat['measured_ratio']:.3f} ({'met' if lat['met'] else 'NOT met'})", flush=True)
        except Exception as exc:
            rows.append({**item, "batch": 1, "mode": f"--target-latency {args.target_latency}",
                         "error": _first_line(exc)})
    return rows


# --------------------------------------------------------------------------- report


def _fmt_macs(m: float) -> str:
    return f"{m / 1e9:.2f}G" if m >= 1e9 else f"{m / 1e6:.1f}M"


def markdown_section(result: dict) -> str:
    a, m = result["args"], result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    rows = [r for r in result["rows"] if "error" not in r and "mode" not in r]
    lines = [
        START,
        TITLE,
        "",
        f"`{result['command']}` ({result['date']}, {result['seconds']:.0f} s)",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable logical CPUs ({m['logical_cpus']} in total); "
        f"Python {m['python']}; {versions}. Backend: onnxruntime CPU ({a['backend']}), intra-op threads "
        f"{', '.join(map(str, a['threads']))}, {a['runs']} timed runs after {a['warmup']} warm-up, original and pruned "
        "interleaved; latency = median (**p10 speed-up** compares the 10th percentiles, less sensitive to other "
        f"load). Load average {m.get('load_average')} at the start, {result.get('load_end')} at the end. "
        "No GPU on this machine: TensorRT and onnxruntime CUDA were not measured.",
        "",
        f"Every model pruned with `graphprune MODEL --target-flops {a['target_flops']}` (l1, round-to 8); MACs "
        "of the original and the pruned file both by `graphprune.analyze(path).cost` (dynamic axes count as 1). "
        "**goal** = 0.9 / MACs ratio (issue 6: measured speed-up at least 0.9x the MACs reduction); "
        "**eff** = speed-up x MACs ratio (1.0 = latency falls exactly as MACs do).",
        "",
        "| model | input | MACs | MACs ratio | threads | batch | original ms | pruned ms | speed-up | p10 speed-up "
        "| goal | met | eff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {_fmt_macs(r['macs_before'])} | {r['macs_ratio']:.3f} | "
                     f"{r['threads']} | {r['batch']} | {r['orig_ms']:.2f} | {r['pruned_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['speedup_p10']:.2f}x | {r['goal_speedup']:.2f}x | {'yes' if r['goal_met'] else 'no'} | "
                     f"{r['efficiency']:.2f} |")
    if rows:
        met = sum(r["goal_met"] for r in rows)
        effs = sorted(r["efficiency"] for r in rows)
        lines += ["", f"Goal met in {met} of {len(rows)} (model, threads, batch) rows; median efficiency "
                      f"{effs[len(effs) // 2]:.2f}."]
    lat_rows = [r for r in result["rows"] if "mode" in r]
    if lat_rows:
        lines += ["", f"`prune_to_latency` (latency lookup table + measured search), batch 1, "
                      f"{a['threads'][0]} threads:", "",
                  "| model | target | MACs ratio | measured latency ratio | LUT prediction | met | steps |",
                  "|---|---|---|---|---|---|---|"]
        for r in lat_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['mode']} | | | | error: {r['error']} | |")
                continue
            pred = f"{r['lut_predicted_ratio']:.3f}" if r.get("lut_predicted_ratio") is not None else "-"
            lines.append(f"| {r['model']} | {r['mode']} | {r['macs_ratio']:.3f} | {r['latency_ratio']:.3f} | {pred} | "
                         f"{'yes' if r['target_met'] else 'no'} | {r['search_steps']} |")
    odd = sorted({r["model"] for r in rows
                  if abs(r.get("report_macs_ratio", r["macs_ratio"]) - r["macs_ratio"]) > 0.01})
    if odd:
        lines += ["", "The prune report's own `macs_ratio` disagrees with the analysis of the two files for: "
                      + ", ".join(f"{m} (report {next(r['report_macs_ratio'] for r in rows if r['model'] == m):.3f})"
                                  for m in odd) + " (a cost-model issue in the report, not in the pruned model)."]
    errors = [r for r in result["rows"] if "error" in r and "mode" not in r]
    if errors:
        lines += ["", "Not measured:", ""]
        lines += list(dict.fromkeys(f"- {r['model']}: {r['error']}" for r in errors))
    if result.get("notes"):
        lines += ["", result["notes"].strip()]
    lines += ["", END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace the text between the latency markers (appending them if missing); other
    sections are left alone. The file is re-read right before writing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        new = head + section + tail
    elif END in text and TITLE in text.split(END, 1)[0]:
        # the start marker was lost (a tool that replaces "## " sections took the line before our
        # heading as its own): our section runs from our heading to the end marker
        before, tail = text.split(END, 1)
        head = before[:before.rindex(TITLE)]
        new = head.rstrip("\n") + "\n\n" + section + tail
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python tools/bench_latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet_basic,resnet_bottleneck,mobilenet_v2,mobilenet_v3,densenet,shufflenet,"
                                        "group_conv,flatten_head", help="example CNNs (comma-separated; 'none')")
    p.add_argument("--zoo", default=",".join(DEFAULT_ZOO), help="zoo entries (comma-separated; 'none')")
    p.add_argument("--size", type=int, default=224, help="CNN input height/width (default: 224)")
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--target-latency", type=float, default=None, help="also run prune_to_latency at this target")
    p.add_argument("--backend", default="ort-cpu", choices=("auto", "trt", "ort-cuda", "ort-cpu"))
    p.add_argument("--threads", default="2", help="onnxruntime intra-op threads, comma-separated (default: 2)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seq", type=int, default=128, help="sequence length of token inputs (default: 128)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write all rows as JSON")
    p.add_argument("--markdown", help="replace the latency section (between its markers) of this file")
    p.add_argument("--from-json", help="measure nothing: write the section from an earlier --json file")
    p.add_argument("--notes", help="a markdown file whose text ends the section (e.g. an analysis of the results)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in _split(args.batches)]
    args.threads = [int(t) for t in _split(args.threads)]
    args.models = [] if args.models == "none" else _split(args.models)
    args.zoo = [] if args.zoo == "none" else _split(args.zoo)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.from_json:
        section = markdown_section(json.loads(Path(args.from_json).read_text()) | ({"notes": notes} if notes else {}))
        print(section)
        if args.markdown:
            write_markdown(Path(args.markdown), section)
        return 0
    t0 = time.perf_counter()
    machine = machine_info()  # load average before we add to it
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
        outdir = Path(tmp)
        items = cnn_models(args.models, args.size, outdir) + zoo_models(args.zoo)
        for item in items:
            if "error" in item:
                print(f"{item['model']}: skipped ({item['error']})", flush=True)
                rows.append(item)
                continue
            print(f"{item['model']} ({item['input']})", flush=True)
            try:
                rows.extend(measure(item, args, outdir))
            except Exception as exc:  # keep going: one model's failure is a row
                if os.environ.get("GRAPHPRUNE_DEBUG"):
                    traceback.print_exc()
                rows.append({**item, "error": _first_line(exc)})
    backend = next((r["backend"] for r in rows if "backend" in r), None)
    try:
        load_end = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_end = None
    result = {"command": "python tools/bench_latency.py " + " ".join(argv), "date": _dt.date.today().isoformat(),
              "seconds": time.perf_counter() - t0, "machine": machine, "backend": backend, "load_end": load_end,
              "notes": notes, "rows": rows,
              "args": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "from_json", "notes")}}
    section = markdown_section(result)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        write_markdown(Path(args.markdown), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
