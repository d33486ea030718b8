"""LLaMA-shape decoders of any size, exported by torch's dynamo exporter with external data.

The weights never exist in memory as a whole: the module is built on the ``meta`` device,
exported (the exporter needs shapes only), and each initializer's random values are written
straight into its external data file, in chunks. Tensors are spread over several data files
(``weights-<k>.bin``), as sharded checkpoints are. Random init: projections N(0, 0.02),
norm scales 1 + N(0, 0.02), so pruning scores differ between channels.

    python -m models.llm_scale --out DIR --preset tinyllama|big-vocab|tiny [--files N]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

__all__ = ["LlmShape", "PRESETS", "export_llm", "parameter_count"]


@dataclass(frozen=True)
class LlmShape:
    vocab: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    inner: int
    tied: bool = False  # lm_head shares the embedding (one vocab x hidden tensor)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


PRESETS = {
    # TinyLlama-1.1B's shape: 1.10 B parameters, every tensor under 2 GiB
    "tinyllama": LlmShape(vocab=32000, hidden=2048, n_layers=22, n_heads=32, n_kv_heads=4, inner=5632),
    # the same decoder with a 264k vocabulary, tied: 1.51 B parameters, the embedding alone 2.16 GB
    "big-vocab": LlmShape(vocab=264000, hidden=2048, n_layers=22, n_heads=32, n_kv_heads=4, inner=5632, tied=True),
    # a quarter-size decoder for profiling (155 M parameters)
    "mid": LlmShape(vocab=32000, hidden=1024, n_layers=8, n_heads=16, n_kv_heads=4, inner=2816),
    # the structure at test size
    "tiny": LlmShape(vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, inner=128),
}


def parameter_count(s: LlmShape) -> int:
    layer = 2 * s.hidden + s.hidden * s.hidden * 2 + 2 * s.hidden * s.n_kv_heads * s.head_dim + 3 * s.hidden * s.inner
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.n_layers * layer + s.hidden


def _module(s: LlmShape):
    import torch

    from models.transformer import LlamaBlock

    with torch.device("meta"):
        m = LlamaBlock(vocab=s.vocab, hidden=s.hidden, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
                       head_dim=s.head_dim, inner=s.inner, n_layers=s.n_layers)
    m = m.to_empty(device="cpu")  # uninitialised: never touched, so never resident
    if s.tied:
        m.lm_head.weight = m.embed_tokens.weight
    m.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
    return m.eval()


def _placeholder(ir, name: str, dtype, shape):
    n = int(np.prod([int(d) for d in shape]))
    return ir.ExternalTensor(location=f"__placeholder__{name}", offset=0, length=n * dtype.itemsize,
                             dtype=dtype, shape=ir.Shape(shape), name=name, base_dir="")


def _export_graph(s: LlmShape, opset: int = 18) -> onnx.ModelProto:
    """The exported graph; initializers carry shapes only (their values are written later)."""
    import torch

    m = _module(s)
    seq = torch.export.Dim("seq", min=2, max=4096)
    batch = torch.export.Dim("batch", min=1, max=64)
    ids = torch.zeros((2, 16), dtype=torch.int64)
    with torch.no_grad():
        program = torch.onnx.export(m, (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                                    opset_version=opset, dynamic_shapes=({0: batch, 1: seq},),
                                    external_data=True, optimize=False, verbose=False)
    ir_model = program.model
    params = {n for n, _ in m.named_parameters(remove_duplicate=False)}
    # every parameter (uninitialised memory) becomes a placeholder: only its shape and dtype are kept
    import onnx_ir as ir

    for name, v in ir_model.graph.initializers.items():
        if name in params and v.const_value is not None:
            v.const_value = _placeholder(ir, name, v.const_value.dtype, v.const_value.shape)
    # nn.Linear exports as MatMul(x, Transpose(W)); the exporter's optimizer would fold that by
    # computing W^T. The values are random anyway: fold by declaring W^T's shape directly.
    for node in list(ir_model.graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or not src.is_initializer() or src.name not in params or len(src.shape) != 2:
            continue
        if len(src.uses()) > 1:  # a tied weight (embedding and lm_head) stays one tensor
            continue
        out = node.outputs[0]
        name = f"{src.name}.T"
        if name not in ir_model.graph.initializers:
            value = ir.Value(name=name, shape=ir.Shape([src.shape[1], src.shape[0]]), type=src.type)
            value.const_value = _placeholder(ir, name, src.const_value.dtype, value.shape)
            ir_model.graph.register_initializer(value)
        out.replace_all_uses_with(ir_model.graph.initializers[name])
        ir_model.graph.remove(node, safe=True)
    for name in [n for n, v in ir_model.graph.initializers.items() if not v.uses() and n in params]:
        ir_model.graph.initializers.pop(name)
    return ir.serde.serialize_model(ir_model)


def _fill(name: str, dims: tuple, dtype: np.dtype, rng: np.random.Generator, out, chunk: int = 1 << 24) -> int:
    """Write random values for one tensor to `out` in chunks; returns the bytes written."""
    n = int(np.prod(dims)) if dims else 1
    norm = len(dims) == 1
    written = 0
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        v = rng.standard_normal(k, dtype=np.float32) * np.float32(0.02)
        if norm:
            v += np.float32(1.0)
        b = v.astype(dtype).tobytes()
        out.write(b)
        written += len(b)
    return written


def export_llm(shape: LlmShape, folder: "str | os.PathLike", *, files: int = 3, seed: int = 0,
               name: str = "model.onnx", dtype=np.float32) -> Path:
    """Export `shape` to `folder/name` with its weights in `files` data files; returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proto = _export_graph(shape)
    rng = np.random.default_rng(seed)
    big = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    assert big, "the exporter kept no parameter as an initializer"
    total = sum(int(np.prod(t.dims)) for t in big)
    per_file = total / max(1, files)
    handles = [open(folder / f"weights-{k}.bin", "wb") for k in range(files)]
    done = 0
    try:
        for t in big:
            k = min(files - 1, int(done / per_file))
            f = handles[k]
            pos = f.tell()
            pad = (-pos) % 4096
            f.write(b"\0" * pad)
            offset = pos + pad
            length = _fill(t.name, tuple(t.dims), np.dtype(dtype), rng, f)
            done += int(np.prod(t.dims))
            del t.external_data[:]
            for key, value in (("location", f"weights-{k}.bin"), ("offset", offset), ("length", length)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    finally:
        for f in handles:
            f.close()
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = PRESETS[args.preset]
    path = export_llm(s, args.out, files=args.files, seed=args.seed)
    print(f"{path}: {parameter_count(s) / 1e9:.3f} B parameters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
