"""Per test model (models/cnn.py, models/transformer.py), both exporters: groups found,
channels pinned and why, MACs before/after at --target-flops 0.5, prune time, oracle.

    python tools/bench_core.py [--markdown BENCHMARKS.md] [--round-to 8]

Writes the table between `<!-- core:start -->` and `<!-- core:end -->` in the markdown file.
"""
from __future__ import annotations

import argparse
import collections
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune  # noqa: E402


def _models():
    from models.cnn import CNN_MODELS
    from models.export import build_onnx

    for name in CNN_MODELS:
        for exporter, dyn in (("torchscript", False), ("dynamo", True)):
            yield name, exporter, lambda d, n=name, y=dyn: build_onnx(n, y, d)
    try:
        from models.transformer import TRANSFORMER_MODELS, build_transformer_onnx
    except ImportError:
        return
    for name in TRANSFORMER_MODELS:
        for exporter, dyn in (("torchscript", False), ("dynamo", True)):
            yield name, exporter, lambda d, n=name, y=dyn: build_transformer_onnx(n, y, d)


def _pin_summary(pinned) -> str:
    reasons = collections.Counter()
    for p in pinned:
        reason = re.sub(r"^\S+ \S+: ", "", p.reason.split(";")[0])
        reason = re.sub(r"graph (input|output) \S+", r"graph \1", reason)
        reasons[reason] += p.count
    return "; ".join(f"{n} ch: {r}" for r, n in reasons.most_common(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--target-flops", type=float, default=0.5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, exporter, build in _models():
            path = build(tmp)
            analysis = graphprune.analyze(path)
            t0 = time.perf_counter()
            try:
                res = graphprune.prune(path, target_flops=args.target_flops, round_to=args.round_to, verify=True)
                r = res.report
                secs = time.perf_counter() - t0
                heads = [f"{g.size}x{g.width}" for g in analysis.groups if g.kind == "heads"]
                rows.append(f"| {name} | {exporter} | {len(analysis.groups)} | {sum(g.size for g in analysis.groups)}"
                            f" | {', '.join(heads) or '-'} | {_pin_summary(analysis.pinned)} | {r['macs_before']:,}"
                            f" | {r['macs_after']:,} ({r['macs_ratio']:.3f}) | {secs:.2f} s"
                            f" | {'holds' if r['oracle']['equivalent'] else 'FAILS'} |")
            except graphprune.GraphpruneError as exc:
                rows.append(f"| {name} | {exporter} | {len(analysis.groups)} | - | - | {_pin_summary(analysis.pinned)}"
                            f" | - | failed: {exc} | - | - |")
            print(rows[-1], flush=True)
    header = (f"Command: `python tools/bench_core.py --markdown BENCHMARKS.md --round-to {args.round_to}` "
              f"(target-flops {args.target_flops}, verify on); machine: {platform.machine()}, "
              f"{platform.processor() or 'cpu'}, Python {platform.python_version()}, "
              f"graphprune {graphprune.__version__}.\n\n"
              "| model | exporter | groups | channels | heads (units x width) | pinned (channels: why) "
              "| MACs before | MACs after (ratio) | prune time | oracle |\n|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    if args.markdown:
        p = Path(args.markdown)
        text = p.read_text() if p.exists() else "# Benchmarks\n"
        block = f"<!-- core:start -->\n## Test models at --target-flops {args.target_flops}\n\n{table}<!-- core:end -->"
        if "<!-- core:start -->" in text:
            text = re.sub(r"<!-- core:start -->.*?<!-- core:end -->", lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        p.write_text(text)


if __name__ == "__main__":
    main()
