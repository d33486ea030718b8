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

GPU machines without the models' sources: ``--save-pairs DIR`` also writes each original and
pruned model as a *latency twin* (every float initializer set to one constant, gzipped: a
100 MB ResNet-50 becomes ~100 kB; dense kernels take the same time whatever the weights) and
a manifest with the MACs figures; ``--pairs DIR`` then measures those pairs on any backend
without pruning again (``--backend torch-cuda --fp16 --batches 1,32 --section gpu``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
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
GPU_START, GPU_END = "<!-- latency-gpu:start -->", "<!-- latency-gpu:end -->"
GPU_TITLE = "## Latency on a GPU: measured speed-up vs MACs reduction"
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
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    for dist in ("onnx2torch",):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "python": platform.python_version(),
            "load_average": load, "gpu": gpu,
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


# --------------------------------------------------------------------------- latency twins


TWIN_TAG = "graphprune-latency-twin"


def write_twin(src: str, dest: Path) -> None:
    """`src` without its float weights, gzipped to `dest`: each floating-point initializer keeps
    its name, dtype and shape and records its mean, standard deviation and sign in doc_string;
    :func:`fill_twin` draws seeded random values with those statistics. The graph, integer
    initializers (shapes, indices) and shapes are unchanged, so the twin runs the same kernels on
    the same shapes with values of the original's magnitude (no fp16 overflow)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(src)
    for t in proto.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and arr.size > 16:
            a64 = arr.astype(np.float64)
            stats = json.dumps([float(a64.mean()), float(a64.std()), bool(a64.min() >= 0)])
            dims, dtype, name = list(t.dims), t.data_type, t.name
            t.Clear()
            t.name, t.data_type, t.doc_string = name, dtype, f"{TWIN_TAG} {stats}"
            t.dims.extend(dims)
    with gzip.open(dest, "wb", compresslevel=6) as f:
        f.write(proto.SerializeToString())


def fill_twin(data: bytes, seed: int = 0) -> bytes:
    """A loadable model from a :func:`write_twin` file: recorded statistics -> seeded random values."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(data)
    rng = np.random.default_rng(seed)
    for t in proto.graph.initializer:
        if not t.doc_string.startswith(TWIN_TAG):
            continue
        mean, std, nonneg = json.loads(t.doc_string[len(TWIN_TAG):])
        values = rng.standard_normal(tuple(t.dims)) * std + mean
        if nonneg:
            values = np.abs(values)
        arr = values.astype(helper.tensor_dtype_to_np_dtype(t.data_type))
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return proto.SerializeToString()


def read_pairs(folder: Path, outdir: Path, wanted: list[str]) -> list[dict]:
    """The items of a --save-pairs folder, unzipped into `outdir` (only `wanted` names if any)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    items = []
    for item in manifest["items"]:
        if wanted and item["model"] not in wanted:
            continue
        for key in ("path", "pruned_path"):
            dest = outdir / Path(item[key]).name.removesuffix(".gz")
            with gzip.open(folder / item[key], "rb") as f:
                dest.write_bytes(fill_twin(f.read()))
            item[key] = str(dest)
        items.append(item)
    return items


# --------------------------------------------------------------------------- measuring


def measure(item: dict, args, outdir: Path) -> list[dict]:
    import graphprune
    from graphprune.bench import bench_models

    rows = []
    if "pruned_path" in item:  # from --pairs: pruned elsewhere, MACs figures in the manifest
        pruned, prune_s, r = Path(item.pop("pruned_path")), item.pop("prune_s"), item.pop("report")
    else:
        t0 = time.perf_counter()
        try:
            result = graphprune.prune(item["path"], target_flops=args.target_flops, round_to=args.round_to)
        except Exception as exc:
            return [{**item, "error": f"prune failed: {_first_line(exc)}"}]
        pruned = outdir / f"{Path(item['path']).stem}.pruned.onnx"
        result.save(pruned)
        prune_s = time.perf_counter() - t0
        # MACs of both files by the same analysis (normalised graphs), independent of the prune report
        r = dict(result.report)
        before, after = graphprune.analyze(item["path"]).cost.macs, graphprune.analyze(str(pruned)).cost.macs
        r.update(report_macs_ratio=r["macs_ratio"], macs_before=before, macs_after=after, macs_ratio=after / before)
        r = {k: r[k] for k in ("report_macs_ratio", "macs_before", "macs_after", "macs_ratio", "params_ratio")}
        if args.save_pairs:
            folder = Path(args.save_pairs)
            folder.mkdir(parents=True, exist_ok=True)
            stem = Path(item["path"]).stem
            write_twin(item["path"], folder / f"{item['model']}.onnx.gz")
            write_twin(str(pruned), folder / f"{item['model']}.pruned.onnx.gz")
            manifest_path = folder / "manifest.json"
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"items": []}
            manifest["items"] = [i for i in manifest["items"] if i["model"] != item["model"]]
            manifest["items"].append({**item, "path": f"{item['model']}.onnx.gz", "source_file": stem,
                                      "pruned_path": f"{item['model']}.pruned.onnx.gz", "prune_s": prune_s,
                                      "report": r, "target_flops": args.target_flops, "round_to": args.round_to})
            manifest_path.write_text(json.dumps(manifest, indent=1))
    for threads, batch in [(t, b) for t in args.threads for b in args.batches]:
        try:
            b = bench_models([item["path"], str(pruned)], backend=args.backend, runs=args.runs, warmup=args.warmup,
                             threads=threads, batch=batch, seq=args.seq, fp16=args.fp16)
        except Exception as exc:
            rows.append({**item, "batch": batch, "threads": threads, "error": f"bench failed: {_first_line(exc)}"})
            continue
        orig, new = b["models"]
        rows.append({**item, "batch": batch, "threads": threads, "backend": b["backend_label"],
                     "backend_name": b["backend"], "fp16": args.fp16, "round_to": item.get("round_to", args.round_to),
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

        lat_batch = args.batches[-1] if args.section == "gpu" and args.batches else 1
        try:
            res = prune_to_latency(item["path"], args.target_latency, args.backend, threads=args.threads[0],
                                   runs=args.runs, warmup=args.warmup, seq=args.seq, fp16=args.fp16,
                                   round_to=args.round_to, batch=lat_batch,
                                   cache_dir=outdir / "latency-cache")
            lat = res.report["latency"]
            macs = graphprune.analyze(res.model).cost.macs / graphprune.analyze(item["path"]).cost.macs
            rows.append({**item, "batch": lat_batch, "threads": args.threads[0],
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
            rows.append({**item, "batch": lat_batch, "mode": f"--target-latency {args.target_latency}",
                         "error": _first_line(exc)})
    return rows


# --------------------------------------------------------------------------- report


def _fmt_macs(m: float) -> str:
    return f"{m / 1e9:.2f}G" if m >= 1e9 else f"{m / 1e6:.1f}M"


def latency_target_table(lat_rows: list[dict], with_batch: bool) -> list[str]:
    """The markdown table of prune_to_latency rows (an error row keeps its one-line reason)."""
    head = ["model", "target"] + (["batch"] if with_batch else []) + \
        ["MACs ratio", "measured latency ratio", "LUT prediction", "met", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lat_rows:
        first = [r["model"], r["mode"]] + ([str(r.get("batch", ""))] if with_batch else [])
        if "error" in r:
            cells = first + ["", "", "", f"error: {r['error']}", ""]
        else:
            pred = f"{r['lut_predicted_ratio']:.3f}" if r.get("lut_predicted_ratio") is not None else "-"
            cells = first + [f"{r['macs_ratio']:.3f}", f"{r['latency_ratio']:.3f}", pred,
                             "yes" if r["target_met"] else "no", str(r["search_steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
        "No GPU on this machine (GPU figures: \"Latency on a GPU\" below).",
        "",
        f"Every model pruned with `graphprune MODEL --target-flops {a['target_flops']}` (l1, round-to {a.get('round_to', 8)}); MACs "
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
                      f"{a['threads'][0]} threads:", ""] + latency_target_table(lat_rows, with_batch=False)
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


def gpu_section(results: list[dict]) -> str:
    """The GPU section from one or more runs (e.g. fp32 and fp16) of --pairs on a GPU backend."""
    first = results[0]
    m = first["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [GPU_START, GPU_TITLE, ""]
    lines += [f"`{r['command']}` ({r['date']}, {r['seconds']:.0f} s)" for r in results]
    lines += ["", f"Machine: {m.get('gpu') or 'GPU'}; {m['cpu']}, {m['logical_cpus']} logical CPUs; Python "
                  f"{m['python']}; {versions}. "
                  f"{'-'.join(str(x) for x in sorted({r['args']['runs'] for r in results}))} timed runs after "
                  f"{'-'.join(str(x) for x in sorted({r['args']['warmup'] for r in results}))} "
                  "warm-up, original and pruned interleaved, timed with CUDA events; latency = median. The pairs are "
                  "pruned on the CPU machine (`--target-flops 0.5`, round-to as in the backend column) and carried "
                  "as latency twins (`--save-pairs`: same graph, shapes and integer initializers; weights redrawn "
                  "with each tensor's mean and spread).",
              "", "| model | input | MACs ratio | backend | batch | original ms | pruned ms | speed-up | goal | met | eff |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [r for res in results for r in res["rows"] if "error" not in r and "mode" not in r]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['macs_ratio']:.3f} | {r['backend']}, round-to "
                     f"{r.get('round_to', 8)} | {r['batch']} | "
                     f"{r['orig_ms']:.3f} | {r['pruned_ms']:.3f} | {r['speedup']:.2f}x | {r['goal_speedup']:.2f}x | "
                     f"{'yes' if r['goal_met'] else 'no'} | {r['efficiency']:.2f} |")
    def setting(r: dict) -> str:
        layout = "NHWC" if "channels-last" in r["backend"] else "NCHW"
        return f"{'fp16' if r.get('fp16') else 'fp32'} {layout}, round-to {r.get('round_to', 8)}"

    lines.append("")
    for key in sorted({(setting(r), r["batch"]) for r in rows}):
        sel = [r for r in rows if (setting(r), r["batch"]) == key]
        effs = sorted(r["efficiency"] for r in sel)
        lines.append(f"- {key[0]}, batch {key[1]}: goal met in {sum(r['goal_met'] for r in sel)} of {len(sel)}; "
                     f"median speed-up {sorted(r['speedup'] for r in sel)[len(sel) // 2]:.2f}x, median efficiency "
                     f"{effs[len(effs) // 2]:.2f}.")
    lat_rows = [r for res in results for r in res["rows"] if "mode" in r]
    if lat_rows:
        lines += ["", "`prune_to_latency` on the GPU backend:", ""] + latency_target_table(lat_rows, with_batch=True)
    errors = [r for res in results for r in res["rows"] if "error" in r and "mode" not in r]
    if errors:
        import re

        lines += ["", "Not measured:", ""] + list(dict.fromkeys(
            f"- {r['model']}: " + re.sub(r"/tmp/graphprune-latency-[^/\s]+/", "", r["error"]) for r in errors))
    notes = [res.get("notes") for res in results if res.get("notes")]
    if notes:
        lines += ["", notes[-1].strip()]
    lines += ["", GPU_END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str, start: str = START, end: str = END, title: str = TITLE) -> None:
    """Replace the text between the latency markers (appending them if missing); other
    sections are left alone. The file is re-read right before writing."""
    START, END, TITLE = start, end, title  # noqa: N806 (the markers of the section being written)
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
    from graphprune.paths import write_text_atomic

    write_text_atomic(path, new)


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
    p.add_argument("--round-to", type=int, default=8, help="graphprune's --round-to (default: 8; GPUs like 32)")
    p.add_argument("--backend", default="ort-cpu", choices=("auto", "trt", "ort-cuda", "torch-cuda", "ort-cpu"))
    p.add_argument("--fp16", action="store_true", help="TensorRT / PyTorch CUDA: run in fp16")
    p.add_argument("--save-pairs", metavar="DIR", help="also write latency twins of each pair and a manifest here")
    p.add_argument("--pairs", metavar="DIR", help="measure the pairs of a --save-pairs folder (no pruning)")
    p.add_argument("--section", choices=("cpu", "gpu"), default="cpu",
                   help="which BENCHMARKS.md section --markdown replaces (default: cpu)")
    p.add_argument("--threads", default="2", help="onnxruntime intra-op threads, comma-separated (default: 2)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seq", type=int, default=128, help="sequence length of token inputs (default: 128)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write all rows as JSON")
    p.add_argument("--markdown", help="replace the latency section (between its markers) of this file")
    p.add_argument("--from-json", help="measure nothing: write the section from earlier --json files "
                                       "(comma-separated; the GPU section takes several, e.g. fp32 and fp16)")
    p.add_argument("--notes", help="a markdown file whose text ends the section (e.g. an analysis of the results)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in _split(args.batches)]  # empty: prune (and --save-pairs) only
    args.threads = [int(t) for t in _split(args.threads)]
    args.models = [] if args.models == "none" else _split(args.models)
    args.zoo = [] if args.zoo == "none" else _split(args.zoo)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    markers = (GPU_START, GPU_END, GPU_TITLE) if args.section == "gpu" else (START, END, TITLE)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in _split(args.from_json)]
        if notes:
            results[-1]["notes"] = notes
        section = gpu_section(results) if args.section == "gpu" else markdown_section(results[0])
        print(section)
        if args.markdown:
            write_markdown(Path(args.markdown), section, *markers)
        return 0
    t0 = time.perf_counter()
    machine = machine_info()  # load average before we add to it
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
        outdir = Path(tmp)
        if args.pairs:
            named = {a.split("=")[0] for a in argv}
            wanted = (args.models if "--models" in named else []) + (args.zoo if "--zoo" in named else [])
            items = read_pairs(Path(args.pairs), outdir, wanted)
        else:
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    section = gpu_section([result]) if args.section == "gpu" else markdown_section(result)
    print(section)
    if args.markdown:
        write_markdown(Path(args.markdown), section, *markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
