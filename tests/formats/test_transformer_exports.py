"""Every transformer in models/transformer.py, both PyTorch exporters: a valid, dynamic,
faithful ONNX file.

For each (model, exporter): onnx.checker (full_check) passes; the graph inputs keep
symbolic ``batch`` (and ``seq`` for token inputs) axes; onnxruntime runs at
(batch, seq) = (1, 5) and (3, 11) and matches PyTorch within 1e-4 (absolute).
Exports are cached on disk (see models.export.cache_dir), so only a cold cache is slow.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from models import transformer as tx  # noqa: E402
from models.transformer import (  # noqa: E402
    MODEL_SPECS,
    TRANSFORMER_MODELS,
    UnsupportedExportError,
    build_transformer_onnx,
    example_inputs,
    unsupported_reason,
)

try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:  # the hf_* models need it; the own modules do not
    HAS_TRANSFORMERS = False

EXPORTERS = {"torchscript": False, "dynamo": True}
SHAPES = [(1, 5), (3, 11)]
ATOL = 1e-4
_NEEDS_HF = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
_AVAILABLE = [n for n in TRANSFORMER_MODELS if HAS_TRANSFORMERS or not n.startswith("hf_")]
CASES = [
    pytest.param(
        name, exporter, id=f"{name}-{exporter}", marks=[_NEEDS_HF] if name.startswith("hf_") else []
    )
    for name in TRANSFORMER_MODELS
    for exporter, dynamo in EXPORTERS.items()
    if unsupported_reason(name, dynamo) is None
]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    cache: dict[tuple[str, str], str] = {}
    tmp = tmp_path_factory.mktemp("transformer")

    def get(name: str, exporter: str) -> str:
        key = (name, exporter)
        if key not in cache:
            cache[key] = build_transformer_onnx(name, EXPORTERS[exporter], str(tmp))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def torch_model():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = TRANSFORMER_MODELS[name]()
        return cache[name]

    return get


def _dims(vi: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name, exporter", CASES)
def test_export_valid_dynamic_and_faithful(onnx_path, torch_model, name, exporter):
    spec = MODEL_SPECS[name]
    path = onnx_path(name, exporter)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

    # symbolic batch (and seq) on every graph input, in the module's argument order
    init = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in init]
    assert [vi.name for vi in inputs] == list(spec.inputs)
    for vi in inputs:
        dims = _dims(vi)
        assert dims[0] == tx.BATCH_DIM, (vi.name, dims)
        if spec.kind == "tokens":
            assert dims == [tx.BATCH_DIM, tx.SEQ_DIM], (vi.name, dims)
        else:
            assert dims[1:] == [3, tx.IMAGE_SIZE, tx.IMAGE_SIZE], (vi.name, dims)
    (out,) = proto.graph.output
    assert out.name == tx.OUTPUT_NAME
    assert _dims(out)[: len(spec.output_axes)] == list(spec.output_axes), _dims(out)

    # onnxruntime == PyTorch at sizes other than the traced (2, 16)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = torch_model(name)
    for batch, seq in SHAPES:
        feeds = example_inputs(name, batch, seq, seed=batch * 100 + seq)
        (got,) = sess.run(None, feeds)
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[n]) for n in spec.inputs)).numpy()
        assert got.shape == want.shape, (batch, seq, got.shape, want.shape)
        assert got.shape[0] == batch
        if "seq" in spec.output_axes:
            assert got.shape[1] == seq
        np.testing.assert_allclose(
            got, want, rtol=0, atol=ATOL, err_msg=f"{name} {exporter} at {(batch, seq)}"
        )


def test_example_inputs():
    for name, spec in MODEL_SPECS.items():
        feeds = example_inputs(name, 3, 11)
        assert list(feeds) == list(spec.inputs)
        if spec.kind == "image":
            assert feeds["pixel_values"].shape == (3, 3, tx.IMAGE_SIZE, tx.IMAGE_SIZE)
            assert feeds["pixel_values"].dtype == np.float32
            continue
        ids = feeds["input_ids"]
        assert ids.shape == (3, 11) and ids.dtype == np.int64
        assert 0 <= ids.min() and ids.max() < spec.vocab
        if "attention_mask" in feeds:
            mask = feeds["attention_mask"]
            assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
            assert (mask[:, 0] == 1).all()
            assert (np.diff(mask, axis=1) <= 0).all()  # zeros only at the end
        # deterministic
        again = example_inputs(name, 3, 11)
        assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert (example_inputs("bert_block", 8, 30)["attention_mask"] == 0).any()


def test_models_small_and_in_eval_mode(torch_model):
    for name in _AVAILABLE:
        model = torch_model(name)
        assert not model.training, name
        assert sum(p.numel() for p in model.parameters()) < 2_000_000, name


def test_unsupported_pair_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(tx._UNSUPPORTED, ("vit_block", "torchscript"), "for the test")
    with pytest.raises(UnsupportedExportError, match="vit_block.*torchscript.*for the test"):
        build_transformer_onnx("vit_block", False, tmp_path)
    with pytest.raises(KeyError, match="unknown model"):
        build_transformer_onnx("no_such_model", True, tmp_path)
