"""Load an onnxruntime-genai folder and generate tokens; prints one JSON line.

Run with the python of a venv that has onnxruntime-genai (e.g. .venv-genai/bin/python):
    python tools/genai_run.py FOLDER [--tokens N] [--prompt-len P] [--runs R]
Output: {"tokens": [...], "new_tokens": N, "tokens_per_s": median over runs (greedy decoding)}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def generate(folder: str, tokens: int, prompt_len: int, runs: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(folder)
    prompt = (np.arange(prompt_len, dtype=np.int32) % 50 + 4).reshape(1, -1)
    rates, out = [], []
    for _ in range(runs):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + tokens, min_length=prompt_len + tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        t0 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        dt = time.perf_counter() - t0
        out = [int(t) for t in gen.get_sequence(0)]
        rates.append((len(out) - prompt_len) / dt)
    return {"tokens": out, "new_tokens": len(out) - prompt_len, "tokens_per_s": statistics.median(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(generate(a.folder, a.tokens, a.prompt_len, a.runs)))


if __name__ == "__main__":
    main()
