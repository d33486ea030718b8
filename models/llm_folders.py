"""Tiny random-init Hugging Face decoder folders (offline) for the LLM deployment-format tests.

`save_hf_folder(arch, out)` writes config.json, model.safetensors and a WordLevel tokenizer
(tokenizer.json + tokenizer_config.json) that onnxruntime-genai's builder and optimum's
exporter both read. Needs transformers, tokenizers and torch (run it with the python of a
venv that has them, e.g. `.venv-genai/bin/python -m models.llm_folders llama out/llama_hf`).
"""
from __future__ import annotations

import argparse
import json
import os

__all__ = ["ARCHS", "save_hf_folder"]

ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _config(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "phi3":
        return transformers.Phi3Config(**common, original_max_position_embeddings=256)  # one rotary cache
    raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHS)}")


def _tokenizer(out: str, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 256}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=1)


def save_hf_folder(arch: str, out: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   inter: int = 128, vocab: int = 96, seed: int = 0) -> str:
    """A random-init `arch` decoder saved as a Hugging Face folder at `out` (returned)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = _config(arch, hidden, layers, heads, kv_heads, inter, vocab)
    model = getattr(transformers, ARCHS[arch])(cfg).eval()
    with torch.no_grad():  # random init is near zero; larger weights make pruning errors visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    _tokenizer(out, vocab)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=96)
    a = ap.parse_args()
    save_hf_folder(a.arch, a.out, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                   inter=a.inter, vocab=a.vocab)


if __name__ == "__main__":
    main()
