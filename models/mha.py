"""A small encoder built on ``torch.nn.MultiheadAttention``, exported with either exporter.

``nn.MultiheadAttention`` (torchvision ViT, DETR, CLIP-style models) is exported with
its heads folded into the batch axis: in_proj -> [.., 3E] -> [.., 3, E] -> q/k/v ->
[S, B*H, D] -> attention -> [S, B, E] -> out_proj. This builder gives a tiny model with
that pattern for tests: tokens ``input`` [batch, seq, E] -> one MHA block (residual,
LayerNorm, MLP) -> mean over tokens -> classifier ``output`` [batch, classes].

The TorchScript exporter traces ``k.view(k.shape[0], ...)`` with the example sequence
length as a constant, so its exports run at that length only; ``dynamic_seq=False``
exports the sequence axis as static (as for ViT, whose token count is fixed).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import torch
from torch import nn

from models.export import BATCH_DIM, DYNAMO_OPSET, INPUT_NAME, OUTPUT_NAME, TORCHSCRIPT_OPSET, _quiet

__all__ = ["MHAEncoder", "build_mha", "export_mha_onnx", "SEQ_DIM", "MASK_NAME", "EXAMPLE_SEQ"]

SEQ_DIM = "seq"
MASK_NAME = "mask"
EXAMPLE_SEQ = 7


class MHAEncoder(nn.Module):
    """tokens [B, S, E] -> MHA block + MLP -> mean over S -> logits [B, classes]."""

    def __init__(self, embed: int = 64, heads: int = 4, ffn: int = 128, classes: int = 10,
                 batch_first: bool = True, need_weights: bool = False, padding_mask: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.need_weights = need_weights  # True: the bmm path over [B*H, S, D] (weights discarded)
        self.padding_mask = padding_mask  # True: a second input ``mask`` [B, S] (bool, True = padding)
        self.norm1 = nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(embed)
        self.mlp = nn.Sequential(nn.Linear(embed, ffn), nn.GELU(), nn.Linear(ffn, embed))
        self.head = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.attn(h, h, h, key_padding_mask=mask, need_weights=self.need_weights)
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def build_mha(batch_first: bool = True, seed: int = 0, **kw) -> MHAEncoder:
    """An :class:`MHAEncoder` with seeded random weights (biases and norms non-trivial)."""
    torch.manual_seed(seed)
    model = MHAEncoder(batch_first=batch_first, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def _export(model: MHAEncoder, x: torch.Tensor, dynamo: bool, dynamic_seq: bool) -> onnx.ModelProto:
    args, names = (x,), [INPUT_NAME]
    if model.padding_mask:
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[0, -2:] = True
        args, names = (x, mask), [INPUT_NAME, MASK_NAME]
    if dynamo:
        dims = {0: torch.export.Dim(BATCH_DIM, min=1, max=1024)}
        if dynamic_seq:
            dims[1] = torch.export.Dim(SEQ_DIM, min=2, max=512)
        program = torch.onnx.export(model, args, dynamo=True, input_names=names,
                                    output_names=[OUTPUT_NAME], opset_version=DYNAMO_OPSET,
                                    dynamic_shapes=tuple(dims for _ in args), external_data=False, verbose=False)
        return program.model_proto
    buf = io.BytesIO()
    axes = {0: BATCH_DIM, 1: SEQ_DIM} if dynamic_seq else {0: BATCH_DIM}
    torch.onnx.export(model, args, buf, dynamo=False, input_names=names, output_names=[OUTPUT_NAME],
                      opset_version=TORCHSCRIPT_OPSET,
                      dynamic_axes={**{n: axes for n in names}, OUTPUT_NAME: {0: BATCH_DIM}},
                      do_constant_folding=True, verbose=False)
    return onnx.load_from_string(buf.getvalue())


def export_mha_onnx(path: str | os.PathLike[str], *, dynamo: bool, batch_first: bool = True,
                    dynamic_seq: bool = True, need_weights: bool = False, padding_mask: bool = False,
                    seed: int = 0) -> str:
    """Export :func:`build_mha` to one self-contained ONNX file; the batch axis (and with
    `dynamic_seq` the sequence axis) is dynamic. Returns the path."""
    model = build_mha(batch_first=batch_first, seed=seed, need_weights=need_weights, padding_mask=padding_mask)
    x = torch.randn(2, EXAMPLE_SEQ, model.norm1.normalized_shape[0])
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel has no ONNX export
    try:
        with _quiet(), torch.no_grad():
            proto = _export(model, x, dynamo, dynamic_seq)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    onnx.save(proto, path)
    return path
