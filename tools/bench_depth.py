"""Depth vs width pruning at equal MACs: all-MiniLM-L6-v2 (pretrained) and CNNs from models/cnn.py.

    .venv-bench/bin/python tools/bench_depth.py --out bench_depth_out [--models minilm resnet_basic mobilenet_v2]

For each model and MACs target R (0.7, 0.5): width only (``target_flops=R``), depth only
(the fewest residual branches, ranked by the ``cosine`` branch criterion, whose removal
brings the MACs to <= R; no width pruning) and both (``depth=True``: up to
``max_depth_fraction`` of the branches, then width for the rest). Fidelity: MiniLM
sentence-embedding cosine with the original on 128 held-out sentences (branch scores and
width criteria calibrated on 32 other sentences); CNNs (random weights, randomized BN):
output cosine and top-1 agreement on 64 synthetic images. Latency: onnxruntime CPU, median
of 30 runs after 5 warm-ups, original and pruned back to back, best of 3 pairs (MiniLM batch 8 x
seq 32; CNNs batch 1). Results in OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphprune  # noqa: E402
from graphprune.runtime import run_model, session  # noqa: E402


def latency_ms(model, feeds, runs: int = 30, threads: int = 2) -> float:
    sess = session(model, threads=threads)
    for _ in range(5):
        sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def fidelity(original, pruned, feeds_list) -> dict:
    cos, agree, n = [], 0, 0
    for feeds in feeds_list:
        a, b = run_model(original, feeds)[0], run_model(pruned, feeds)[0]
        cos.extend(cosine_rows(a, b).tolist())
        if a.ndim == 2 and a.shape[1] > 1:
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            n += len(a)
    out = {"cosine": float(np.mean(cos))}
    if n:
        out["top1_agreement"] = agree / n
    return out


def depth_only(path: str, target: float, calib, criterion: str = "cosine"):
    """The fewest branches (lowest score first) that bring the MACs to <= target, no width pruning."""
    res = None
    for n in range(1, 200):
        res = graphprune.prune(path, target_flops=1.0, drop_branches=n, branch_criterion=criterion, calib=calib)
        if res.report["macs_ratio"] <= target or n >= res.report["depth"]["branches"]:
            return res
    return res


def run_model_set(name: str, path: str, calib, evals, lat_feeds, targets, out: dict) -> None:
    import onnx

    original = onnx.load(path)
    base_ms = latency_ms(original, lat_feeds)
    out[name] = {"original_ms": base_ms, "rows": []}
    for r in targets:
        for mode in ("width", "depth", "both"):
            t = time.perf_counter()
            try:
                if mode == "width":
                    res = graphprune.prune(path, target_flops=r, calib=calib, fidelity=False)
                elif mode == "depth":
                    res = depth_only(path, r, calib)
                else:
                    res = graphprune.prune(path, target_flops=r, depth=True, calib=calib, fidelity=False)
            except graphprune.errors.BadInputError as exc:
                out[name]["rows"].append({"target": r, "mode": mode, "error": str(exc)})
                print(name, r, mode, "error", exc, flush=True)
                continue
            row = {"target": r, "mode": mode, "macs_ratio": res.report["macs_ratio"],
                   "branches_removed": len(res.report.get("depth", {}).get("removed", [])),
                   "seconds": time.perf_counter() - t, **fidelity(original, res.model, evals)}
            # original and pruned timed back to back, best of 3 pairs (the machine is shared)
            pairs = [(latency_ms(original, lat_feeds), latency_ms(res.model, lat_feeds)) for _ in range(3)]
            row["original_ms"], row["latency_ms"] = min(p[0] for p in pairs), min(p[1] for p in pairs)
            row["speedup"] = row["original_ms"] / row["latency_ms"]
            out[name]["rows"].append(row)
            print(name, json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_depth_out")
    ap.add_argument("--models", nargs="+", default=["minilm", "resnet_basic", "mobilenet_v2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.models:
        path = str(out_dir / f"{name}.onnx")
        if name == "minilm":
            from models.pretrained import export_minilm, minilm_batches, minilm_sentences

            export_minilm(path)
            sents = minilm_sentences(160, seed=0)
            calib = minilm_batches(sents[:32], batch_size=8)
            evals = minilm_batches(sents[32:], batch_size=16)
            lat = {"input_ids": np.ones((8, 32), np.int64) * 1000, "attention_mask": np.ones((8, 32), np.int64)}
        else:
            import torch

            from models.export import export_onnx

            export_onnx(name, path, dynamo=False)
            rng = np.random.default_rng(0)
            import onnx

            dims = [d.dim_value or 1 for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
            calib = [{"input": rng.standard_normal([8] + dims[1:]).astype(np.float32)} for _ in range(2)]
            iname = onnx.load(path).graph.input[0].name
            calib = [{iname: v["input"]} for v in calib]
            evals = [{iname: rng.standard_normal([16] + dims[1:]).astype(np.float32)} for _ in range(4)]
            lat = {iname: rng.standard_normal([1] + dims[1:]).astype(np.float32)}
            del torch
        run_model_set(name, path, calib, evals, lat, args.targets, results)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
