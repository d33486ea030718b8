"""Model I/O: lazy external data, atomic saves, and weights held in Constant nodes."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper

try:
    from _fixtures import constant_weight_model, listing, resnet_onnx, sha256  # noqa: F401
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._fixtures import constant_weight_model, listing, resnet_onnx, sha256  # noqa: F401

import graphprune
import graphprune.model_io as model_io
from graphprune.model_io import load_model, save_model



def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(external_data_helper._get_all_tensors(model))


def _run(model_or_path, x: np.ndarray) -> np.ndarray:
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def resnet_proto(resnet_onnx) -> onnx.ModelProto:
    return onnx.load(resnet_onnx)


@pytest.fixture
def external_model(tmp_path, resnet_proto) -> Path:
    """resnet_basic saved with every tensor in model.onnx.data."""
    folder = tmp_path / "ext"
    folder.mkdir()
    model = onnx.ModelProto()
    model.CopyFrom(resnet_proto)
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert listing(folder) == {"model.onnx", "model.onnx.data"}
    return folder / "model.onnx"


def _pair(folder: Path, name: str) -> bool:
    """The folder holds the graph `name` and one data file `<name>.<8 hex>.data`, which it names."""
    import re

    files = listing(folder)
    data = files - {name}
    if name not in files or len(data) != 1 or not re.fullmatch(re.escape(name) + r"\.[0-9a-f]{8}\.data", data.pop()):
        return False
    saved = onnx.load(str(folder / name), load_external_data=False)
    return {external_data_helper.ExternalDataInfo(t).location for t in _tensors(saved)
            if external_data_helper.uses_external_data(t)} == files - {name}


# --------------------------------------------------------------------------- loading


def test_load_external_data_is_lazy(external_model):
    model, meta = load_model(external_model)
    tensors = _tensors(model)
    assert tensors
    for t in tensors:
        assert t.data_location == onnx.TensorProto.EXTERNAL, t.name
        assert not t.raw_data, f"{t.name} was read at load time"
    assert meta.had_external_data


def test_prune_external_data_model_from_path(external_model, resnet_proto, tmp_path):
    data_digest = sha256(external_model.with_name("model.onnx.data"))
    result = graphprune.prune(str(external_model), 0.5)
    out = Path(result.save(tmp_path / "out" / "pruned.onnx"))
    assert _pair(tmp_path / "out", "pruned.onnx")
    assert sha256(external_model.with_name("model.onnx.data")) == data_digest, "the input's data was modified"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = graphprune.prune(resnet_proto, 0.5).model  # the same model, weights inline
    np.testing.assert_allclose(_run(str(out), x), _run(reference, x), rtol=1e-5, atol=1e-6)


def test_missing_external_data_file_is_bad_input(external_model):
    external_model.with_name("model.onnx.data").unlink()
    with pytest.raises(graphprune.BadInputError, match="model.onnx.data"):
        load_model(external_model)


def test_load_model_copies_a_proto(resnet_proto):
    before = resnet_proto.SerializeToString(deterministic=True)
    model, meta = load_model(resnet_proto)
    assert model is not resnet_proto
    model.graph.node[0].name = "renamed"
    assert resnet_proto.SerializeToString(deterministic=True) == before
    assert meta.ir_version == resnet_proto.ir_version
    assert meta.default_opset == resnet_proto.opset_import[0].version


def test_load_model_bad_files(tmp_path, resnet_onnx):
    (tmp_path / "cut.onnx").write_bytes(Path(resnet_onnx).read_bytes()[:200])
    (tmp_path / "empty.onnx").write_bytes(b"")
    for path in (tmp_path / "missing.onnx", tmp_path, tmp_path / "cut.onnx", tmp_path / "empty.onnx"):
        with pytest.raises(graphprune.BadInputError, match=str(path.name)):
            load_model(path)


# --------------------------------------------------------------------------- saving


def test_save_model_writes_atomically(tmp_path, resnet_proto):
    target = tmp_path / "out" / "model.onnx"
    returned = save_model(resnet_proto, target)
    assert Path(returned) == target
    assert listing(tmp_path / "out") == {"model.onnx"}, "no temporary file is left behind"
    assert target.read_bytes() == resnet_proto.SerializeToString(deterministic=True)
    save_model(resnet_proto, target)  # overwriting is fine too
    assert listing(tmp_path / "out") == {"model.onnx"}


class _DiskFull:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_failed_save_keeps_the_previous_file(failure, tmp_path, resnet_proto, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous contents")
    if failure == "write":
        real_open = open
        monkeypatch.setattr(model_io, "open", lambda *a, **k: _DiskFull(real_open(*a, **k)), raising=False)
    else:
        def no_rename(src, dst):
            raise OSError(errno.EIO, "rename failed")

        monkeypatch.setattr(model_io.os, "replace", no_rename)
    with pytest.raises(graphprune.BadInputError, match="not enough disk space|rename failed"):
        save_model(resnet_proto, target)  # one line (exit 2 in the CLI), never a half-written file
    monkeypatch.undo()
    assert target.read_bytes() == b"previous contents"
    assert listing(tmp_path) == {"model.onnx"}, "the temporary file is removed"


def test_saved_file_follows_umask(tmp_path, resnet_proto):
    umask = os.umask(0)
    os.umask(umask)
    target = save_model(resnet_proto, tmp_path / "model.onnx")
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask


def test_save_model_with_external_data(tmp_path, resnet_proto):
    model = onnx.ModelProto()
    model.CopyFrom(resnet_proto)
    before = model.SerializeToString(deterministic=True)
    target = save_model(model, tmp_path / "out" / "model.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before, "the caller's model was modified"
    assert _pair(tmp_path / "out", "model.onnx")
    saved = onnx.load(str(target), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in _tensors(saved))
    assert all(not os.path.isabs(external_data_helper.ExternalDataInfo(t).location)
               for t in _tensors(saved) if external_data_helper.uses_external_data(t))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(target), x), _run(resnet_proto, x))


# --------------------------------------------------------------------------- weights in Constant nodes


def test_constant_node_weights_are_prunable():
    model = constant_weight_model()
    onnx.checker.check_model(model, full_check=True)
    analysis = graphprune.analyze(model)
    assert len(analysis.groups) == 1
    members = {(m.tensor, m.axis): m.role for m in analysis.groups[0].members}
    assert members[("w1", 0)] == "out"       # from the Constant node
    assert members[("b1", 0)] == "param"     # from ConstantOfShape(Constant)
    assert members[("w2", 1)] == "reduce"

    result = graphprune.prune(model, 0.5, round_to=1, verify=True)
    assert result.report["oracle"]["equivalent"]
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["w1"] == (8, 4, 3, 3) and shapes["b1"] == (8,) and shapes["w2"] == (8, 8, 3, 3)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert _run(result.model, x).shape == (2, 8, 8, 8)


def test_constant_node_model_is_left_intact_when_analysed():
    model = constant_weight_model()
    before = model.SerializeToString(deterministic=True)
    graphprune.analyze(model)
    assert model.SerializeToString(deterministic=True) == before
