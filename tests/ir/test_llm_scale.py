"""Models of any size: the streamed code paths, forced on a small LLaMA-style decoder.

The decoder (models/llm_scale.py, torch's dynamo exporter) keeps its weights in three data
files; $GRAPHPRUNE_BIG_MODEL_BYTES (or graphprune.external_data.BIG_MODEL_BYTES) is lowered
so this 0.4 MB model takes the paths a 4 GB one takes: memory-mapped weights, rewritten
weights spilled to scratch files, the oracle run one model at a time, a streamed save.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper

import graphprune
import graphprune.external_data as external_data
import graphprune.model_io as model_io
from graphprune.runtime import synthetic_inputs

pytest.importorskip("torch")

TINY_THRESHOLD = "1024"  # bytes: every weight of the test model counts as "big"


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> Path:
    from models.llm_scale import PRESETS, export_llm

    folder = tmp_path_factory.mktemp("llm") / "model"
    export_llm(PRESETS["tiny"], folder, files=3)
    return folder


@pytest.fixture
def llm(llm_folder, tmp_path) -> Path:
    """A private copy of the exported decoder (graph + 3 data files)."""
    folder = tmp_path / "in"
    shutil.copytree(llm_folder, folder)
    return folder / "model.onnx"


@pytest.fixture
def big(monkeypatch):
    monkeypatch.setenv(external_data.BIG_MODEL_ENV, TINY_THRESHOLD)


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink()}


def _cli(*args, cwd=None, env_extra=None):
    env = dict(os.environ, **{external_data.BIG_MODEL_ENV: TINY_THRESHOLD}, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def _run(path_or_proto, feeds):
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_export_spreads_weights_over_files(llm):
    model = onnx.load(str(llm), load_external_data=False)
    files = {external_data_helper.ExternalDataInfo(t).location for t in model.graph.initializer
             if external_data_helper.uses_external_data(t)}
    assert files == {"weights-0.bin", "weights-1.bin", "weights-2.bin"}
    onnx.checker.check_model(str(llm), full_check=True)


def test_cli_prunes_big_model_paths(llm, tmp_path):
    before = _digests(llm.parent)
    out = tmp_path / "out" / "pruned.onnx"
    report = tmp_path / "r.json"
    r = _cli(llm, "--target-flops", "0.5", "--verify", "-o", out, "--report", report)
    assert r.returncode == 0, r.stderr
    import json

    rep = json.loads(report.read_text())
    oracle = rep["oracle"]
    assert oracle["equivalent"] and "at_scale" in oracle, oracle  # the one-model-at-a-time oracle ran
    assert oracle["batch1"]["max_rel"] <= 1e-4
    assert 0.48 <= rep["macs_ratio"] <= 0.5
    assert _digests(llm.parent) == before, "the input files were modified"
    onnx.checker.check_model(str(out), full_check=True)
    names = set(os.listdir(out.parent))
    data = names - {"pruned.onnx"}
    assert len(data) == 1 and re.fullmatch(r"pruned\.onnx\.[0-9a-f]{8}\.data", data.pop()), names
    feeds = synthetic_inputs(onnx.load(str(out), load_external_data=False), batch=2, seq=5)
    (logits,) = _run(str(out), feeds)
    assert logits.shape == (2, 5, 256) and np.isfinite(logits).all()


def test_api_streams_and_matches_in_memory_result(llm, monkeypatch, tmp_path):
    """The big-model result is a graph of references (nothing serialized whole) with the same
    weights as the in-memory result, and it passes the oracle and the checker (on its path)."""
    small = graphprune.prune(str(llm), 0.5)
    monkeypatch.setattr(external_data, "BIG_MODEL_BYTES", int(TINY_THRESHOLD))
    result = graphprune.prune(str(llm), 0.5, verify=True)
    assert result.report["oracle"]["equivalent"], result.report["oracle"]
    assert [g["removed"] for g in result.report["groups"]] == [g["removed"] for g in small.report["groups"]]
    inline = [t.name for t in result.model.graph.initializer if len(t.raw_data) > int(TINY_THRESHOLD)]
    assert not inline, f"big weights held in memory: {inline[:3]}"
    assert any(external_data_helper.uses_external_data(t) for t in result.model.graph.initializer)
    model_io.check_model(result.model)  # in memory: weights declared, none serialized
    out = result.save(tmp_path / "p.onnx")
    onnx.checker.check_model(out, full_check=True)
    feeds = synthetic_inputs(small.model, batch=1, seq=6)
    np.testing.assert_allclose(_run(out, feeds)[0], _run(small.model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_weights_are_mapped_not_copied(llm, big):
    model = graphprune.graph.Model.load(str(llm))
    consts = [t for t in model.graph.tensors().values()
              if hasattr(t, "_values") and isinstance(t._values, graphprune.graph._ExternalValues)]
    assert consts
    v = consts[0].values
    assert isinstance(v, np.memmap) and not v.flags.writeable
    assert isinstance(consts[0]._values, graphprune.graph._ExternalValues), "the mapped values were cached"


# --------------------------------------------------------------------------- bad external data


def _first_external(path: Path) -> tuple[onnx.ModelProto, onnx.TensorProto]:
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if external_data_helper.uses_external_data(t))
    return model, t


def _set(t: onnx.TensorProto, **kv) -> None:
    for e in t.external_data:
        if e.key in kv:
            e.value = str(kv.pop(e.key))
    for k, v in kv.items():
        e = t.external_data.add()
        e.key, e.value = k, str(v)


def _escape(llm):
    model, t = _first_external(llm)
    outside = llm.parent.parent / "outside.bin"
    shutil.copy(llm.parent / external_data_helper.ExternalDataInfo(t).location, outside)
    _set(t, location="../outside.bin")
    return model


def _symlink(llm):
    model, t = _first_external(llm)
    (llm.parent / "link.bin").symlink_to(llm.parent / external_data_helper.ExternalDataInfo(t).location)
    _set(t, location="link.bin")
    return model


def _directory(llm):
    model, t = _first_external(llm)
    (llm.parent / "dir.bin").mkdir()
    _set(t, location="dir.bin")
    return model


def _truncated(llm):
    model, t = _first_external(llm)
    f = llm.parent / external_data_helper.ExternalDataInfo(t).location
    info = external_data_helper.ExternalDataInfo(t)
    with open(f, "r+b") as fh:
        fh.truncate(info.offset + info.length - 1)
    return model


def _offset_past_end(llm):
    model, t = _first_external(llm)
    _set(t, offset=10**9)
    return model


def _wrong_length(llm):
    model, t = _first_external(llm)
    _set(t, length=external_data_helper.ExternalDataInfo(t).length - 4)
    return model


def _missing(llm):
    model, t = _first_external(llm)
    (llm.parent / external_data_helper.ExternalDataInfo(t).location).unlink()
    return model


def _raw_wrong_length(llm):
    model = onnx.load(str(llm), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 8)
    t.raw_data = t.raw_data[:-4]
    return model


BAD = {"escapes the folder": (_escape, "outside the model's folder"), "symlink": (_symlink, "symbolic link"),
       "directory": (_directory, "directory"), "too short": (_truncated, "too short"),
       "offset past end": (_offset_past_end, "past the end"), "length mismatch": (_wrong_length, "need"),
       "missing": (_missing, "missing"), "raw data length": (_raw_wrong_length, "raw data")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_external_data_is_one_line_exit_2(case, llm, tmp_path):
    make, words = BAD[case]
    model = make(llm)
    llm.write_bytes(model.SerializeToString())
    before = _digests(llm.parent)
    out = tmp_path / "out"
    r = _cli(llm, "--target-flops", "0.5", "-o", out / "p.onnx")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not out.exists(), "something was written"
    assert _digests(llm.parent) == before


def test_constant_node_data_read_from_model_folder(tmp_path, monkeypatch):
    """A Constant node's external data is the model folder's file, whatever the current folder."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "c.bin").write_bytes(w1.tobytes())
    value = onnx.TensorProto()
    value.name, value.data_type = "w1", onnx.TensorProto.FLOAT
    value.dims.extend(w1.shape)
    value.data_location = onnx.TensorProto.EXTERNAL
    _set(value, location="c.bin", offset=0, length=w1.nbytes)
    nodes = [onnx.helper.make_node("Constant", [], ["w1"], value=value),
             onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["r"]),
             onnx.helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8])],
        [onnx.numpy_helper.from_array(w2, "w2")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    decoy = tmp_path / "elsewhere"
    decoy.mkdir()
    (decoy / "c.bin").write_bytes(np.ones_like(w1).tobytes())
    monkeypatch.chdir(decoy)
    result = graphprune.prune(str(folder / "model.onnx"), target_params=0.6, round_to=1)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    kept = [g for g in result.report["groups"]][0]
    keep = np.setdiff1d(np.arange(32), kept["removed"])
    want = np.maximum(x @ w1[:, keep], 0) @ w2[keep]
    np.testing.assert_allclose(_run(result.model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- saving


def test_no_disk_space_is_one_line_and_nothing_written(llm, tmp_path, monkeypatch, big):
    result = graphprune.prune(str(llm), 0.5)
    monkeypatch.setattr(model_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    out = tmp_path / "out"
    with pytest.raises(graphprune.BadInputError, match="not enough disk space"):
        result.save(out / "p.onnx")
    assert not out.exists() or not os.listdir(out)


def test_memory_error_is_exit_2(llm, tmp_path, monkeypatch, capsys):
    from graphprune import cli
    from graphprune.passes import ScorePass

    def boom(self, ctx):
        raise MemoryError()

    monkeypatch.setattr(ScorePass, "call", boom)
    out = tmp_path / "p.onnx"
    assert cli.main([str(llm), "--target-flops", "0.5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]
    assert not out.exists()


def test_resave_leaves_one_data_file(llm, tmp_path, big):
    result = graphprune.prune(str(llm), 0.5)
    out = tmp_path / "o" / "p.onnx"
    for _ in range(3):
        result.save(out)
    assert len([n for n in os.listdir(out.parent) if n.endswith(".data")]) == 1
    onnx.checker.check_model(str(out), full_check=True)


def test_single_file_save_removes_the_old_data_file(llm, tmp_path, monkeypatch):
    out = tmp_path / "o" / "p.onnx"
    monkeypatch.setenv(external_data.BIG_MODEL_ENV, TINY_THRESHOLD)
    graphprune.prune(str(llm), 0.5).save(out)
    assert any(n.endswith(".data") for n in os.listdir(out.parent))
    monkeypatch.delenv(external_data.BIG_MODEL_ENV)
    model_io.save_model(graphprune.prune(str(llm), 0.5).model, out, external_data=False)
    assert os.listdir(out.parent) == ["p.onnx"]
    onnx.checker.check_model(str(out), full_check=True)


def test_concurrent_saves_never_mix_graph_and_data(llm, tmp_path, big):
    """Two results written to one output at once: every graph a reader finds names a data file
    that exists and belongs to it (the weights of one run, never the other's)."""
    a = graphprune.prune(str(llm), 0.5)
    b = graphprune.prune(str(llm), 0.7)
    feeds = synthetic_inputs(a.model, batch=1, seq=4)
    out = tmp_path / "o" / "p.onnx"
    errors = []

    def writer(result):
        try:
            for _ in range(6):
                result.save(out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        try:
            model = onnx.load(str(out), load_external_data=False)
        except Exception:
            continue  # not written yet
        locs = {external_data_helper.ExternalDataInfo(t).location for t in model.graph.initializer
                if external_data_helper.uses_external_data(t)}
        assert len(locs) == 1
        seen += 1
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen
    final = _run(str(out), feeds)[0]
    ref_a = _run(str(a.save(tmp_path / "a.onnx")), feeds)[0]
    ref_b = _run(str(b.save(tmp_path / "b.onnx")), feeds)[0]
    assert final.shape == ref_a.shape and (np.array_equal(final, ref_a) or np.array_equal(final, ref_b))


@pytest.mark.parametrize("criterion", ["wanda", "obs"])
def test_calibrated_criteria_at_scale_match_in_memory(llm, monkeypatch, criterion):
    """Activation statistics and Hessians of a big model come from onnxruntime sessions over one
    scratch copy of its weights: the same scores, so the same channels, as in memory; the
    copy is gone when the prune returns."""
    small = graphprune.prune(str(llm), 0.5, criterion=criterion)
    monkeypatch.setattr(external_data, "BIG_MODEL_BYTES", int(TINY_THRESHOLD))
    seen = []
    real = model_io._RunCopies.graph_path

    def spy(self, model):
        path = real(self, model)
        seen.append(Path(path))
        return path

    monkeypatch.setattr(model_io._RunCopies, "graph_path", spy)
    result = graphprune.prune(str(llm), 0.5, criterion=criterion, verify=True)
    assert seen, "no session ran over the scratch copy"
    assert result.report["oracle"]["equivalent"]
    assert [g["removed"] for g in result.report["groups"]] == [g["removed"] for g in small.report["groups"]]
    assert not any(p.parent.exists() for p in seen), "the scratch copy was left behind"
