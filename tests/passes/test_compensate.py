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


def _fold_fit(rng, make_rows, k, o, batches=8):
    fit = LayerFit(k, o, True)
    for b in range(batches):
        xk, t = make_rows(rng)
        fit.add(b % 2, xk, t)
    return fit


def test_cv_keeps_an_exact_reconstruction():
    """A removed feature that is a linear combination of kept ones: CV chooses (almost) no
    dampening and the fit is exact, as with GCV."""
    rng = np.random.default_rng(6)
    k, o = 6, 3
    w = rng.standard_normal((o, k + 1))

    def rows(r):
        x = r.standard_normal((40, k))
        removed = x[:, 0] - 0.5 * x[:, 2]
        return x, np.c_[x, removed] @ w.T

    fit = _fold_fit(rng, rows, k, o)
    res = fit_layer(fit, w[:, :k], "obs", select="cv")
    assert res["damp"] <= 1e-3
    assert res["error_after"] <= 1e-8 * res["target_energy"]


def test_cv_refuses_a_fit_that_does_not_generalise():
    """Per sample, the removed feature equals a sample-specific mix of the kept ones: every
    fold fits its own samples perfectly but the mix learnt on one fold is wrong on the other.
    GCV, which treats the rows as independent, trusts the fit; cross-validation over batches
    sees it fail on held-out samples and keeps the weights (bias re-fit only)."""
    rng = np.random.default_rng(7)
    k, o = 4, 2
    w = rng.standard_normal((o, k + 1))

    def rows(r):
        x = r.standard_normal((200, k))
        mix = 3.0 * r.standard_normal(k)             # one mix per batch (a "sample")
        return x, np.c_[x, x @ mix] @ w.T

    fit = _fold_fit(rng, rows, k, o, batches=16)      # one sample per batch, eight per fold
    gcv = fit_layer(fit, w[:, :k], "obs", select="gcv")
    cv = fit_layer(fit, w[:, :k], "obs", select="cv")
    assert gcv["damp"] <= 0.1                                  # rows look plentiful to GCV
    assert cv["damp"] == "bias only (cv)" or cv["damp"] >= 100 * max(gcv["damp"], 1e-4)
    assert np.abs(cv["weight"] - w[:, :k]).max() < 0.8 * np.abs(gcv["weight"] - w[:, :k]).max()
    # on a fresh sample the cross-validated choice is the better one
    fresh = _fold_fit(rng, rows, k, o, batches=16)
    A, B, s, t, tt, n = fresh.total()
    from graphprune.passes.compensate import _aug, _error

    Aa, Ba = _aug(A, B, s, t, n)

    def err(res):
        return _error(np.vstack([res["weight"].T, res["delta"][None, :]]), Aa, Ba, tt)

    assert err(cv) < err(gcv)


def _residual_model(rng):
    """y = d + b: b = relu(x wa) wb is the skip; d = relu(x wg + b wz) wd adds to it. Channel 0
    of the second hidden layer equals hidden channel 7 of the first (wg[:, 0] = wa[:, 7])."""
    from onnx import helper

    from tests._accuracy_models import _model

    ws = {"wa": rng.standard_normal((4, 8)), "wb": rng.standard_normal((8, 4)), "wg": rng.standard_normal((4, 6)),
          "wd": rng.standard_normal((6, 4)), "wz": 0.3 * rng.standard_normal((4, 6))}
    ws["wg"][:, 0] = ws["wa"][:, 7]
    ws["wz"][:, 0] = 0.0
    ws["wd"][5] *= 0.05
    def mm(i, w, o):
        return helper.make_node("MatMul", [i, w], [o], name=f"fc{w[1]}")

    nodes = [mm("x", "wa", "a0"), helper.make_node("Relu", ["a0"], ["a"], name="ra"), mm("a", "wb", "b"),
             mm("x", "wg", "g1"), mm("b", "wz", "g2"), helper.make_node("Add", ["g1", "g2"], ["g0"], name="gsum"),
             helper.make_node("Relu", ["g0"], ["g"], name="rg"), mm("g", "wd", "d"),
             helper.make_node("Add", ["d", "b"], ["y"], name="res")]
    return _model(nodes, ws, ["N", 4], ["N", 4])


def test_residual_compensation_absorbs_the_skip_error():
    """fcd feeds the residual Add whose other addend b carries the error of removing hidden
    channel 7 (fcb cannot fully re-create it). With compensate_residual, fcd is fitted to
    d + (b_orig − b_pruned), so the *sum* y is reconstructed: the exact least-squares fit
    (damp 0) gives a lower calibration error on y than fitting d alone; fcb, whose partner d
    is not upstream of it, is fitted as before."""
    import onnxruntime as ort

    rng = np.random.default_rng(8)
    model = _residual_model(rng)
    x = rng.standard_normal((96, 4)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x[:64]})[0]
    errs, layers = {}, {}
    for residual in (False, True):
        r = graphprune.prune(model, target_flops=0.86, criterion="test-last-lowest", round_to=1, calib=x,
                             calib_samples=64, compensate="obs", compensate_damp=0.0, compensate_residual=residual)
        assert [g["removed"] for g in r.report["groups"] if g["removed"]] == [[7], [5]]
        y = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": x[:64]})[0]
        errs[residual] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        layers[residual] = {entry["node"]: entry for entry in r.report["compensation"]["layers"]}
    assert errs[True] < 0.9 * errs[False]
    assert layers[True]["fcb"]["rel_err_after"] == pytest.approx(layers[False]["fcb"]["rel_err_after"])
    assert layers[True]["fcd"].get("residual") == "b" and "residual" not in layers[True]["fcb"]
