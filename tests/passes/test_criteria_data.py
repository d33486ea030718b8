"""Data-aware criteria on hand-made cases with known answers; bounded statistics memory."""
from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.passes.criteria_data import FLAP_OFFSET, OBS_DAMP
from tests._accuracy_models import bn_model, mlp, wide_conv

pytest.importorskip("onnxruntime")


class _Keep(graphprune.Pass):
    name = "keep-scores"

    def call(self, ctx):
        ctx.report["scores"] = {g.id: ctx.scores[g.id].copy() for g in ctx.groups}
        ctx.report["sctx_passes"] = ctx.report.get("passes", {}).get("score", {})
        return graphprune.PassResult()


def _scores(model, criterion, **kw):
    pipeline = graphprune.default_pipeline()
    pipeline.insert_after("score", _Keep())
    r = graphprune.prune(model, target_flops=0.9, criterion=criterion, round_to=1, pipeline=pipeline,
                         fidelity=False, **kw)
    assert len(r.report["scores"]) == 1
    return r.report["scores"][0], r


def _data(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 5)).astype(np.float32)
    w2 = rng.standard_normal((5, 3)).astype(np.float32)
    x = (rng.standard_normal((48, 4)) * np.array([1, 2, 0.5, 3])).astype(np.float32)
    return w1, w2, x, x @ w1


def test_wanda_is_column_norm_times_activation_norm():
    w1, w2, x, h = _data()
    s, _ = _scores(mlp(w1, w2), "wanda", calib=x, calib_heldout=0)
    expect = np.linalg.norm(w2, axis=1) * np.linalg.norm(h.astype(np.float64), axis=0)
    np.testing.assert_allclose(s, expect, rtol=1e-4)


def test_flap_is_standardised_fluctuation():
    w1, w2, x, h = _data(1)
    s, _ = _scores(mlp(w1, w2), "flap", calib=x, calib_heldout=0)
    f = h.astype(np.float64).var(0) * (w2.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(s - FLAP_OFFSET, (f - f.mean()) / f.std(), atol=1e-4)


def test_obs_matches_closed_form_and_sees_duplicates():
    w1, w2, x, _ = _data(2)
    w1[:, 4] = w1[:, 1]                      # channel 4 duplicates channel 1: removable for free
    w2[4] *= 2                                # ... even with larger weights than channel 1
    h = (x @ w1).astype(np.float64)
    s, _ = _scores(mlp(w1, w2), "obs", calib=x, calib_heldout=0)
    H = h.T @ h / h.shape[0]
    H += OBS_DAMP * np.mean(np.diag(H)) * np.eye(5)
    hinv = np.linalg.inv(H)
    expect = (w2.astype(np.float64) ** 2).sum(1) / np.diag(hinv)
    np.testing.assert_allclose(s, expect, rtol=2e-3)
    assert set(np.argsort(s)[:2]) == {1, 4} and s[4] < 0.5 * np.delete(s, [1, 4]).min()
    l1, _ = _scores(mlp(w1, w2), "l1")
    assert l1[4] > l1[1]                      # magnitude prefers it over the channel it copies


def test_bn_scale_uses_gamma_or_folded_rows():
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((2, 6, 1, 1)).astype(np.float32)
    gamma = np.array([0.5, -3.0, 0.1, 2.0, -0.2, 1.0], np.float32)
    s, _ = _scores(bn_model(w1, gamma, w2), "bn-scale")
    np.testing.assert_allclose(s, np.abs(gamma), rtol=1e-6)
    w1m, w2m = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    s2, _ = _scores(mlp(w1m, w2m), "bn-scale")   # no scale parameters: producer-row norms
    np.testing.assert_allclose(s2, np.linalg.norm(w1m, axis=0), rtol=1e-6)


def test_data_free_criteria_need_no_calibration():
    w1, w2, _, _ = _data(4)
    s, r = _scores(mlp(w1, w2), "obs-free")
    assert s.shape == (5,) and np.all(np.isfinite(s)) and np.all(s >= 0)
    assert not any("synthetic" in w for w in r.report.get("warnings", []))   # data-free by design
    s2, r2 = _scores(mlp(w1, w2), "wanda")                                    # data-aware without data
    assert any("synthetic" in w for w in r2.report.get("warnings", []))
    np.testing.assert_array_equal(s, _scores(mlp(w1, w2), "obs-free")[0])     # deterministic


def test_statistics_memory_is_bounded():
    """256 samples of a 16 x 64 x 64 activation are 64 MiB; the statistics stay tiny."""
    model = wide_conv(16, 64)
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((16, 4, 64, 64)).astype(np.float32)} for _ in range(16)]
    activation_bytes = 256 * 16 * 64 * 64 * 4
    _, r = _scores(model, "obs", calib=batches, calib_samples=256, calib_heldout=0)
    info = r.report["sctx_passes"]
    assert info["peak_stats_bytes"] <= 8 * (16 * 9 + 1) * (16 * 9 + 1)   # one XᵀX over im2col features
    assert info["peak_stats_bytes"] * 100 < activation_bytes
    # a budget below two Hessians collects them one consumer at a time
    r2 = graphprune.prune(wide_conv(16, 16), target_flops=0.6, criterion="obs", round_to=1, stats_memory=1,
                          calib=[{"x": b["x"][:, :, :16, :16]} for b in batches[:2]], fidelity=False)
    assert r2.report["passes"]["score"]["peak_stats_bytes"] <= 8 * (16 * 9 + 1) * (16 * 9 + 1)
    comp = graphprune.prune(model, target_flops=0.6, round_to=1, calib=batches[:4], compensate="obs",
                            fidelity=False)
    k = 16 - len(comp.report["groups"][0]["removed"])
    assert comp.report["compensation"]["peak_stats_bytes"] <= 2 * 8 * ((9 * k) ** 2 + 9 * k * 4 + 9 * k + 4)
