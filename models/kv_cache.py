"""Small decoders with an explicit KV cache, and their ONNX exports.

Each layer takes ``past_key.<i>`` / ``past_value.<i>`` ``[batch, kv_heads, past_seq,
head_dim]`` as plain tensors and returns ``present_key.<i>`` / ``present_value.<i>``
``[batch, kv_heads, past_seq + seq, head_dim]`` (the past concatenated with the new
keys/values): the graph a decoder runs once per generated token. Two variants:

* ``kv_mha``: GPT-2-style pre-LN decoder, 4 heads of 16, separate q/k/v projections
  with bias, learned positions offset by the past length;
* ``kv_gqa``: LLaMA-style decoder, RMSNorm, rotary embeddings at positions
  ``past_seq + i``, grouped-query attention (8 query heads, 2 KV heads of 16,
  ``repeat_kv``), SwiGLU;
* ``hf_llama_kv``: transformers' ``LlamaForCausalLM`` (small config, random init) with
  ``use_cache=True``, called with a ``DynamicCache`` built from the plain past tensors
  and returning the updated keys/values as plain tensors (needs ``transformers``).

These live apart from :mod:`models.transformer` so that adding them does not
invalidate that module's export cache. ``export_kv_onnx`` exports with either
PyTorch exporter; ``batch``, ``seq`` and ``past_seq`` stay symbolic, and past length 0
(the first step) runs.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from models.export import DYNAMO_OPSET, TORCHSCRIPT_OPSET, _quiet, cached_copy, exporter_name
from models.transformer import RMSNorm, _randomize_norms, repeat_kv, rotate_half

__all__ = ["KV_MODELS", "KVDecoder", "kv_mha", "kv_gqa", "hf_llama_kv", "kv_input_names", "kv_output_names",
           "kv_example_inputs", "export_kv_onnx", "build_kv_onnx"]

BATCH_DIM, SEQ_DIM, PAST_DIM = "batch", "seq", "past_seq"
MAX_POSITIONS = 64
_EXAMPLE = (2, 3, 5)  # batch, seq, past_seq used for tracing: distinct and >= 2


class KVAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool, rotary: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rotary = rotary
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=bias)

    def forward(self, x, past_k, past_v, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        present_k, present_v = k, v
        rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(ctx), present_k, present_v


class KVLayer(nn.Module):
    def __init__(self, hidden, n_heads, n_kv_heads, head_dim, inner, llama: bool):
        super().__init__()
        norm = (lambda: RMSNorm(hidden)) if llama else (lambda: nn.LayerNorm(hidden))
        self.ln_1, self.ln_2 = norm(), norm()
        self.attn = KVAttention(hidden, n_heads, n_kv_heads, head_dim, bias=not llama, rotary=llama)
        self.llama = llama
        if llama:
            self.gate = nn.Linear(hidden, inner, bias=False)
            self.up = nn.Linear(hidden, inner, bias=False)
            self.down = nn.Linear(inner, hidden, bias=False)
        else:
            self.fc1 = nn.Linear(hidden, inner)
            self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x, past_k, past_v, cos, sin, mask):
        a, pk, pv = self.attn(self.ln_1(x), past_k, past_v, cos, sin, mask)
        x = x + a
        h = self.ln_2(x)
        m = self.down(F.silu(self.gate(h)) * self.up(h)) if self.llama else self.fc2(F.gelu(self.fc1(h)))
        return x + m, pk, pv


class KVDecoder(nn.Module):
    """forward(input_ids, past_key.0, past_value.0, ...) -> (logits, present_key.0, present_value.0, ...)."""

    def __init__(self, *, llama: bool, vocab: int = 256, hidden: int = 64, n_heads: int = 4,
                 n_kv_heads: int = 4, head_dim: int = 16, inner: int = 128, n_layers: int = 2):
        super().__init__()
        self.llama, self.n_layers = llama, n_layers
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.embed = nn.Embedding(vocab, hidden)
        if not llama:
            self.pos = nn.Embedding(MAX_POSITIONS, hidden)
        self.layers = nn.ModuleList(KVLayer(hidden, n_heads, n_kv_heads, head_dim, inner, llama)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(hidden) if llama else nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, *past):
        s = input_ids.shape[1]
        p = past[0].shape[2]
        positions = torch.arange(s, device=input_ids.device) + p  # [s]
        x = self.embed(input_ids)
        if not self.llama:
            x = x + self.pos(positions)[None]
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        k_pos = torch.arange(p + s, device=input_ids.device)
        mask = torch.where(k_pos[None, :] > positions[:, None], torch.finfo(x.dtype).min, 0.0)
        presents = []
        for i, layer in enumerate(self.layers):
            x, pk, pv = layer(x, past[2 * i], past[2 * i + 1], cos, sin, mask)
            presents += [pk, pv]
        return (self.lm_head(self.norm(x)), *presents)


def kv_mha(seed: int = 0) -> nn.Module:
    """GPT-2-style decoder with a KV cache: 2 layers, hidden 64, 4 heads of 16, vocab 256."""
    torch.manual_seed(seed)
    return _randomize_norms(KVDecoder(llama=False), seed).eval()


def kv_gqa(seed: int = 0) -> nn.Module:
    """LLaMA-style decoder with a KV cache: 2 layers, hidden 64, GQA 8 query / 2 KV heads of 16, rotary."""
    torch.manual_seed(seed)
    return _randomize_norms(KVDecoder(llama=True, n_heads=8, n_kv_heads=2, inner=128), seed).eval()




def kv_input_names(n_layers: int = 2) -> list[str]:
    return ["input_ids"] + [f"past_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")]


def kv_output_names(n_layers: int = 2) -> list[str]:
    return ["logits"] + [f"present_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")]


def kv_example_inputs(model: KVDecoder, batch: int, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, batch, seq, past])
    feeds = {"input_ids": rng.integers(0, model.embed.num_embeddings, (batch, seq), dtype=np.int64)}
    for name in kv_input_names(model.n_layers)[1:]:
        feeds[name] = rng.standard_normal((batch, model.n_kv_heads, past, model.head_dim)).astype(np.float32)
    return feeds


def export_kv_onnx(name: str, path: "str | os.PathLike", *, dynamo: bool, seed: int = 0) -> str:
    """Export ``name`` (a key of KV_MODELS) with symbolic batch, seq and past_seq axes."""
    model = KV_MODELS[name](seed)
    feeds = kv_example_inputs(model, *_EXAMPLE)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    ins, outs = kv_input_names(model.n_layers), kv_output_names(model.n_layers)
    path = os.fspath(path)
    with _quiet(), torch.no_grad():
        if dynamo:
            batch = torch.export.Dim(BATCH_DIM, min=1, max=1024)
            seq = torch.export.Dim(SEQ_DIM, min=1, max=MAX_POSITIONS // 2)
            past = torch.export.Dim(PAST_DIM, min=0, max=MAX_POSITIONS // 2)
            shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in ins[1:]))
            program = torch.onnx.export(model, args, dynamo=True, input_names=ins, output_names=outs,
                                        opset_version=DYNAMO_OPSET, dynamic_shapes=shapes,
                                        external_data=False, verbose=False)
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            axes = {"input_ids": {0: BATCH_DIM, 1: SEQ_DIM}, **{n: {0: BATCH_DIM, 2: PAST_DIM} for n in ins[1:]},
                    "logits": {0: BATCH_DIM, 1: SEQ_DIM}, **{n: {0: BATCH_DIM, 2: "total_seq"} for n in outs[1:]}}
            torch.onnx.export(model, args, buf, dynamo=False, input_names=ins, output_names=outs,
                              opset_version=TORCHSCRIPT_OPSET, dynamic_axes=axes, do_constant_folding=True)
            proto = onnx.load_from_string(buf.getvalue())
    # name the symbolic input axes batch / seq / past_seq whatever the exporter called them
    renames = {}
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        labels = {0: BATCH_DIM, 1: SEQ_DIM} if vi.name == "input_ids" else {0: BATCH_DIM, 2: PAST_DIM}
        for ax, label in labels.items():
            if dims[ax].HasField("dim_param"):
                renames[dims[ax].dim_param] = label
            dims[ax].dim_param = label
    for vi in list(proto.graph.output) + list(proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in renames:
                d.dim_param = renames[d.dim_param]
    onnx.save_model(proto, path, save_as_external_data=False)
    return path


def build_kv_onnx(name: str, dynamo: bool, tmpdir: "str | os.PathLike") -> str:
    """A private copy of the export of ``name`` in ``tmpdir`` (exported once per source version)."""
    import hashlib

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{onnx.__version__}".encode())
    return cached_copy(name, exporter_name(dynamo), h.hexdigest()[:16],
                       lambda path: export_kv_onnx(name, path, dynamo=dynamo), tmpdir)


# --------------------------------------------------------------------------- transformers


class _HFCacheWrapper(nn.Module):
    """A transformers causal LM called with a DynamicCache built from plain past tensors;
    returns logits and the updated keys/values as plain tensors."""

    def __init__(self, model: nn.Module, n_layers: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.model, self.n_layers, self.n_kv_heads, self.head_dim = model, n_layers, n_kv_heads, head_dim
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)],
                             config=self.model.config)
        p, s = past[0].shape[2], input_ids.shape[1]
        mask = torch.ones(input_ids.shape[0], p + s, dtype=torch.long)
        out = self.model(input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True)
        flat = []
        for layer in (getattr(out, "cache", None) or out.past_key_values).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def hf_llama_kv(seed: int = 0) -> nn.Module:
    """transformers LlamaForCausalLM with use_cache (2 layers, hidden 64, GQA 8/2 heads of 16, vocab 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=True, attn_implementation="eager")
    return _randomize_norms(_HFCacheWrapper(LlamaForCausalLM(cfg), 2, 2, 16), seed).eval()


KV_MODELS = {"kv_mha": kv_mha, "kv_gqa": kv_gqa, "hf_llama_kv": hf_llama_kv}
