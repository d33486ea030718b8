"""Tokens/s of onnxruntime-genai folders before and after pruning, fp32 and int4; MatMulNBits
re-quantization error.

Builds a random-init LLaMA-style Hugging Face folder (models/llm_folders.py), converts it with
onnxruntime-genai's builder (-p fp32 and -p int4, -e cpu), prunes each folder with graphprune at the
given MACs ratios (deployment folder mode: same heads in every layer, config rewritten) and times
greedy generation with onnxruntime-genai (tools/genai_run.py, median of --runs).

The builder and onnxruntime-genai run in another venv (their onnxruntime/transformers pins differ):

    python3 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai onnx onnx-ir onnxscript \\
        transformers torch==2.13.0
    .venv/bin/python tools/bench_llm_formats.py --genai-python .venv-genai/bin/python --out out/bench_llm_formats

Re-quantization error: MatMulNBits input columns are pruned in whole quantization blocks (exact).
The alternative, re-quantizing the kept columns into fresh blocks, is measured here on the int4
model's down projections: relative error of the re-quantized weight against the dequantized kept
columns, and of the layer's output on random inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def build(genai_python: str, out: str, args) -> dict[str, str]:
    hf = os.path.join(out, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        _run([genai_python, "-m", "models.llm_folders", "llama", hf, "--hidden", str(args.hidden), "--layers",
              str(args.layers), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--inter",
              str(args.inter), "--vocab", str(args.vocab)])
    folders = {}
    for precision in ("fp32", "int4"):
        dst = os.path.join(out, precision)
        if not os.path.exists(os.path.join(dst, "genai_config.json")):
            _run([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", dst, "-p", precision,
                  "-e", "cpu"])
        folders[precision] = dst
    return folders


def prune(folder: str, ratio: float, out: str) -> dict:
    dst = os.path.join(out, f"{os.path.basename(folder)}_{ratio}")
    report = os.path.join(out, f"{os.path.basename(folder)}_{ratio}.json")
    _run([sys.executable, "-m", "graphprune", os.path.join(folder, "model.onnx"), "--target-flops", str(ratio),
          "-o", os.path.join(dst, "model.onnx"), "--verify", "-q", "--report", report])
    r = json.load(open(report))
    return {"folder": dst, "macs_ratio": r["macs_ratio"], "params_ratio": r["params_ratio"],
            "oracle": r["oracle"]["equivalent"], "config": r.get("deploy_folder", {}).get("set")}


def weight_bytes(folder: str) -> int:
    """Bytes of the folder's model files (graph and external data)."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".onnx", ".data", ".onnx_data")))


def tokens_per_s(genai_python: str, folders: list[str], args) -> list[float]:
    """Median tokens/s of each folder, runs interleaved across the folders."""
    out = _run([genai_python, "tools/genai_run.py", *folders, "--tokens", str(args.tokens), "--prompt-len",
                str(args.prompt_len), "--runs", str(args.runs), "--threads", str(args.threads)])
    return [json.loads(line)["tokens_per_s"] for line in out.strip().splitlines()[-len(folders):]]


