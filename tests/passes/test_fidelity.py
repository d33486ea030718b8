"""Fidelity report: relative error, cosine, top-1 agreement; in the API report and the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.cli import main
from graphprune.fidelity import measure_fidelity
from tests._accuracy_models import mlp

pytest.importorskip("onnxruntime")


def _models(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 5)).astype(np.float32)
    return mlp(w1, w2, relu=True), w1, w2


def test_identical_and_perturbed_models():
    model, w1, w2 = _models()
    batches = [{"x": np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)}]
    same = measure_fidelity(model, model, batches)
    assert same["rel_err"] == 0 and same["cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    scaled = mlp(w1, 2 * w2, relu=True)                 # y doubles: cosine 1, rel err 1, argmax kept
    m = measure_fidelity(model, scaled, batches)
    assert m["rel_err"] == pytest.approx(1.0, rel=1e-5) and m["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    neg = measure_fidelity(model, mlp(w1, -w2, relu=True), batches)
    assert neg["cosine"] == pytest.approx(-1.0, abs=1e-6) and neg["rel_err"] == pytest.approx(2.0, rel=1e-5)


def test_prune_report_before_and_after_compensation():
    model, _, _ = _models(2)
    x = np.abs(np.random.default_rng(3).standard_normal((48, 6))).astype(np.float32)
    r = graphprune.prune(model, target_flops=0.6, round_to=1, calib=x, calib_samples=32, compensate="obs")
    fid = r.report["fidelity"]
    assert fid["heldout_samples"] == 16 and fid["data"] == "held-out calibration samples"
    before, after = fid["before_compensation"], fid["after_compensation"]
    assert after["rel_err"] <= before["rel_err"] and after["cosine"] >= before["cosine"] - 1e-9
    assert set(after) >= {"rel_err", "cosine", "top1_agreement", "outputs"}
    plain = graphprune.prune(model, target_flops=0.6, round_to=1)
    assert "fidelity" not in plain.report                       # off unless asked
    synth = graphprune.prune(model, target_flops=0.6, round_to=1, fidelity=True)
    assert synth.report["fidelity"]["data"] == "synthetic"


def test_cli_calib_compensate_and_report(tmp_path, capsys):
    model, _, _ = _models(4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((40, 6)).astype(np.float32))
    rc = main([str(path), "--target-flops", "0.6", "--round-to", "1", "--calib", str(tmp_path / "calib.npz"),
               "--calib-samples", "32", "--criterion", "wanda", "--compensate", "obs", "--verify",
               "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "out.onnx")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fidelity" in out and "->" in out and "oracle" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"]["samples"] == 32 and rep["calibration"]["heldout_samples"] == 8
    assert "after_compensation" in rep["fidelity"] and rep["compensation"]["mode"] == "obs"
    assert "calibration" not in json.dumps(rep.get("options", {}))
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--target-flops", "0.6", "--compensate", "magic"])
    assert exc.value.code == 2
    rc = main([str(path), "--target-flops", "0.6", "--calib-preprocess", "size=4"])
    assert rc == 2
    assert "--calib-preprocess needs --calib" in capsys.readouterr().err


def test_top5_agreement_counts_the_original_class_among_five():
    """Hand-made logits: the candidate ranks the original's class 1st, 3rd, 6th and 2nd."""
    from graphprune.fidelity import measure_fidelity

    ref = np.zeros((4, 8))
    ref[np.arange(4), [0, 1, 2, 3]] = 10.0                   # original top-1: classes 0, 1, 2, 3
    cand = np.tile(np.arange(8, dtype=np.float64)[::-1], (4, 1))   # class 0 highest, 7 lowest
    cand[1] = [7, 5, 6, 3, 4, 0, 1, 2]                         # class 1 third
    cand[2] = [7, 6, 0, 5, 4, 3, 2, 1]                         # class 2 lowest of 8 -> not in top-5
    cand[3] = [0, 1, 2, 6, 7, 3, 4, 5]                         # class 3 second
    m = measure_fidelity({"y": [ref]}, _const_model(cand), [{}])
    assert m["top1_agreement"] == 0.25 and m["top5_agreement"] == 0.75


def _const_model(values):
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array(values.astype(np.float32), "c")
    node = helper.make_node("Identity", ["c"], ["y"])
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, values.shape)], [c])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_metric_fits_each_output():
    """Two outputs of one model: a Softmax over a linear head (class scores: top-1 agreement)
    and a mean-pooled [batch, features] embedding (cosine, no top-1), each judged by its own
    metric; a rank-3 hidden state likewise gets cosine. The CLI line names kind and metric."""
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.cli import _fidelity_line

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),                       # [N, T, 8] hidden states
             helper.make_node("ReduceMean", ["h"], ["emb"], axes=[1], keepdims=0),  # [N, 8] embedding
             helper.make_node("Softmax", ["emb"], ["probs"], axis=-1)]             # [N, 8] class scores
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 6])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("probs", "emb", "h")],
                          [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    batches = [{"x": rng.standard_normal((12, 5, 6)).astype(np.float32)}]
    m = measure_fidelity(model, model, batches)["outputs"]
    assert (m["probs"]["kind"], m["probs"]["metric"]) == ("class scores", "top-1 agreement")
    assert "Softmax" in m["probs"]["why"] and m["probs"]["top1_agreement"] == 1.0
    assert (m["emb"]["kind"], m["emb"]["metric"]) == ("embedding", "cosine") and "top1_agreement" not in m["emb"]
    assert "ReduceMean" in m["emb"]["why"]
    assert (m["h"]["kind"], m["h"]["metric"]) == ("hidden states", "cosine") and "top1_agreement" not in m["h"]
    line = _fidelity_line({"heldout_samples": 12, "pruned": measure_fidelity(model, model, batches)})
    assert "emb: embedding (pooled or normalised features (ReduceMean)), judged by cosine" in line
    assert "probs: class scores (Softmax probabilities), judged by top-1 agreement" in line


def test_fidelity_line_lists_every_stage_in_order():
    """The CLI line follows the pipeline: uncompensated -> compensated -> recovered; a recovery that
    started from the shown model adds no stage, one that started elsewhere (compensation rejected by
    the guard) shows where it started; a rejected compensation says which model was written."""
    from graphprune.cli import _fidelity_line

    a, b, c = ({"cosine": v, "rel_err": 1 - v} for v in (0.7, 0.6, 0.8))
    line = _fidelity_line({"heldout_samples": 4, "before_compensation": a, "after_compensation": b,
                           "final": "before_compensation"})
    assert "cosine 0.7000 -> 0.6000" in line and line.endswith("(uncompensated -> compensated); the "
                                                               "uncompensated model was written")
    line = _fidelity_line({"heldout_samples": 4, "before_compensation": a, "after_compensation": c,
                           "before_recovery": dict(c), "after_recovery": {"cosine": 0.9, "rel_err": 0.1}})
    assert "cosine 0.7000 -> 0.8000 -> 0.9000" in line and "(uncompensated -> compensated -> recovered)" in line
    line = _fidelity_line({"heldout_samples": 4, "before_compensation": a, "after_compensation": b,
                           "before_recovery": dict(a), "after_recovery": c, "final": "after_recovery"})
    assert "cosine 0.7000 -> 0.6000 -> 0.7000 -> 0.8000" in line and "before recovery -> recovered" in line
    assert "->" not in _fidelity_line({"heldout_samples": 4, "pruned": a})
