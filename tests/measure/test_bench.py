"""`graphprune bench` and the latency backends: structure of the results, backend selection and
fallback messages, bad input (one line, exit 2). No timing is asserted (speed is measured in
BENCHMARKS.md, not in tests); TensorRT and onnxruntime CUDA tests are skipped without them."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

try:
    from _latency_models import CONV_CHAIN_INPUT, conv_chain, save
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._latency_models import CONV_CHAIN_INPUT, conv_chain, save

import graphprune
from graphprune import backends
from graphprune.backends import BackendUnavailable, available_backends, select_backend
from graphprune.bench import bench_models, format_bench, main, parse_shape
from graphprune.errors import BadInputError

FAST = ["--runs", "3", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    original = save(conv_chain(), d / "model.onnx")
    pruned = graphprune.prune(original, target_flops=0.5).save(d / "model.pruned.onnx")
    return original, pruned


@pytest.fixture
def no_gpu(monkeypatch):
    """Make TensorRT and onnxruntime CUDA unavailable, whatever the machine has."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError

    def no_cuda(self):
        raise BackendUnavailable("no CUDAExecutionProvider (test)")

    monkeypatch.setattr(backends.OrtCudaBackend, "check", no_cuda)

    def no_torch_cuda(self):
        raise BackendUnavailable("PyTorch sees no CUDA device (test)")

    monkeypatch.setattr(backends.TorchCudaBackend, "check", no_torch_cuda)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


# --------------------------------------------------------------------------- results


def test_bench_models_structure(models):
    original, pruned = models
    res = bench_models([original, pruned], backend="ort-cpu", runs=4, warmup=1, threads=1)
    assert res["backend"] == "ort-cpu" and "onnxruntime" in res["backend_label"] and res["note"] == ""
    assert [r["model"] for r in res["models"]] == [original, pruned]
    for row in res["models"]:
        assert row["runs"] == 4 and row["inputs"] == {CONV_CHAIN_INPUT: [1, 3, 16, 16]}
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["spread"] >= 0 and row["throughput"] > 0
        assert row["speedup"] == pytest.approx(1 / row["ratio"])
    assert res["models"][0]["ratio"] == 1.0
    text = format_bench(res)
    assert "onnxruntime" in text and "median ms" in text and ("faster" in text or "slower" in text)


def test_batch_and_shape(models):
    original, _ = models
    res = bench_models([original], backend="ort-cpu", runs=2, warmup=0, batch=4)
    assert res["models"][0]["inputs"][CONV_CHAIN_INPUT] == [4, 3, 16, 16] and res["batch"] == 4
    res = bench_models([original], backend="ort-cpu", runs=2, warmup=0, shapes={CONV_CHAIN_INPUT: (2, 3, 16, 16)})
    assert res["models"][0]["inputs"][CONV_CHAIN_INPUT] == [2, 3, 16, 16]


def test_models_as_protos():
    res = bench_models([conv_chain(), conv_chain(width=16)], backend="ort-cpu", runs=2, warmup=0,
                       labels=["wide", "narrow"])
    assert [r["model"] for r in res["models"]] == ["wide", "narrow"]