def requant_error(int4_folder: str, fraction: float, seed: int = 0) -> dict:
    """Remove `fraction` of the down projections' input columns (lowest L1 of the dequantized
    weight) and re-quantize the kept ones into fresh blocks; errors against the dequantized kept
    columns (the whole-block alternative is exact: error 0)."""
    import onnx_graphsurgeon as gs

    from graphprune.graph import Model
    from graphprune.quantized import dequantize_nbits, quantize_nbits

    model = Model.load(os.path.join(int4_folder, "model.onnx"))
    rng = np.random.default_rng(seed)
    w_err, y_err = [], []
    for node in model.graph.nodes:
        if node.op != "MatMulNBits" or "down_proj" not in node.name:
            continue
        k, bits, bs = int(node.attrs["K"]), int(node.attrs["bits"]), int(node.attrs["block_size"])
        deq = dequantize_nbits(node)
        w = deq.reshape(deq.shape[0], -1)[:, :k].T  # [K, N]
        zp = "packed" if len(node.inputs) > 3 and isinstance(node.inputs[3], gs.Constant) else "none"
        keep = np.sort(np.argsort(-np.abs(w).sum(1))[:int(round(k * (1 - fraction)))])
        kept = w[keep]
        q, s, z = quantize_nbits(kept, bits, bs, zp)
        fake = gs.Node("MatMulNBits", attrs=dict(node.attrs, K=len(keep)),
                       inputs=[node.inputs[0], gs.Constant("q", q), gs.Constant("s", s)]
                       + ([gs.Constant("z", z)] if z is not None else []), outputs=[gs.Variable("y")])
        re = dequantize_nbits(fake).reshape(q.shape[0], -1)[:, :len(keep)].T
        w_err.append(float(np.linalg.norm(re - kept) / np.linalg.norm(kept)))
        x = rng.standard_normal((64, len(keep))).astype(np.float32)
        y_err.append(float(np.linalg.norm(x @ re - x @ kept) / np.linalg.norm(x @ kept)))
    return {"fraction_removed": fraction, "layers": len(w_err), "weight_rel_err_mean": float(np.mean(w_err)),
            "output_rel_err_mean": float(np.mean(y_err)), "output_rel_err_max": float(np.max(y_err))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genai-python", default=os.path.join(ROOT, ".venv-genai", "bin", "python"))
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench_llm_formats"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    if not os.path.exists(args.genai_python):
        raise SystemExit(f"no onnxruntime-genai venv at {args.genai_python}: see this script's docstring")
    os.makedirs(args.out, exist_ok=True)
    folders = build(args.genai_python, args.out, args)
    rows = []
    for precision, folder in folders.items():
        pruned = [prune(folder, ratio, args.out) for ratio in args.ratios]
        rates = tokens_per_s(args.genai_python, [folder] + [p["folder"] for p in pruned], args)
        size = weight_bytes(folder)
        rows.append({"precision": precision, "target": 1.0, "macs_ratio": 1.0, "params_ratio": 1.0,
                     "bytes": size, "bytes_ratio": 1.0, "tokens_per_s": rates[0], "speedup": 1.0, "oracle": True,
                     "config": None})
        for ratio, p, tps in zip(args.ratios, pruned, rates[1:]):
            rows.append({"precision": precision, "target": ratio, "macs_ratio": p["macs_ratio"],
                         "params_ratio": p["params_ratio"], "bytes": weight_bytes(p["folder"]),
                         "bytes_ratio": weight_bytes(p["folder"]) / size, "tokens_per_s": tps,
                         "speedup": tps / rates[0], "oracle": p["oracle"], "config": p["config"]})
    requant = [requant_error(folders["int4"], f) for f in (0.3, 0.5)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"model: llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"inter {args.inter}, vocab {args.vocab}; {args.tokens} new tokens after {args.prompt_len}, median of "
          f"{args.runs} interleaved runs, {args.threads or 'default'} thread(s)")
    print("| precision | target | MACs | float params | file bytes | tokens/s | speedup | oracle | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = "" if not r["config"] else f"{r['config']['num_attention_heads']}/{r['config']['num_key_value_heads']} heads"
        print(f"| {r['precision']} | {r['target']} | {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | "
              f"{r['bytes'] / 1e6:.2f} MB ({r['bytes_ratio']:.3f}) | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {'holds' if r['oracle'] else 'FAILS'} | {cfg} |")
    for q in requant:
        print(f"re-quantizing {q['fraction_removed']:.0%} of the down_proj input columns ({q['layers']} layers): "
              f"weight rel err {q['weight_rel_err_mean']:.4f}, output rel err mean {q['output_rel_err_mean']:.4f} "
              f"max {q['output_rel_err_max']:.4f} (whole blocks, what graphprune does: 0, exact)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "requant": requant}, f, indent=1)


if __name__ == "__main__":
    main()
