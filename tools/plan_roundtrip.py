"""Round trip of a pruning plan on a torchvision model (docs/plan.md).

Export torchvision's model (random weights: nothing is downloaded) with the dynamo exporter
(optimize=False keeps BatchNorm and the PyTorch parameter names), `graphprune plan` it, apply the
plan to the torch module with graphprune.apply_plan_to_torch, and compare the sliced torch model's
outputs with graphprune's pruned ONNX model in onnxruntime.

Needs torchvision (its own venv):
    python3 -m venv .venv-tv && .venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 && \
        .venv-tv/bin/pip install -e ".[dev]"
    .venv-tv/bin/python tools/plan_roundtrip.py --model resnet18 --target-flops 0.5
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="a torchvision.models builder (default: resnet18)")
    ap.add_argument("--target-flops", default="0.5")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workdir", help="keep the files here (default: a temporary folder)")
    ap.add_argument("--json", help="write the result as JSON")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch
    import torchvision

    from graphprune.plan import apply_plan_to_torch, load_plan

    work = Path(args.workdir or tempfile.mkdtemp(prefix="plan_roundtrip."))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    for m in model.modules():  # trained-looking BatchNorm statistics (fresh ones are 0 / 1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    src = work / f"{args.model}.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(src), dynamo=True, optimize=False, input_names=["input"],
                          output_names=["output"], external_data=False)
    t_export = time.perf_counter() - t0
    plan_path, pruned = work / "plan.json", work / f"{args.model}.pruned.onnx"
    cmd = [sys.executable, "-m", "graphprune", str(src), "--target-flops", args.target_flops, "-o", str(pruned),
           "--plan", str(plan_path), "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    t_prune = time.perf_counter() - t0
    plan = load_plan(plan_path)
    n_params = sum(p.numel() for p in model.parameters())
    apply_plan_to_torch(model, plan, example_inputs=(x,))
    with torch.no_grad():
        got = model(x).numpy()
    sess = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    res = {"model": args.model, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "target_flops": float(args.target_flops), "macs_ratio": plan["macs_after"] / plan["macs_before"],
           "params_torch_before": int(n_params), "params_torch_after": int(sum(p.numel() for p in model.parameters())),
           "groups_pruned": len(plan["groups"]),
           "initializer_slices": sum(len(g["tensors"]) for g in plan["groups"]),
           "max_abs_diff": diff, "output_scale": float(np.abs(want).max()),
           "export_s": round(t_export, 1), "prune_s": round(t_prune, 1), "workdir": str(work)}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if diff <= 1e-3 * max(1.0, res["output_scale"]) else 1


if __name__ == "__main__":
    sys.exit(main())
