"""Compensation: exact where it must be, never worse on the calibration set, oracle intact."""
from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.passes.compensate import LayerFit, fit_layer
from tests._accuracy_models import conv_pair, mlp

pytest.importorskip("onnxruntime")


@graphprune.register_criterion("test-last-lowest")
def _last_lowest(group, sctx):
    """Ranks the last channel of every group lowest (so tests choose what is removed)."""
    return np.arange(group.size, 0, -1, dtype=np.float64)


def _dependent_mlp(rng):
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[:, 5] = w1[:, 0] + 2.0 * w1[:, 1]            # hidden channel 5 = h0 + 2 h1, exactly
    w2 = rng.standard_normal((6, 4)).astype(np.float32)
    return mlp(w1, w2)


def test_removed_linear_combination_is_reconstructed_exactly():
    rng = np.random.default_rng(0)
    model = _dependent_mlp(rng)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    kw = dict(target_flops=0.84, criterion="test-last-lowest", round_to=1, calib=x, calib_heldout=16)
    plain = graphprune.prune(model, compensate="none", **kw)
    assert plain.report["groups"][0]["removed"] == [5]
    assert plain.report["fidelity"]["pruned"]["rel_err"] > 0.1
    comp = graphprune.prune(model, compensate="obs", verify=True, **kw)
    assert comp.report["oracle"]["equivalent"]          # the oracle runs before compensation
    fid = comp.report["fidelity"]
    assert fid["before_compensation"]["rel_err"] > 0.1
    assert fid["after_compensation"]["rel_err"] < 1e-4
    (layer,) = comp.report["compensation"]["layers"]
    assert layer["rel_err_after"] < 1e-3 and layer["removed_inputs"] == 1


def test_conv_channel_combination_reconstructed_through_im2col():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[7] = 0.5 * w1[2] - w1[4]                          # channel 7 = 0.5 c2 - c4 at every position
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    r = graphprune.prune(conv_pair(w1, w2), target_flops=0.9, criterion="test-last-lowest", round_to=1,
                         calib=x, calib_heldout=8, compensate="obs")
    assert r.report["groups"][0]["removed"] == [7]
    assert r.report["fidelity"]["after_compensation"]["rel_err"] < 1e-4
    assert r.report["fidelity"]["before_compensation"]["rel_err"] > 0.1


@pytest.mark.parametrize("mode", ["bias", "obs"])
def test_never_increases_layer_error(mode):
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((6, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 16)).astype(np.float32)
    w3 = rng.standard_normal((16, 3)).astype(np.float32)
    from onnx import helper

    model = mlp(w1, w2, relu=True)                        # x @ w1 -> relu -> @ w2 (y: 16 wide)
    x = rng.standard_normal((40, 6)).astype(np.float32) + 0.5
    r = graphprune.prune(model, target_flops=0.5, criterion="l1", round_to=1, calib=x, compensate=mode)
    for layer in r.report["compensation"]["layers"]:
        if "rel_err_after" in layer:
            assert layer["rel_err_after"] <= layer["rel_err_before"] + 1e-6
    fid = r.report["fidelity"]
    assert fid["after_compensation"]["rel_err"] <= fid["before_compensation"]["rel_err"] + 1e-6
    del w3, helper


@pytest.mark.parametrize("damp", [None, 0.0, 1e-3, 1.0, 100.0])
def test_fit_never_worse_than_uncompensated(damp):
    rng = np.random.default_rng(3)
    k, f, o = 5, 9, 4
    fit = LayerFit(k, o, True)
    w = rng.standard_normal((o, f))
    for fold in (0, 1, 0, 1):
        x = rng.standard_normal((30, f))
        x[:, 3] = x[:, 0] * 0.3 + 0.1 * rng.standard_normal(30)   # correlated features
        fit.add(fold, x[:, :k], x @ w.T)
    res = fit_layer(fit, w[:, :k], "obs", damp)
    assert res["error_after"] <= res["error_before"] * (1 + 1e-9)
    bias = fit_layer(fit, w[:, :k], "bias")
    assert bias["error_after"] <= bias["error_before"] * (1 + 1e-9)


def test_matmul_without_bias_gets_one_and_conv_bias_created():
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((5, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    x = np.abs(rng.standard_normal((32, 5)).astype(np.float32))
    r = graphprune.prune(mlp(w1, w2, relu=True), target_flops=0.6, round_to=1, calib=x, compensate="bias")
    ops = [n.op_type for n in r.model.graph.node]
    assert ops.count("Add") == 1 and r.report["compensation"]["layers"][0]["bias"] == "new Add"
    w1c = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2c = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    xc = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    rc = graphprune.prune(conv_pair(w1c, w2c, relu=True), target_flops=0.6, round_to=1, calib=xc,
                          compensate="bias")
    conv2 = [n for n in rc.model.graph.node if n.name == "conv2"][0]
    assert len(conv2.input) == 3


def test_sequential_and_data_free():
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((6, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 16)).astype(np.float32)
    model = mlp(w1, w2, relu=True)
    r = graphprune.prune(model, target_flops=0.5, round_to=1, compensate="obs")   # no calib: synthetic
    assert r.report["compensation"]["data"]["synthetic"]
    assert any("synthetic" in w for w in r.report.get("warnings", []))
    r2 = graphprune.prune(model, target_flops=0.5, round_to=1, compensate="obs", compensate_sequential=False)
    assert r2.report["compensation"]["sequential"] is False


def test_bad_mode_rejected():
    with pytest.raises(graphprune.BadInputError):
        graphprune.prune(mlp(np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)), target_flops=0.5,
                         compensate="magic")
