#!/usr/bin/env python3
"""Transformer evidence table (issue 4): every transformer model, both exporters, two targets.

For each model (own modules and small transformers configs from ``models/transformer.py``;
torchvision ``vit_b_16`` and ``swin_t`` from ``models/zoo.py``, which needs torchvision),
exporter (TorchScript ``dynamo=False``, dynamo ``dynamo=True``) and target (0.7, 0.5 of the
MACs), it prunes with ``graphprune.prune(path, target_flops=R, verify=True)`` and records:
attention heads per layer before -> after, MLP/other channel groups, the MACs ratio, the
mask-equivalence oracle (max relative error over batch 1 and 3), the checker (run by the
verify pass), prune time, and what ``graphprune.analyze`` pins and why.

Each (model, exporter) runs in its own subprocess with a timeout.

Usage (the torchvision models need the benchmark venv)::

    python tools/bench_transformers.py [--models ...] [--targets 0.7 0.5] [--json out.json]
                                       [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OWN = ("bert_block", "gpt2_block", "llama_block", "vit_block")
HF = ("hf_bert", "hf_gpt2", "hf_llama", "hf_vit", "hf_bert_sdpa", "hf_gpt2_sdpa", "hf_llama_sdpa", "hf_vit_sdpa")
TORCHVISION = ("vit_b_16", "swin_t")
EXPORTERS = ("torchscript", "dynamo")
START, END = "<!-- transformers:start -->", "<!-- transformers:end -->"


def _export(name: str, exporter: str, outdir: str) -> str:
    if name in TORCHVISION:
        from models.zoo import build_zoo_model

        return build_zoo_model(name, exporter, outdir)
    from models.transformer import export_transformer_onnx

    return export_transformer_onnx(name, os.path.join(outdir, f"{name}_{exporter}.onnx"),
                                   dynamo=exporter == "dynamo")


def _short_reason(reason: str) -> str:
    """'LayerNormalization /l0/ln: normalized axis: ...' -> 'LayerNormalization: normalized axis: ...'
    (node and tensor names dropped, so one reason per op kind)."""
    reason = re.sub(r"\s+", " ", reason.split(" (")[0]).strip()
    reason = re.sub(r"^([A-Za-z]+) \S+: ", r"\1: ", reason)
    return re.sub(r" of \S+ is not", " is not", reason)


def _pinned(res: dict) -> dict:
    out: Counter = Counter()
    for reason, n in res.get("pinned", {}).items():
        out[_short_reason(reason)] += n
    return dict(out.most_common())


def worker(name: str, exporter: str, targets: list[float]) -> dict:
    import graphprune

    out: dict = {"model": name, "exporter": exporter, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = _export(name, exporter, tmp)
        out["export_s"] = time.perf_counter() - t0
        analysis = graphprune.analyze(path)
        pinned = Counter()
        for p in analysis.pinned:
            pinned[_short_reason(p.reason)] += p.count
        out["pinned"] = dict(pinned.most_common())
        out["head_groups"] = sum(1 for g in analysis.groups if g.kind == "heads")
        for r in targets:
            run: dict = {"target": r}
            t0 = time.perf_counter()
            try:
                res = graphprune.prune(path, target_flops=r, verify=True)
            except Exception as exc:  # recorded, not fatal
                run["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                out["runs"].append(run)
                continue
            run["prune_s"] = time.perf_counter() - t0
            rep = res.report
            run["macs_ratio"] = rep["macs_ratio"]
            oracle = rep.get("oracle", {})
            run["oracle_ok"] = bool(oracle.get("equivalent"))
            run["oracle_max_rel"] = max((v["max_rel"] for k, v in oracle.items() if k.startswith("batch")),
                                        default=None)
            heads = [(g["channels"], g["kept"]) for g in rep["groups"] if g["kind"] == "heads"]
            run["heads"] = heads
            chans = [(g["channels"], g["kept"]) for g in rep["groups"] if g["kind"] != "heads"]
            run["channels_before"] = sum(c for c, _ in chans)
            run["channels_after"] = sum(k for _, k in chans)
            out["runs"].append(run)
    return out


def _run_one(name: str, exporter: str, targets: list[float], timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, exporter, "--targets", *map(str, targets)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "exporter": exporter, "error": f"timeout after {timeout} s", "runs": []}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "exporter": exporter, "error": tail[:300], "runs": []}
    return json.loads(lines[-1])


def _heads_text(heads: list) -> str:
    if not heads:
        return "—"
    return " ".join(f"{c}→{k}" for c, k in heads)


def markdown(results: list[dict], command: str, seconds: float) -> str:
    import onnx
    import onnxruntime
    import torch

    lines = [START, "## Transformers: heads, MLP width and GQA per model and exporter (issue 4)", "",
             f"`{command}` ({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min). Machine: {platform.processor() or 'CPU'}, "
             f"{os.cpu_count()} cores; onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
             f"torch {torch.__version__}.", "",
             "Each model pruned with `graphprune.prune(path, target_flops=R, verify=True)` (l1, round-to 8, "
             "hidden width pinned, whole heads; GQA: a KV head with its query heads). **heads** = heads per "
             "attention layer before→after, in graph order; **MLP/other ch** = channels of the non-head groups "
             "(MLP hidden width) before→after; heads folded into the batch axis (nn.MultiheadAttention, dynamo's sdpa) "
             "count as heads; "
             "**oracle** = mask-equivalence max relative error over batch 1 and 3 (onnxruntime; the verify pass "
             "also runs `onnx.checker` with full shape inference); **pinned** = what `graphprune analyze` pins, "
             "channels per reason.", "",
             "| model | exporter | target | MACs | heads | MLP/other ch | oracle | prune s | pinned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        pinned = "; ".join(f"{n} ch: {r}" for r, n in _pinned(res).items()) or "—"
        if res.get("error"):
            lines.append(f"| {res['model']} | {res['exporter']} | | | | | | | **failed**: {res['error']} |")
            continue
        for run in res["runs"]:
            if run.get("error"):
                lines.append(f"| {res['model']} | {res['exporter']} | {run['target']} | | | | | | "
                             f"**failed**: {run['error']} |")
                continue
            ok = "yes" if run["oracle_ok"] else "**no**"
            lines.append(
                f"| {res['model']} | {res['exporter']} | {run['target']} | {run['macs_ratio']:.3f} | "
                f"{_heads_text(run['heads'])} | {run['channels_before']}→{run['channels_after']} | "
                f"{ok} ({run['oracle_max_rel']:.1e}) | {run['prune_s']:.1f} | {pinned} |")
            pinned = "〃"
    ok = sum(1 for r in results for run in r["runs"] if run.get("oracle_ok")
             and run["macs_ratio"] <= run["target"] + 1e-9 and run["macs_ratio"] >= run["target"] - 0.02)
    total = sum(max(len(r["runs"]), 1) for r in results)
    lines += ["", f"Oracle holds and MACs land in [R-0.02, R] in {ok} of {total} runs.", "", END]
    return "\n".join(lines) + "\n"


def _write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        text = text[:text.index(START)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    from graphprune.paths import write_text_atomic

    write_text_atomic(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(OWN + HF + TORCHVISION))
    ap.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (model, exporter)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="replace the transformers section of this file (e.g. BENCHMARKS.md)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "EXPORTER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.targets)))
        return 0
    t0 = time.perf_counter()
    results = []
    for name in args.models:
        for exporter in args.exporters:
            res = _run_one(name, exporter, args.targets, args.timeout)
            results.append(res)
            status = res.get("error") or ", ".join(
                f"{run['target']}: " + (run.get("error") or f"MACs {run['macs_ratio']:.3f} oracle "
                                        f"{'ok' if run['oracle_ok'] else 'FAIL'} heads {_heads_text(run['heads'])}")
                for run in res["runs"])
            print(f"{name:16s} {exporter:12s} {status}", flush=True)
    seconds = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        cmd = "python tools/bench_transformers.py " + " ".join(a for a in (argv or sys.argv[1:]))
        _write_markdown(Path(args.markdown), markdown(results, cmd.strip(), seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
