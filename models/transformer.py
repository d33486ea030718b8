"""Small, deterministic transformer models and their ONNX exports.

Two families, all tiny (2 layers, hidden 64-128, < 2M parameters), seeded and in
eval mode:

* own PyTorch modules written the way the reference implementations are, so the
  exported graphs show the patterns graphprune must handle: ``bert_block``
  (separate q/k/v, additive padding mask, post-LN, pooler), ``gpt2_block`` (fused
  QKV ``Conv1D`` split with ``.split``, causal ``where`` mask, tied LM head,
  ``gelu_new``), ``llama_block`` (RMSNorm, rotary embeddings, grouped-query
  attention with ``repeat_kv``, SwiGLU, no biases) and ``vit_block`` (patch Conv2d,
  class token, pre-LN);
* ``transformers`` library models built from small configs with random init (no
  hub access): ``hf_bert``, ``hf_gpt2``, ``hf_llama``, ``hf_vit`` with eager
  attention, and the same with ``attn_implementation="sdpa"`` (``*_sdpa``).

Token models take ``input_ids`` (and ``bert_block``/``hf_bert*`` also
``attention_mask``), both ``[batch, seq]`` int64; image models take
``pixel_values`` ``[batch, 3, 32, 32]``. Every model returns one tensor, named
``output`` in the ONNX file.

``export_transformer_onnx`` writes one self-contained ``.onnx`` file with either
exporter (TorchScript: opset 17, ``dynamic_axes``; dynamo: opset 18,
``torch.export.Dim``); the ``batch`` axis, and ``seq`` for token inputs, stay
symbolic. ``build_transformer_onnx`` adds the same on-disk cache as
:func:`models.export.build_onnx`.

CLI::

    python -m models.transformer --out DIR [--models a,b] [--exporter torchscript|dynamo|both]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from models.export import DYNAMO_OPSET, TORCHSCRIPT_OPSET, _quiet, cached_copy, exporter_name

__all__ = [
    "TRANSFORMER_MODELS",
    "MODEL_SPECS",
    "ModelSpec",
    "OUTPUT_NAME",
    "BATCH_DIM",
    "SEQ_DIM",
    "UnsupportedExportError",
    "example_inputs",
    "export_transformer_onnx",
    "build_transformer_onnx",
    "unsupported_reason",
    "bert_block",
    "gpt2_block",
    "llama_block",
    "vit_block",
    "hf_bert",
    "hf_gpt2",
    "hf_llama",
    "hf_vit",
    "main",
]

DEFAULT_SEED = 0
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
SEQ_DIM = "seq"
IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_CLASSES = 10
# Largest sequence any token model accepts (its position table has this many rows).
MAX_POSITIONS = 64
_MAX_BATCH = 1024
# Example sizes for tracing: neither 0 nor 1 (those would be specialised by dynamo)
# and different from each other, so batch and seq cannot be confused.
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQ = 16


# --------------------------------------------------------------------------- helpers


def _randomize_norms(module: nn.Module, seed: int) -> nn.Module:
    """Give every LayerNorm/RMSNorm non-trivial weight (and bias), so none is an identity."""
    gen = torch.Generator().manual_seed(seed + 1)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)) or type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
                w = getattr(m, "weight", None)
                b = getattr(m, "bias", None)
                if isinstance(w, torch.Tensor):
                    w.copy_(uniform(w.shape, 0.5, 1.5))
                if isinstance(b, torch.Tensor):
                    b.copy_(uniform(b.shape, -0.3, 0.3))
    return module


def _additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, seq] 1/0 mask -> [batch, 1, 1, seq] additive mask (0 keep, finfo.min drop)."""
    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


class SelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (BERT / ViT style)."""

    def __init__(self, hidden: int, n_heads: int) -> None:
        super().__init__()
        assert hidden % n_heads == 0
        self.n_heads = n_heads
        self.head_dim = hidden // n_heads
        self.hidden = hidden
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, self.hidden)
        return self.o(ctx)


# --------------------------------------------------------------------------- BERT


class BertLayer(nn.Module):
    """Post-LN encoder layer: x = LN(x + attn(x)); x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, hidden: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, n_heads)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertBlock(nn.Module):
    """BERT-style encoder: token + position embeddings, post-LN layers, tanh pooler on token 0."""

    def __init__(
        self, vocab: int = 1000, hidden: int = 64, n_heads: int = 4, ffn: int = 256, n_layers: int = 2
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(MAX_POSITIONS, hidden)
        self.register_buffer("position_ids", torch.arange(MAX_POSITIONS)[None], persistent=False)
        self.ln_emb = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, n_heads, ffn) for _ in range(n_layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(self.position_ids[:, :s])
        x = self.ln_emb(x)
        mask = _additive_padding_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return torch.tanh(self.pooler(x[:, 0]))


def bert_block(seed: int = DEFAULT_SEED) -> nn.Module:
    """BERT-style encoder (2 layers, hidden 64, 4 heads, FFN 256, vocab 1000); returns the pooled output."""
    torch.manual_seed(seed)
    return _randomize_norms(BertBlock(), seed).eval()


# --------------------------------------------------------------------------- GPT-2


class Conv1D(nn.Module):
    """transformers' Conv1D: a Linear with the weight stored as [in, out]; y = x @ W + b via addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        bound = 1.0 / math.sqrt(nx)
        self.weight = nn.Parameter(torch.empty(nx, nf).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(nf).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU, written out as transformers' NewGELUActivation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    """Fused QKV Conv1D split with .split(hidden, dim=2); causal mask from a tril buffer + where."""

    def __init__(self, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.n_heads = n_heads
        self.head_dim = hidden // n_heads
        self.c_attn = Conv1D(3 * hidden, hidden)
        self.c_proj = Conv1D(hidden, hidden)
        tril = torch.tril(torch.ones(MAX_POSITIONS, MAX_POSITIONS, dtype=torch.bool))
        self.register_buffer("bias", tril.view(1, 1, MAX_POSITIONS, MAX_POSITIONS), persistent=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        new_shape = t.size()[:-1] + (self.n_heads, self.head_dim)
        return t.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        s = x.size(-2)
        causal = self.bias[:, :, :s, :s]
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.size()[:-2] + (self.hidden,))
        return self.c_proj(ctx)


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(inner, hidden)
        self.c_proj = Conv1D(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Layer(nn.Module):
    """Pre-LN decoder layer."""

    def __init__(self, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-5)
        self.attn = GPT2Attention(hidden, n_heads)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-5)
        self.mlp = GPT2MLP(hidden, 4 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Block(nn.Module):
    """GPT-2-style LM: wte + wpe, pre-LN layers, final LN, LM head tied to wte."""

    def __init__(self, vocab: int = 500, hidden: int = 64, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(MAX_POSITIONS, hidden)
        self.h = nn.ModuleList(GPT2Layer(hidden, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden, eps=1e-5)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(-1), dtype=torch.long, device=input_ids.device)[None]
        x = self.wte(input_ids) + self.wpe(positions)
        for layer in self.h:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def gpt2_block(seed: int = DEFAULT_SEED) -> nn.Module:
    """GPT-2-style LM (2 layers, hidden 64, 4 heads, vocab 500, tied head); returns logits [b, s, vocab]."""
    torch.manual_seed(seed)
    model = GPT2Block()
    with torch.no_grad():  # GPT-2 scale embeddings: tied logits stay O(1)
        model.wte.weight.mul_(0.1)
        model.wpe.weight.mul_(0.1)
    return _randomize_norms(model, seed).eval()


# --------------------------------------------------------------------------- LLaMA


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, n_kv, s, d] -> [b, n_kv * n_rep, s, d] (each kv head repeated n_rep times, adjacent)."""
    b, n_kv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.n_rep = n_heads // n_kv_heads
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = repeat_kv(k, self.n_rep)
        v = repeat_kv(v, self.n_rep)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(ctx)


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, inner: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = LlamaAttention(hidden, n_heads, n_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = LlamaMLP(hidden, inner)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBlock(nn.Module):
    """LLaMA-style decoder: RMSNorm, rotary, GQA (8 q heads, 2 kv heads, head_dim 16), SwiGLU, no biases."""

    def __init__(
        self,
        vocab: int = 512,
        hidden: int = 128,
        n_heads: int = 8,
        n_kv_heads: int = 2,
        head_dim: int = 16,
        inner: int = 256,
        n_layers: int = 2,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            LlamaLayer(hidden, n_heads, n_kv_heads, head_dim, inner) for _ in range(n_layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        position_ids = torch.arange(s, device=input_ids.device)[None]  # [1, s]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # [1, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()[:, None]  # [1, 1, s, d]
        sin = emb.sin()[:, None]
        mask = torch.full((s, s), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def llama_block(seed: int = DEFAULT_SEED) -> nn.Module:
    """LLaMA-style LM (2 layers, hidden 128, GQA 8/2 heads of 16, SwiGLU 256, vocab 512); returns logits."""
    torch.manual_seed(seed)
    return _randomize_norms(LlamaBlock(), seed).eval()


# --------------------------------------------------------------------------- ViT


class ViTLayer(nn.Module):
    """Pre-LN encoder layer."""

    def __init__(self, hidden: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = SelfAttention(hidden, n_heads)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-6)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTBlock(nn.Module):
    """ViT: Conv2d patch embedding, class token, learned positions, pre-LN layers, head on the class token."""

    def __init__(self, hidden: int = 64, n_heads: int = 4, ffn: int = 128, n_layers: int = 2) -> None:
        super().__init__()
        n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
        self.patch = nn.Conv2d(3, hidden, PATCH_SIZE, stride=PATCH_SIZE)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, hidden) * 0.02)
        self.layers = nn.ModuleList(ViTLayer(hidden, n_heads, ffn) for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # [b, n_patches, hidden]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def vit_block(seed: int = DEFAULT_SEED) -> nn.Module:
    """ViT (32x32 image, patch 8, hidden 64, 4 heads, 2 layers); returns class logits [b, 10]."""
    torch.manual_seed(seed)
    return _randomize_norms(ViTBlock(), seed).eval()


# --------------------------------------------------------------------------- transformers library models


class _HFTokenModel(nn.Module):
    """Plain-tensor forward around a transformers model; returns one tensor (``attr`` of the output)."""

    def __init__(self, model: nn.Module, attr: str, with_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.attr = attr
        self.with_mask = with_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None and not self.with_mask:
            # An explicit all-ones mask: without one, transformers' create_causal_mask looks for
            # packed sequences in position_ids (torch.diff, which TorchScript cannot export).
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"attention_mask": attention_mask}
        if getattr(self.model.config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        out = self.model(input_ids=input_ids, return_dict=True, **kwargs)
        return getattr(out, self.attr)


class _HFImageModel(nn.Module):
    def __init__(self, model: nn.Module, attr: str) -> None:
        super().__init__()
        self.model = model
        self.attr = attr

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values, return_dict=True), self.attr)


def _hf_finish(wrapper: nn.Module, seed: int) -> nn.Module:
    return _randomize_norms(wrapper, seed).eval()


def hf_bert(seed: int = DEFAULT_SEED, attn: str = "eager") -> nn.Module:
    """transformers BertModel (2 layers, hidden 64, 4 heads, vocab 1000); returns last_hidden_state."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation=attn,
    )
    model = BertModel(cfg, add_pooling_layer=False)
    return _hf_finish(_HFTokenModel(model, "last_hidden_state", with_mask=True), seed)


def hf_gpt2(seed: int = DEFAULT_SEED, attn: str = "eager") -> nn.Module:
    """transformers GPT2LMHeadModel (2 layers, hidden 64, 4 heads, vocab 500, tied head); returns logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=500,
        n_positions=MAX_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        use_cache=False,
        bos_token_id=499,  # GPT-2's 50256 lies outside this small vocabulary
        eos_token_id=499,
        attn_implementation=attn,
    )
    model = GPT2LMHeadModel(cfg)
    return _hf_finish(_HFTokenModel(model, "logits", with_mask=False), seed)


def hf_llama(seed: int = DEFAULT_SEED, attn: str = "eager") -> nn.Module:
    """transformers LlamaForCausalLM (2 layers, hidden 128, GQA 8/2 heads of 16, vocab 512): logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg)
    return _hf_finish(_HFTokenModel(model, "logits", with_mask=False), seed)


def hf_vit(seed: int = DEFAULT_SEED, attn: str = "eager") -> nn.Module:
    """transformers ViTForImageClassification (32x32, patch 8, hidden 64, 4 heads, 2 layers): logits."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=NUM_CLASSES,
        attn_implementation=attn,
    )
    model = ViTForImageClassification(cfg)
    return _hf_finish(_HFImageModel(model, "logits"), seed)


def _sdpa(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(seed: int = DEFAULT_SEED) -> nn.Module:
        return builder(seed, attn="sdpa")

    build.__name__ = f"{builder.__name__}_sdpa"
    build.__doc__ = f"{builder.__name__} with attn_implementation='sdpa'."
    return build


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build and feed a model.

    ``kind`` is ``"tokens"`` or ``"image"``; ``inputs`` the forward arguments in order;
    ``vocab`` the token-id range; ``output_axes`` the symbolic axes of the output.
    """

    builder: Callable[..., nn.Module]
    kind: str
    inputs: tuple[str, ...]
    vocab: int = 0
    output_axes: tuple[str, ...] = (BATCH_DIM, SEQ_DIM)


_IMAGE = ("pixel_values",)
MODEL_SPECS: dict[str, ModelSpec] = {
    # own modules
    "bert_block": ModelSpec(bert_block, "tokens", ("input_ids", "attention_mask"), 1000, (BATCH_DIM,)),
    "gpt2_block": ModelSpec(gpt2_block, "tokens", ("input_ids",), 500),
    "llama_block": ModelSpec(llama_block, "tokens", ("input_ids",), 512),
    "vit_block": ModelSpec(vit_block, "image", _IMAGE, 0, (BATCH_DIM,)),
    # transformers, eager attention
    "hf_bert": ModelSpec(hf_bert, "tokens", ("input_ids", "attention_mask"), 1000),
    "hf_gpt2": ModelSpec(hf_gpt2, "tokens", ("input_ids",), 500),
    "hf_llama": ModelSpec(hf_llama, "tokens", ("input_ids",), 512),
    "hf_vit": ModelSpec(hf_vit, "image", _IMAGE, 0, (BATCH_DIM,)),
    # transformers, attn_implementation="sdpa" (both exporters decompose it at opset 17/18)
    "hf_bert_sdpa": ModelSpec(_sdpa(hf_bert), "tokens", ("input_ids", "attention_mask"), 1000),
    "hf_gpt2_sdpa": ModelSpec(_sdpa(hf_gpt2), "tokens", ("input_ids",), 500),
    "hf_llama_sdpa": ModelSpec(_sdpa(hf_llama), "tokens", ("input_ids",), 512),
    "hf_vit_sdpa": ModelSpec(_sdpa(hf_vit), "image", _IMAGE, 0, (BATCH_DIM,)),
}

TRANSFORMER_MODELS: dict[str, Callable[..., nn.Module]] = {n: spec.builder for n, spec in MODEL_SPECS.items()}

# (name, exporter) -> why that export cannot be produced. Every registered pair exports
# today (torch 2.13, transformers 5.x); the one known failure, TorchScript on transformers'
# causal models without an attention mask (``aten::diff`` in the packed-sequence check of
# ``create_causal_mask``), is avoided by the wrappers passing an all-ones mask.
_UNSUPPORTED: dict[tuple[str, str], str] = {}


class UnsupportedExportError(RuntimeError):
    """A (model, exporter) combination that is known not to export correctly."""


def unsupported_reason(name: str, dynamo: bool) -> str | None:
    """Why ``name`` cannot be exported with this exporter, or ``None`` when it can."""
    return _UNSUPPORTED.get((name, exporter_name(dynamo)))


def _spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def example_inputs(
    name: str, batch: int = _EXAMPLE_BATCH, seq: int = _EXAMPLE_SEQ, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded feeds for ``name``: ``input_ids`` in ``[0, vocab)`` (int64); ``attention_mask``
    ones with 0..seq//3 trailing zeros per row (the first row unpadded, every row keeps at
    least one 1); ``pixel_values`` float32 ``[batch, 3, 32, 32]`` (``seq`` is ignored)."""
    spec = _spec(name)
    rng = np.random.default_rng([seed, batch, seq])
    if spec.kind == "image":
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)}
    if not 1 <= seq <= MAX_POSITIONS:
        raise ValueError(f"seq must be in [1, {MAX_POSITIONS}], got {seq}")
    feeds = {"input_ids": rng.integers(0, spec.vocab, size=(batch, seq), dtype=np.int64)}
    if "attention_mask" in spec.inputs:
        mask = np.ones((batch, seq), dtype=np.int64)
        for row in range(1, batch):
            pad = int(rng.integers(0, seq // 3 + 1))
            if pad:
                mask[row, seq - pad :] = 0
        feeds["attention_mask"] = mask
    return feeds


# --------------------------------------------------------------------------- export


def _dims(spec: ModelSpec) -> dict[str, dict[int, str]]:
    """Symbolic axes per input name."""
    if spec.kind == "image":
        return {n: {0: BATCH_DIM} for n in spec.inputs}
    return {n: {0: BATCH_DIM, 1: SEQ_DIM} for n in spec.inputs}


def _name_dims(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Name the symbolic axes ``batch``/``seq`` on graph inputs and on the output.

    Input axes listed by :func:`_dims` are made symbolic; output axes are only renamed
    when the exporter already left them symbolic (a baked-in size stays visible).
    """
    axes = _dims(spec)
    renames: dict[str, str] = {}
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for axis, label in axes.get(vi.name, {}).items():
            if dims[axis].HasField("dim_param") and dims[axis].dim_param != label:
                renames[dims[axis].dim_param] = label
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = label
    for vi in proto.graph.output:
        dims = vi.type.tensor_type.shape.dim
        for axis, label in enumerate(spec.output_axes):
            if axis < len(dims) and dims[axis].HasField("dim_param"):
                dims[axis].dim_param = label
    for vi in proto.graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in renames:
                d.dim_param = renames[d.dim_param]


def _short(exc: BaseException, limit: int = 2000) -> str:
    """The exporter's message without the TorchScript IR dump it appends."""
    text = str(exc).split("\n\nTorch IR graph at exception")[0].split("Torch IR graph at exception")[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def export_transformer_onnx(
    name: str,
    path: str | os.PathLike[str],
    *,
    dynamo: bool,
    opset: int | None = None,
    seed: int = DEFAULT_SEED,
) -> str:
    """Export model ``name`` to one self-contained ONNX file at ``path``; returns ``path``.

    Inputs keep their PyTorch names (``input_ids``, ``attention_mask``, ``pixel_values``);
    the output is ``output``. Axis 0 (``batch``) of every input, and axis 1 (``seq``) of
    token inputs, are symbolic. Raises :class:`UnsupportedExportError` for a known-bad
    combination and ``RuntimeError`` (with the exporter's output) when export fails.
    """
    spec = _spec(name)
    reason = unsupported_reason(name, dynamo)
    if reason:
        raise UnsupportedExportError(
            f"{name} cannot be exported with the {exporter_name(dynamo)} exporter: {reason}"
        )
    model = spec.builder(seed)
    feeds = example_inputs(name, _EXAMPLE_BATCH, _EXAMPLE_SEQ, seed=seed)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.inputs)
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    axes = _dims(spec)
    with _quiet() as log, torch.no_grad():
        try:
            if dynamo:
                batch = torch.export.Dim(BATCH_DIM, min=1, max=_MAX_BATCH)
                seq = torch.export.Dim(SEQ_DIM, min=1, max=MAX_POSITIONS)
                dims = {BATCH_DIM: batch, SEQ_DIM: seq}
                dynamic_shapes = tuple(
                    {axis: dims[label] for axis, label in axes[n].items()} for n in spec.inputs
                )
                program = torch.onnx.export(
                    model,
                    args,
                    dynamo=True,
                    input_names=list(spec.inputs),
                    output_names=[OUTPUT_NAME],
                    opset_version=opset or DYNAMO_OPSET,
                    dynamic_shapes=dynamic_shapes,
                    external_data=False,
                    verbose=False,
                )
                assert program is not None
                proto = program.model_proto
            else:
                buf = io.BytesIO()
                out_axes = dict(enumerate(spec.output_axes))
                torch.onnx.export(
                    model,
                    args,
                    buf,
                    dynamo=False,
                    input_names=list(spec.inputs),
                    output_names=[OUTPUT_NAME],
                    opset_version=opset or TORCHSCRIPT_OPSET,
                    dynamic_axes={**axes, OUTPUT_NAME: out_axes},
                    do_constant_folding=True,
                    verbose=False,
                )
                proto = onnx.load_from_string(buf.getvalue())
        except Exception as exc:
            raise RuntimeError(
                f"{name}: {exporter_name(dynamo)} export failed: {_short(exc)}\n"
                f"--- exporter output (tail) ---\n{log.getvalue()[-2000:]}"
            ) from exc
    _name_dims(proto, spec)
    onnx.save_model(proto, path, save_as_external_data=False)
    return path


# --------------------------------------------------------------------------- cache


def _source_digest() -> str:
    """Hash of this file, models/export.py and library versions; stale cache entries miss."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for fname in ("transformer.py", "export.py"):
        h.update((here / fname).read_bytes())
    try:
        import transformers

        tver = transformers.__version__
    except ImportError:  # pragma: no cover - only the hf_* models need it
        tver = "none"
    h.update(f"{torch.__version__}|{onnx.__version__}|{tver}".encode())
    return h.hexdigest()[:16]


def build_transformer_onnx(name: str, dynamo: bool, tmpdir: str | os.PathLike[str]) -> str:
    """Return a private copy of ``name`` exported with the chosen exporter, in ``tmpdir``.

    Exports once per (name, exporter, source version) into the cache shared with
    :func:`models.export.build_onnx`; concurrent writers each export to a temp file and
    ``os.replace`` it into place. Raises :class:`UnsupportedExportError` for a known-bad
    combination.
    """
    _spec(name)
    reason = unsupported_reason(name, dynamo)
    if reason:
        raise UnsupportedExportError(
            f"{name} cannot be exported with the {exporter_name(dynamo)} exporter: {reason}"
        )
    return cached_copy(name, exporter_name(dynamo), _source_digest(),
                       lambda path: export_transformer_onnx(name, path, dynamo=dynamo), tmpdir)


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models.transformer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--models", default=",".join(MODEL_SPECS), help="comma-separated model names (default: all)"
    )
    parser.add_argument("--exporter", choices=("torchscript", "dynamo", "both"), default="both")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_SPECS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_SPECS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: writes ``OUT/<name>.<exporter>.onnx``; skips (and reports) unsupported pairs."""
    args = _parse_args(argv)
    kinds = [False, True] if args.exporter == "both" else [args.exporter == "dynamo"]
    status = 0
    for name in args.models:
        for dynamo in kinds:
            path = args.out / f"{name}.{exporter_name(dynamo)}.onnx"
            start = time.perf_counter()
            try:
                export_transformer_onnx(name, path, dynamo=dynamo)
            except UnsupportedExportError as exc:
                print(f"skip: {exc}", file=sys.stderr)
                continue
            except RuntimeError as exc:
                print(f"error: {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
                status = 2
                continue
            print(f"{path}  ({time.perf_counter() - start:.1f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
