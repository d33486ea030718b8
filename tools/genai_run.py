"""Load onnxruntime-genai folders and generate tokens; prints one JSON line per folder.

Run with the python of a venv that has onnxruntime-genai (e.g. .venv-genai/bin/python):
    python tools/genai_run.py FOLDER [FOLDER ...] [--tokens N] [--prompt-len P] [--runs R] [--threads T]
Output per folder: {"folder", "tokens": [...], "new_tokens": N, "tokens_per_s": median over runs}
(greedy decoding; with several folders the runs are interleaved, so a busy machine slows all alike).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def _load(folder: str, threads: int):
    import onnxruntime_genai as og

    config = og.Config(folder)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def _generate(model, tokens: int, prompt_len: int):
    import numpy as np
    import onnxruntime_genai as og

    prompt = (np.arange(prompt_len, dtype=np.int32) % 50 + 4).reshape(1, -1)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + tokens, min_length=prompt_len + tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    t0 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    dt = time.perf_counter() - t0
    out = [int(t) for t in gen.get_sequence(0)]
    return out, (len(out) - prompt_len) / dt


def generate(folders: list[str], tokens: int, prompt_len: int, runs: int, threads: int = 0) -> list[dict]:
    models = [_load(f, threads) for f in folders]
    rates: list[list[float]] = [[] for _ in folders]
    seqs: list[list[int]] = [[] for _ in folders]
    for m in models:  # warm-up
        _generate(m, 2, prompt_len)
    for _ in range(runs):
        for i, m in enumerate(models):
            seqs[i], r = _generate(m, tokens, prompt_len)
            rates[i].append(r)
    return [{"folder": f, "tokens": s, "new_tokens": len(s) - prompt_len, "tokens_per_s": statistics.median(r)}
            for f, s, r in zip(folders, seqs, rates)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    a = ap.parse_args()
    for r in generate(a.folders, a.tokens, a.prompt_len, a.runs, a.threads):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
