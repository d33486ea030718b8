"""Benchmark: prune LLaMA-shape decoders of 1.1 B and 1.5 B parameters, streamed.

Each model is built by models/llm_scale.py in its own process (torch's dynamo exporter on a
module that is never initialised; random weights written straight to 4 data files), then
pruned by the graphprune CLI in a child process; the child's peak RSS comes from wait4's
rusage. Reported: wall time, peak RSS / model size on disk, the MACs ratio reached, and
whether the output passes onnx.checker (on its path, full check) and runs in onnxruntime.

    python tools/bench_llm_scale.py --work /tmp/llm [--presets tinyllama,big-vocab]
        [--criterion l1] [--target-flops 0.5] [--verify]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _popen_rss(cmd: list[str], env=None) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes of this very child (wait4), output tail)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024, out.decode(errors="replace")[-2000:]


def _size_on_disk(model: Path) -> int:
    import onnx
    from onnx import external_data_helper

    proto = onnx.load(str(model), load_external_data=False)
    files = {external_data_helper.ExternalDataInfo(t).location for t in proto.graph.initializer
             if external_data_helper.uses_external_data(t)}
    return model.stat().st_size + sum((model.parent / f).stat().st_size for f in files)


def _check_output(path: Path) -> str:
    code = ("import onnx, onnxruntime as ort, numpy as np, sys; p = sys.argv[1]; "
            "onnx.checker.check_model(p, full_check=True); "
            "s = ort.InferenceSession(p, providers=['CPUExecutionProvider']); "
            "y = s.run(None, {s.get_inputs()[0].name: np.ones((1, 4), np.int64)})[0]; "
            "print('ok', list(y.shape), bool(np.isfinite(y).all()))")
    rc, wall, rss, out = _popen_rss([sys.executable, "-c", code, str(path)])
    return out.strip().splitlines()[-1] if rc == 0 else f"FAILED: {out.strip().splitlines()[-1]}"


def bench(preset: str, work: Path, criterion: str, target: float, verify: bool) -> dict:
    from models.llm_scale import PRESETS, parameter_count

    folder = work / preset
    model = folder / "model.onnx"
    row: dict = {"preset": preset, "params": parameter_count(PRESETS[preset])}
    if not model.exists():
        rc, wall, rss, out = _popen_rss([sys.executable, "-m", "models.llm_scale", "--out", str(folder),
                                         "--preset", preset, "--files", "4"])
        if rc:
            raise SystemExit(f"building {preset} failed:\n{out}")
        row["build_s"], row["build_rss"] = wall, rss
    row["size"] = _size_on_disk(model)
    out_path = work / f"{preset}.pruned" / "model.onnx"
    report = work / f"{preset}.report.json"
    cmd = [sys.executable, "-m", "graphprune", str(model), "--target-flops", str(target), "--criterion", criterion,
           "-o", str(out_path), "--report", str(report), "-q"] + (["--verify"] if verify else [])
    rc, wall, rss, out = _popen_rss(cmd)
    row.update(exit=rc, wall_s=wall, peak_rss=rss, rss_ratio=rss / row["size"], output=out.strip()[-300:])
    if rc == 0:
        r = json.loads(report.read_text())
        row.update(macs_before=r["macs_before"], macs_after=r["macs_after"], macs_ratio=r["macs_ratio"],
                   params_ratio=r["params_ratio"], timings=r.get("timings"), oracle=r.get("oracle"),
                   out_size=_size_on_disk(out_path), check=_check_output(out_path))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the models (about 11 GB for both)")
    ap.add_argument("--presets", default="tinyllama,big-vocab")
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| model | params | size on disk | criterion | verify | wall | peak RSS | RSS / size | MACs ratio "
          "| output checker + ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        row = bench(preset, work, args.criterion, args.target_flops, args.verify)
        if row["exit"] != 0:
            print(f"| {preset} | exit {row['exit']}: {row['output']} |")
            continue
        print(f"| {preset} | {row['params'] / 1e9:.2f} B | {row['size'] / 1e9:.2f} GB | {args.criterion} "
              f"| {'yes' if args.verify else 'no'} | {row['wall_s']:.0f} s | {row['peak_rss'] / 2**30:.2f} GiB "
              f"| {row['rss_ratio']:.2f} | {row['macs_ratio']:.3f} | {row['check']} |", flush=True)
        print(json.dumps({k: v for k, v in row.items() if k != "output"}, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
