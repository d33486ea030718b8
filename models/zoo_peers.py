"""Per-model settings for the Torch-Pruning peer of the zoo benchmark (tools/bench_zoo.py).

:func:`torch_pruning_settings` gives, for a PyTorch zoo model, ``config(module) -> dict`` of
``MetaPruner`` keyword arguments (``ignored_layers``: the final classifier; ``num_heads`` /
``prune_num_heads`` / ``prune_head_dims`` where Torch-Pruning can group attention heads;
``round_to``) and ``finalize(module, pruner)``, which updates the module attributes that
forward() reads (head counts, hidden sizes) after pruning, as Torch-Pruning's own examples
do. Kept apart from models/zoo.py so that tuning the peer does not invalidate the export
cache. Nothing here imports torch until called.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["torch_pruning_settings"]

Config = Callable[[Any], dict]
Finalize = Callable[[Any, Any], None]


def _classifier_layers(module, num_out: int) -> list:
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == num_out]


# --------------------------------------------------------------------------- torchvision


def _torchvision_config(name: str) -> Config:
    def config(module) -> dict:
        from torch import nn

        ignored = _classifier_layers(module, 1000)
        if name == "squeezenet1_1":  # the classifier is a 1x1 conv to 1000 channels
            ignored += [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1000]
        cfg: dict = {"ignored_layers": ignored}
        if name == "vit_b_16":
            # as Torch-Pruning's torchvision example: keep widths a multiple of the head count
            cfg["round_to"] = module.encoder.layers[0].num_heads
        if name == "swin_t":
            cfg["num_heads"] = {m.qkv: m.num_heads for m in module.modules()
                                if hasattr(m, "qkv") and hasattr(m, "num_heads")}
        return cfg

    return config


def _torchvision_finalize(name: str) -> Finalize | None:
    if name == "vit_b_16":
        def finalize(module, pruner) -> None:
            # torchvision's ViT reshapes with self.hidden_dim; follow the pruned width
            module.hidden_dim = module.conv_proj.out_channels

        return finalize
    return None


# --------------------------------------------------------------------------- transformers


def _hf_heads_config(attn_type: str, q: str, k: str, v: str, classifier: str = "classifier") -> Config:
    """Whole heads (query/key/value grouped per head, as in Torch-Pruning's HF BERT/LLM
    examples: prune_num_heads=True, prune_head_dims=False); the classifier is ignored."""

    def config(wrapper) -> dict:
        model = wrapper.model
        cfg = model.config
        heads = {}
        for m in model.modules():
            if type(m).__name__ == attn_type:
                kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                heads[getattr(m, q)] = cfg.num_attention_heads
                heads[getattr(m, k)] = kv
                heads[getattr(m, v)] = kv
        ignored = [getattr(model, classifier)] if hasattr(model, classifier) else []
        return {"ignored_layers": ignored, "num_heads": heads, "prune_num_heads": True, "prune_head_dims": False}

    return config


def _hf_heads_finalize(attn_type: str, q: str, k: str | None = None) -> Finalize:
    """After pruning: per-module head counts from the pruned projection widths."""

    def finalize(wrapper, pruner) -> None:
        for m in wrapper.model.modules():
            if type(m).__name__ != attn_type:
                continue
            qp = getattr(m, q)
            head_dim = getattr(m, "attention_head_size", None) or getattr(m, "head_dim")
            n_q = qp.out_features // head_dim
            if hasattr(m, "num_attention_heads"):
                m.num_attention_heads = n_q
            if hasattr(m, "all_head_size"):
                m.all_head_size = qp.out_features
            if k is not None:
                n_kv = getattr(m, k).out_features // head_dim
                if n_kv == 0 or n_q % n_kv:
                    raise RuntimeError(f"pruned to {n_q} query heads and {n_kv} KV heads: not a valid GQA layout")
                m.num_key_value_groups = n_q // n_kv

    return finalize


def _gpt2_config(wrapper) -> dict:
    # GPT-2 keeps Q, K and V in one transformers Conv1D (c_attn); Torch-Pruning has no head
    # grouping for it, so only the (tied) LM head is ignored.
    return {"ignored_layers": [wrapper.model.lm_head]}


def _minilm_config(wrapper) -> dict:
    """MiniLM's output is the hidden state itself (no classifier): the layers writing the
    residual stream are ignored so that its width, the output width, stays; the pooler is
    dead code for that output and is dropped."""
    from torch import nn

    model = wrapper.model
    cfg = _hf_heads_config("BertSelfAttention", "query", "key", "value", classifier="pooler")(wrapper)
    model.pooler = None
    hidden = model.config.hidden_size
    cfg["ignored_layers"] = [m for m in model.modules()
                             if (isinstance(m, nn.Linear) and m.out_features == hidden)
                             or isinstance(m, (nn.Embedding, nn.LayerNorm))]
    return cfg


def _efficientnet_lite0_config(module) -> dict:
    return {"ignored_layers": _classifier_layers(module, 1000)}


_TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
                "densenet121", "convnext_tiny", "squeezenet1_1", "shufflenet_v2_x1_0", "vit_b_16", "swin_t")


def torch_pruning_settings(name: str) -> tuple[Config | None, Finalize | None]:
    """(config, finalize) for the Torch-Pruning peer on zoo model ``name``."""
    if name in _TORCHVISION:
        return _torchvision_config(name), _torchvision_finalize(name)
    return {
        "hf_bert": (_hf_heads_config("BertSelfAttention", "query", "key", "value"),
                    _hf_heads_finalize("BertSelfAttention", "query")),
        "hf_gpt2": (_gpt2_config, None),
        "hf_llama_gqa": (_hf_heads_config("LlamaAttention", "q_proj", "k_proj", "v_proj", classifier="lm_head"),
                         _hf_heads_finalize("LlamaAttention", "q_proj", "k_proj")),
        "hf_vit": (_hf_heads_config("ViTAttention", "q_proj", "k_proj", "v_proj"),
                   _hf_heads_finalize("ViTAttention", "q_proj")),
        "minilm_l6": (_minilm_config, _hf_heads_finalize("BertSelfAttention", "query")),
        "efficientnet_lite0": (_efficientnet_lite0_config, None),
    }.get(name, (None, None))