def test_cli_table_and_json(models, tmp_path, capsys):
    original, pruned = models
    out = tmp_path / "bench.json"
    assert main([original, pruned, "--backend", "ort-cpu", "--json", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "backend  onnxruntime" in captured.out and pruned in captured.out
    assert captured.err == ""
    data = json.loads(out.read_text())
    assert data["backend"] == "ort-cpu" and len(data["models"]) == 2
    assert {"median_ms", "p10_ms", "p90_ms", "spread", "throughput", "ratio"} <= set(data["models"][1])


def test_cli_dispatch(models, capsys):
    original, _ = models
    from graphprune.cli import main as cli_main

    assert cli_main(["bench", original, "--backend", "ort-cpu", *FAST]) == 0
    assert "onnxruntime" in capsys.readouterr().out


# --------------------------------------------------------------------------- backends


def test_cpu_backend_has_no_note():
    bk = select_backend("ort-cpu", threads=2)
    assert bk.name == "ort-cpu" and bk.note == "" and "2 threads" in bk.label


@pytest.mark.parametrize("requested", ["auto", "trt"])
def test_fallback_to_cpu(no_gpu, requested):
    bk = select_backend(requested)
    assert bk.name == "ort-cpu"
    assert "TensorRT unavailable" in bk.note and "onnxruntime CUDA unavailable" in bk.note
    assert "PyTorch CUDA unavailable" in bk.note
    assert bk.note.endswith("using onnxruntime CPU") and "\n" not in bk.note


def test_fallback_from_ort_cuda(no_gpu):
    bk = select_backend("ort-cuda")
    assert bk.name == "ort-cpu" and "TensorRT" not in bk.note and "onnxruntime CUDA unavailable" in bk.note


def test_cli_says_which_backend_ran(no_gpu, models, capsys):
    original, _ = models
    assert main([original, "--backend", "trt", "--fp16", *FAST]) == 0
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert "TensorRT unavailable" in line and "using onnxruntime CPU" in line and "--fp16" in line
    assert "backend  onnxruntime" in captured.out


def test_available_backends_reports_reasons(no_gpu):
    status = available_backends()
    assert status["ort-cpu"] == "ok"
    assert "tensorrt" in status["trt"] and status["ort-cuda"] != "ok"


def _has_trt() -> str | None:
    """None when TensorRT runs here, else why not."""
    status = available_backends()["trt"]
    return None if status == "ok" else status


def _has_ort_cuda() -> str | None:
    status = available_backends()["ort-cuda"]
    return None if status == "ok" else status


@pytest.mark.skipif(_has_trt() is not None, reason=f"TensorRT cannot run here: {_has_trt()}")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_runs(models, fp16):
    original, pruned = models
    res = bench_models([original, pruned], backend="trt", runs=5, warmup=2, batch=2, fp16=fp16)
    assert res["backend"] == "trt" and "TensorRT" in res["backend_label"]
    _assert_matches_onnxruntime("trt", original, fp16)


def _assert_matches_onnxruntime(backend: str, model: str, fp16: bool) -> None:
    """The backend's outputs for `model` at batch 2 equal onnxruntime CPU's (fp16: to fp16 accuracy)."""
    from graphprune.bench import feeds_for
    from graphprune.runtime import run_model

    feeds = feeds_for(model, batch=2)
    sess = select_backend(backend, fp16=fp16).load(model, feeds)
    try:
        got = sess.run()[0]
    finally:
        sess.close()
    want = run_model(model, feeds)[0]
    tol = 3e-2 if fp16 else 1e-3
    assert np.allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.skipif(_has_ort_cuda() is not None, reason=f"onnxruntime CUDA cannot run here: {_has_ort_cuda()}")
def test_ort_cuda_runs(models):
    original, pruned = models
    res = bench_models([original, pruned], backend="ort-cuda", runs=5, warmup=2)
    assert res["backend"] == "ort-cuda" and res["note"] == ""


# --------------------------------------------------------------------------- bad input


def test_parse_shape():
    assert parse_shape("input:1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape("ns:input:2X8") == ("ns:input", (2, 8))
    for bad in ("input", "input:", ":1x2", "input:1xa", "input:0x3"):
        with pytest.raises(BadInputError):
            parse_shape(bad)


@pytest.fixture(scope="module")
def static_batch(tmp_path_factory):
    model = conv_chain()
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    return save(model, tmp_path_factory.mktemp("static") / "static.onnx")


@pytest.mark.parametrize("args, needle", [
    (["missing.onnx"], "no such file"),
    (["{bad}"], "not an ONNX model"),
    (["{model}", "--shape", "nope:1x3x16x16"], "not an input"),
    (["{model}", "--shape", "x:1x3x16"], "rank"),
    (["{model}", "--shape", "x:1x3x32x32"], "static size"),
    (["{model}", "--shape", "x1x3"], "NAME:DxDx"),
    (["{model}", "--runs", "0"], "--runs"),
    (["{model}", "--backend", "tpu"], "--backend"),
    (["{static}", "--batch", "4"], "--batch"),
    (["{model}", "--json", "{dir}"], "directory"),
])
def test_bad_input(models, static_batch, tmp_path, capsys, args, needle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    subs = {"{model}": models[0], "{bad}": str(bad), "{static}": static_batch, "{dir}": str(tmp_path)}
    argv = [subs.get(a, a) for a in args] + FAST
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("graphprune: error:") and needle in line


def test_bad_input_from_python(models):
    with pytest.raises(BadInputError):
        bench_models([], backend="ort-cpu")
    with pytest.raises(BadInputError):
        bench_models([models[0]], backend="nope")
    with pytest.raises(BadInputError):
        bench_models([models[0]], backend="ort-cpu", runs=0)


def test_unloadable_model_is_bad_input(tmp_path, capsys):
    model = conv_chain()
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    assert main([str(path), "--backend", "ort-cpu", *FAST]) == 2
    assert "cannot load" in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- PyTorch CUDA (onnx2torch)


def _has_onnx2torch() -> str | None:
    try:
        backends._import_torch_cuda("cpu")
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _has_torch_cuda() -> str | None:
    status = available_backends()["torch-cuda"]
    return None if status == "ok" else status


def _flatten_identity_model() -> onnx.ModelProto:
    """onnx2torch pitfalls in one graph: a Conv bias that is an Identity of an initializer
    (TorchScript shares equal weights so), Flatten with axis == rank (output [N*C*H*W, 1]),
    a Dropout (no converter for old versions) and GreaterOrEqual-16 (only -12 is registered)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[M, 1] y, bool[N, 4, 8, 8] z) {
        b2 = Identity (b1)
        a0 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        a = Dropout (a0)
        c = Conv <pads = [1, 1, 1, 1]> (a, w2, b2)
        y = Flatten <axis = 4> (c)
        zero = Constant <value = float {0.0}> ()
        z = GreaterOrEqual (c, zero)
    }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (4, 4, 3, 3))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32),
                                                                    name))
    return model


def test_onnx2torch_rewrites_keep_the_function():
    """The graph handed to onnx2torch computes what the original does (checked with onnxruntime)."""
    from graphprune.runtime import run_model

    model = _flatten_identity_model()
    fixed = backends._for_onnx2torch(model)
    assert not any(n.op_type in ("Flatten", "Dropout") for n in fixed.graph.node)
    assert not any(n.op_type == "Identity" and n.input[0] == "b1" for n in fixed.graph.node)
    assert any(n.op_type == "Identity" for n in model.graph.node)  # the caller's proto is not modified
    onnx.checker.check_model(fixed, full_check=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for want, got in zip(run_model(model, feeds), run_model(fixed, feeds)):
        np.testing.assert_array_equal(want, got)


@pytest.mark.skipif(_has_onnx2torch() is not None, reason=f"onnx2torch cannot run here: {_has_onnx2torch()}")
def test_torch_backend_matches_onnxruntime(models, tmp_path):
    """The onnx2torch session (on the CPU here; the same code path as on a GPU) gives onnxruntime's
    outputs for the original and the pruned model, and for the graph with onnx2torch's pitfalls."""
    from graphprune.bench import feeds_for
    from graphprune.runtime import run_model

    bk = backends.TorchCudaBackend(torch_device="cpu")
    tricky = save(_flatten_identity_model(), tmp_path / "tricky.onnx")
    for path in (*models, tricky):
        feeds = feeds_for(path, batch=2)
        sess = bk.load(path, feeds)
        try:
            got = sess.run()
            assert sess.time(3).shape == (3,)
        finally:
            sess.close()
        want = run_model(path, feeds)
        for w, g in zip(want, got):
            assert w.shape == g.shape
            if w.dtype == bool:
                assert g.dtype == bool and (g == w).mean() > 0.999  # ties at exactly 0 are measure-zero
            else:
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))
    assert "onnx2torch" in bk.label and "fp32" in bk.label


@pytest.mark.skipif(_has_onnx2torch() is not None, reason=f"onnx2torch cannot run here: {_has_onnx2torch()}")
def test_torch_backend_names_an_op_it_cannot_convert(tmp_path):
    """ReduceMean-18 changed its signature (axes became an input): no alias, a one-line error naming it."""
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[N, 4] x) => (float[N, 1] y) {
        axes = Constant <value = int64[1] {1}> ()
        y = ReduceMean (x, axes)
    }
    """
    path = save(onnx.parser.parse_model(text), tmp_path / "reduce18.onnx")
    with pytest.raises(BadInputError, match="ReduceMean") as info:
        backends.TorchCudaBackend(torch_device="cpu").load(path, {"x": np.ones((2, 4), np.float32)})
    assert "\n" not in str(info.value)


@pytest.mark.skipif(_has_torch_cuda() is not None, reason=f"PyTorch CUDA cannot run here: {_has_torch_cuda()}")
@pytest.mark.parametrize("fp16", [False, True])
def test_torch_cuda_runs(models, fp16):
    original, pruned = models
    res = bench_models([original, pruned], backend="torch-cuda", runs=5, warmup=2, batch=2, fp16=fp16)
    assert res["backend"] == "torch-cuda" and "CUDA graph" in res["backend_label"]
    assert ("fp16" in res["backend_label"]) == fp16
    _assert_matches_onnxruntime("torch-cuda", original, fp16)
