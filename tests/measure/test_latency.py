"""Latency lookup table, its cache, the latency-aware rounding pass and prune_to_latency.

The search is tested with a deterministic fake backend (latency proportional to MACs) so
the assertions never depend on this machine's speed; one test runs the real onnxruntime
CPU backend end to end and checks only the structure of what it reports.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

try:
    from _latency_models import FakeBackend, conv_chain, save
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._latency_models import FakeBackend, conv_chain, save

import graphprune
from graphprune import latency as lat
from graphprune.errors import BadInputError, NothingToPruneError
from graphprune.latency import (LatencyRoundPass, LatencyTable, build_latency_table, latency_vs_flops,
                                prune_to_latency)

LUT_FAST = dict(max_counts=4, runs=2, warmup=0, threads=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save(conv_chain(), tmp_path_factory.mktemp("latency") / "model.onnx")


# --------------------------------------------------------------------------- table and cache


def test_table_structure_and_cache(model_path, tmp_path, monkeypatch):
    table = build_latency_table(model_path, "ort-cpu", cache_dir=tmp_path, **LUT_FAST)
    assert not table.cache_hit and table.path and table.path.startswith(str(tmp_path))
    assert sorted(table.groups) == [0, 1]
    for gid, entry in table.groups.items():
        assert entry["size"] == 32 and entry["counts"] == sorted(entry["counts"]) and 32 in entry["counts"]
        assert len(entry["counts"]) <= 4 and all(c % 8 == 0 for c in entry["counts"])
        assert all(ms > 0 for ms in entry["ms"]) and entry["layers"]
        assert set(entry["layer_ms"]) == set(entry["layers"])
        sums = np.sum([entry["layer_ms"][name] for name in entry["layers"]], axis=0)
        assert np.allclose(sums, entry["ms"])
    on_disk = json.loads(open(table.path).read())
    assert on_disk["version"] == lat.LUT_VERSION and set(on_disk["groups"]) == {"0", "1"}

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached table must not be measured again")

    monkeypatch.setattr(lat.table, "_time_model", no_timing)  # the table module times the layer sub-models
    again = build_latency_table(model_path, "ort-cpu", cache_dir=tmp_path, **LUT_FAST)
    assert again.cache_hit and again.groups == table.groups


def test_cache_env_and_keys(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_LATENCY_CACHE", str(tmp_path / "env"))
    assert lat.latency_cache_dir() == tmp_path / "env"
    a = build_latency_table(model_path, "ort-cpu", **LUT_FAST)
    assert a.path.startswith(str(tmp_path / "env"))
    b = build_latency_table(model_path, "ort-cpu", **(LUT_FAST | {"threads": 2}))  # another backend setting
    c = build_latency_table(model_path, "ort-cpu", batch=2, **LUT_FAST)              # other input shapes
    other = save(conv_chain(seed=1), tmp_path / "other.onnx")                        # another model
    d = build_latency_table(other, "ort-cpu", **LUT_FAST)
    assert len({a.path, b.path, c.path, d.path}) == 4
    assert not any(t.cache_hit for t in (b, c, d))


def test_cache_adds_missing_counts(model_path, tmp_path):
    build_latency_table(model_path, "ort-cpu", cache_dir=tmp_path, **(LUT_FAST | {"max_counts": 2}))
    more = build_latency_table(model_path, "ort-cpu", cache_dir=tmp_path, **LUT_FAST)
    assert not more.cache_hit and len(more.counts(0)) == 4


def test_no_cache(model_path, tmp_path):
    table = build_latency_table(model_path, "ort-cpu", cache=False, cache_dir=tmp_path, **LUT_FAST)
    assert table.groups and not list(tmp_path.iterdir())


def _table(ms: list[float], counts=(8, 16, 24, 32)) -> LatencyTable:
    return LatencyTable("test", {}, {0: {"name": "g", "size": 32, "counts": list(counts), "ms": list(ms)}})


def test_preferred_count_is_a_local_minimum():
    linear = _table([1.0, 2.0, 3.0, 4.0])
    assert linear.preferred_count(0, 24, [16, 24, 32]) == 24  # nothing to gain: keep the allocation
    bump = _table([1.0, 2.0, 4.0, 4.1])                         # 24 channels are unusually slow
    assert bump.preferred_count(0, 24, [16, 24, 32]) in (16, 32)
    dip = _table([1.0, 2.0, 2.2, 4.0])                          # 24 channels are unusually fast
    assert dip.preferred_count(0, 16, [8, 16, 24]) == 24
    assert dip.preferred_count(0, 16, [8, 16, 32]) != 24        # outside the window: never chosen
    assert dip.preferred_count(0, 16, [16]) == 16
    assert dip.ms(0, 20) == pytest.approx(2.1) and dip.ms(1, 20) is None


def test_predicted_ratio_multiplies_per_layer():
    """A conv shared by two groups shrinks with both; the untimed rest of the model stays."""
    table = LatencyTable("test", {}, {
        0: {"name": "a", "size": 32, "counts": [16, 32], "ms": [3.0, 6.0],
            "layer_ms": {"conv1": [1.0, 2.0], "conv2": [2.0, 4.0]}},
        1: {"name": "b", "size": 32, "counts": [16, 32], "ms": [2.0, 4.0], "layer_ms": {"conv2": [2.0, 4.0]}},
    })
    assert table.predicted_ratio({}) == pytest.approx(1.0)
    # conv1 halves (group 0), conv2 quarters (both groups): (1 + 1) / (2 + 4)
    assert table.predicted_ratio({0: 16, 1: 16}) == pytest.approx(2.0 / 6.0)
    assert table.predicted_ratio({0: 16, 1: 16}, original_ms=12.0) == pytest.approx(8.0 / 12.0)
    assert _table([1.0, 2.0, 3.0, 4.0]).predicted_ratio({0: 16}) is None  # no per-layer data


def test_round_pass_moves_counts_and_keeps_the_oracle(model_path):
    table = _table([1.0, 1.1, 5.0, 5.1])                     # 16 is fast, 24 slow: the pass picks 16
    table.groups[1] = dict(table.groups[0], name=graphprune.analyze(model_path).groups[1].name)
    table.groups[0]["name"] = graphprune.analyze(model_path).groups[0].name
    pipeline = graphprune.default_pipeline()
    pipeline.insert_after("allocate", LatencyRoundPass(table, window=0.3))
    result = graphprune.prune(model_path, target_flops=0.6, pipeline=pipeline, verify=True)
    assert result.report["oracle"]["equivalent"]
    onnx.checker.check_model(result.model, full_check=True)
    moved = result.report["latency_round"]
    assert moved and all(v["chosen"] == 16 for v in moved.values())
    kept = {g["id"]: g["kept"] for g in result.report["groups"]}
    assert all(kept[int(gid)] == 16 for gid in moved)


# --------------------------------------------------------------------------- prune_to_latency


def test_prune_to_latency_meets_target_with_fake_backend(model_path, tmp_path):
    fake = FakeBackend()
    result = prune_to_latency(model_path, 0.6, fake, use_lut=False, runs=2, warmup=0, verify=True)
    info = result.report["latency"]
    assert info["met"] and info["measured_ratio"] <= 0.6 and info["target"] == 0.6
    assert info["macs_ratio"] == result.report["macs_ratio"] and info["original_ms"] > info["pruned_ms"]
    assert info["backend"] == "ort-cpu" and info["search"] and info["lut"] is None
    assert all({"target_flops", "macs_ratio", "latency_ratio"} <= set(p) for p in info["search"])
    assert result.report["oracle"]["equivalent"]
    onnx.checker.check_model(result.model, full_check=True)
    # the search keeps as much as the budget allows: not far below the target
    assert info["measured_ratio"] > 0.45


def test_prune_to_latency_with_table(model_path, tmp_path):
    fake = FakeBackend()
    result = prune_to_latency(model_path, 0.7, fake, runs=2, warmup=0, lut_counts=4, lut_runs=1,
                              cache_dir=tmp_path, max_steps=4)
    info = result.report["latency"]
    assert info["lut"]["groups"] == 2 and info["lut"]["path"].startswith(str(tmp_path))
    assert info["lut_predicted_ratio"] is not None and "latency_round" in result.report
    assert info["measured_ratio"] == pytest.approx(info["pruned_ms"] / info["original_ms"])
    onnx.checker.check_model(result.model, full_check=True)


def test_prune_to_latency_real_backend(model_path, tmp_path):
    """onnxruntime CPU end to end. Timing noise on a busy machine can put even the unpruned
    model above a 1.0 target; then the error must name the backend and what was measured."""
    try:
        result = prune_to_latency(model_path, 1.0, "ort-cpu", threads=1, runs=3, warmup=1, lut_counts=3,
                                  lut_runs=1, cache_dir=tmp_path, max_steps=2)
    except NothingToPruneError as exc:
        assert "onnxruntime" in str(exc) and "fastest measured was" in str(exc)
        return
    info = result.report["latency"]
    assert info["backend"] == "ort-cpu" and "onnxruntime" in info["backend_label"]
    assert isinstance(info["measured_ratio"], float) and info["measured_ratio"] > 0
    assert info["inputs"] == {"x": [1, 3, 16, 16]} and info["runs"] == 6
    onnx.checker.check_model(result.model, full_check=True)


def test_unreachable_latency_target(model_path):
    with pytest.raises(NothingToPruneError, match="cannot reach latency target 0.500"):
        prune_to_latency(model_path, 0.5, FakeBackend(flat=True), use_lut=False, runs=1, warmup=0, max_steps=3)


@pytest.mark.parametrize("bad", [0, 1.5, "fast", -0.2])
def test_bad_latency_target(model_path, bad):
    with pytest.raises(BadInputError):
        prune_to_latency(model_path, bad, FakeBackend(), use_lut=False)


def test_flops_target_is_not_accepted(model_path):
    with pytest.raises(BadInputError, match="target_flops"):
        prune_to_latency(model_path, 0.5, FakeBackend(), use_lut=False, target_flops=0.5)


def test_latency_vs_flops_points(model_path):
    points = latency_vs_flops(model_path, (1.0, 0.5, 0.01), FakeBackend(), runs=1, warmup=0)
    assert [p["target_flops"] for p in points] == [1.0, 0.5, 0.01]
    assert points[0]["latency_ratio"] == pytest.approx(1.0)
    assert points[1]["macs_ratio"] <= 0.5 and points[1]["latency_ratio"] < 1.0
    assert "error" in points[2]


def test_table_for_grouped_and_linear_layers(tmp_path):
    """Depthwise conv, Gemm and MatMul layers are rebuilt at every candidate width."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 4] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        b = Conv <pads = [1, 1, 1, 1], group = 16> (a, wd)
        c = GlobalAveragePool (b)
        d = Flatten (c)
        e = Gemm <transB = 1> (d, wg)
        f = Relu (e)
        y = MatMul (f, wm)
    }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (16, 3, 3, 3)), ("wd", (16, 1, 3, 3)), ("wg", (24, 16)), ("wm", (24, 4))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32), name))
    table = build_latency_table(model, "ort-cpu", cache_dir=tmp_path, round_to=1, **LUT_FAST)
    ops = {name for e in table.groups.values() for name in e["layers"]}
    assert len(table.groups) == 2 and all(len(e["counts"]) == 4 and not e["failed"] for e in table.groups.values())
    assert len(ops) == 4  # both convs, the Gemm and the MatMul
