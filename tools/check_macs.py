"""Zoo-wide MAC check: graphprune's ratio against an independent onnxruntime count, at the same shape.

For every zoo entry (models/zoo.py) whose requirements are installed: prune with graphprune at
--target-flops (default 0.7; default options and shape rules: batch 1, dynamic image axes 224,
other dynamic axes 128; the zoo pins PP-OCR's spatial axes, rec at 48x320), then count the MACs
of the original and of the pruned model with graphprune.ort_macs (one onnxruntime run with every
costed node's real shapes) at the shape the report states. One row per model: shape, graphprune's
ratio, the independent ratio, |diff|, and whether the independent ratio lies in the band.

Each model runs in a child process (a crash or a timeout is a row, not the end of the table).
torchvision models need a venv with torchvision (see BENCHMARKS.md, "MACs at the real input shape")::

    .venv-tv/bin/python tools/check_macs.py --json out/check_macs.json [--models swin_t,vit_b_16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["check_one", "main"]

BAND = (0.67, 0.71)
AGREE = 0.005


def check_one(name: str, exporter: str, target: float, outdir: str) -> dict:
    """Prune one zoo entry and count both models independently at the report's shape."""
    import onnx

    import graphprune
    from graphprune.ort_macs import ort_macs
    from models.zoo import build_zoo_model

    t0 = time.perf_counter()
    path = build_zoo_model(name, exporter, outdir)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = graphprune.prune(path, target_flops=target)
    t_prune = time.perf_counter() - t0
    r = result.report
    shape = {k: tuple(v) for k, v in r["cost_shape"].items()}
    if not shape:  # every axis static: the declared shapes are the shape MACs were counted at
        from graphprune.cost import input_shapes
        from graphprune.graph import Model

        shape = input_shapes(Model.load(path))
    before = ort_macs(onnx.load(path), shape)
    after = ort_macs(result.model, shape)
    ratio = after / before
    return {"model": name, "exporter": exporter, "shape": {k: list(v) for k, v in shape.items()},
            "macs_before": before, "macs_after": after, "graphprune_macs_before": r["macs_before"],
            "graphprune_ratio": r["macs_ratio"], "independent_ratio": ratio,
            "diff": abs(r["macs_ratio"] - ratio), "before_rel_diff": abs(r["macs_before"] - before) / before,
            "in_band": BAND[0] <= ratio <= BAND[1], "note": next((w for w in r.get("warnings", []) if "MACs counted" in w), None),
            "build_s": round(t_build, 1), "prune_s": round(t_prune, 1)}


def _child(args: argparse.Namespace) -> int:
    try:
        row = check_one(args.child[0], args.child[1], args.target, args.out)
    except Exception as e:  # noqa: BLE001 - one row of the table says what failed
        row = {"model": args.child[0], "exporter": args.child[1], "error": f"{type(e).__name__}: {e}"[:300]}
    print("ROW " + json.dumps(row))
    return 0


def _fmt_shape(shape: dict) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shape.items())


def table(rows: list[dict], target: float) -> str:
    lines = ["| model | exporter | shape | MACs (G) | graphprune ratio | independent ratio | diff | in "
             f"[{BAND[0]}, {BAND[1]}] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | | | | | | error: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['model']} | {r['exporter']} | {_fmt_shape(r['shape'])} | {r['macs_before'] / 1e9:.3f} | "
                     f"{r['graphprune_ratio']:.4f} | {r['independent_ratio']:.4f} | {r['diff']:.4f} | "
                     f"{'yes' if r['in_band'] and r['diff'] <= AGREE else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: every entry installed)")
    ap.add_argument("--exporters", default="", help="comma-separated exporters (default: all)")
    ap.add_argument("--out", default=str(ROOT / "out" / "zoo"), help="where zoo models are built")
    ap.add_argument("--json", default="", help="write the rows here (after each model)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    from models.zoo import missing_requirements, zoo_entries

    names = {m for m in args.models.split(",") if m}
    exporters = {e for e in args.exporters.split(",") if e}
    rows = []
    for e in zoo_entries():
        if (names and e.name not in names) or (exporters and e.exporter not in exporters):
            continue
        missing = missing_requirements(e)
        if missing:
            print(f"{e.name}/{e.exporter}: skipped (needs {', '.join(missing)})", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", e.name, e.exporter,
               "--target", str(args.target), "--out", args.out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
            row = json.loads(line[4:]) if line else {"model": e.name, "exporter": e.exporter,
                                                      "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"model": e.name, "exporter": e.exporter, "error": f"timeout after {args.timeout} s"}
        rows.append(row)
        print(table([row], args.target).splitlines()[-1], flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows, args.target))
    bad = [r for r in rows if "error" in r or not r["in_band"] or r["diff"] > AGREE]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
