"""Calibration data: .npz/.npy files, image folders, iterables, synthetic inputs, held-out split."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration import load_calibration, parse_preprocess, synthetic_calibration
from graphprune.errors import BadInputError
from tests._accuracy_models import conv_pair, mlp


def _mlp():
    return mlp(np.ones((4, 3), np.float32), np.ones((3, 2), np.float32))


def test_npz_npy_arrays_and_split(tmp_path):
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    np.savez(tmp_path / "c.npz", x=x)
    np.save(tmp_path / "c.npy", x)
    for src in (tmp_path / "c.npz", str(tmp_path / "c.npy"), x, {"x": x}):
        d = load_calibration(src, _mlp(), samples=30, batch_size=8)
        assert d.samples == 30 and d.heldout_samples == 10 and len(d.calib) == 4
        np.testing.assert_array_equal(d.heldout[0]["x"], x[30:38])
    d = load_calibration(x, _mlp(), samples=128)          # too few: 1/5 held out
    assert (d.samples, d.heldout_samples) == (32, 8) and d.notes
    d = load_calibration(x, _mlp(), samples=128, heldout=0)
    assert d.samples == 40 and d.heldout_samples == 40   # fidelity then uses the calibration samples


def test_bad_files_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "wrong.npz", a=np.ones((4, 4), np.float32), b=np.ones((4, 4), np.float32))
    with pytest.raises(BadInputError, match="no data for model input 'x'"):
        load_calibration(tmp_path / "wrong.npz", _mlp())
    with pytest.raises(BadInputError, match="expects"):
        load_calibration(np.ones((4, 5), np.float32), _mlp())
    with pytest.raises(BadInputError, match="no such file"):
        load_calibration(tmp_path / "missing.npz", _mlp())
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BadInputError, match="expected a .npz"):
        load_calibration(tmp_path / "x.txt", _mlp())


def test_image_folder_preprocessing(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for i, color in enumerate([(255, 0, 0), (0, 128, 255), (10, 20, 30)]):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"img{i}.png")
    model = conv_pair(np.ones((4, 3, 3, 3), np.float32), np.ones((2, 4, 3, 3), np.float32), size=16)
    pre = parse_preprocess("imagenet size=16")
    d = load_calibration(tmp_path, model, samples=2, preprocess=pre)
    (b,) = d.calib
    assert b["x"].shape == (2, 3, 16, 16)
    expect = (1.0 - 0.485) / 0.229                       # red channel of the first (pure red) image
    np.testing.assert_allclose(b["x"][0, 0], expect, rtol=1e-5)
    np.testing.assert_allclose(d.heldout[0]["x"][0, 2], (30 / 255 - 0.406) / 0.225, rtol=1e-5)
    raw = load_calibration(tmp_path, model, samples=3, preprocess="raw layout=nchw", heldout=0)
    assert raw.calib[0]["x"][0, 0, 0, 0] == 255.0
    with pytest.raises(BadInputError, match="unknown key"):
        parse_preprocess("bogus=1")
    with pytest.raises(BadInputError, match="unknown preset"):
        parse_preprocess("fancy")


def test_iterables_keep_their_batches():
    batches = [{"x": np.ones((n, 4), np.float32)} for n in (3, 5, 2, 4)]
    d = load_calibration(iter(batches), _mlp(), samples=8)
    assert [len(b["x"]) for b in d.calib] == [3, 5] and [len(b["x"]) for b in d.heldout] == [2, 4]
    d = load_calibration([np.ones((2, 4), np.float32)] * 3, _mlp(), samples=100)
    assert d.samples + d.heldout_samples == 6 and d.heldout
    d = load_calibration([(np.ones((2, 4), np.float32),)] * 2, _mlp(), samples=2)
    assert d.samples == 2 and d.heldout_samples == 2
    with pytest.raises(BadInputError):
        load_calibration(42, _mlp())


def test_synthetic_token_ids_stay_inside_the_embedding_table():
    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "emb")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])], [table])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    d = synthetic_calibration(model, samples=10, heldout=4, batch_size=4, seq=6)
    assert d.synthetic and d.samples == 10 and d.heldout_samples == 4
    ids = np.concatenate([b["ids"] for b in d.calib])
    assert ids.shape == (10, 6) and ids.min() >= 0 and ids.max() < 50 and ids.max() > 1
    assert all((b["mask"] == 1).all() for b in d.calib)
