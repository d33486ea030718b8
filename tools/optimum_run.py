"""Load an optimum ONNX decoder folder with ORTModelForCausalLM and generate tokens; prints one JSON line.

Run with the python of a venv that has optimum-onnx and onnxruntime (e.g. .venv-optimum/bin/python):
    python tools/optimum_run.py FOLDER [--tokens N] [--prompt-len P]
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=8)
    a = ap.parse_args()
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(a.folder, use_cache=True)
    prompt = (torch.arange(a.prompt_len) % 50 + 4).reshape(1, -1)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.tokens,
                         min_new_tokens=a.tokens, do_sample=False)
    dt = time.perf_counter() - t0
    tokens = [int(t) for t in out[0]]
    print(json.dumps({"tokens": tokens, "new_tokens": len(tokens) - a.prompt_len,
                      "tokens_per_s": (len(tokens) - a.prompt_len) / dt}))


if __name__ == "__main__":
    main()
