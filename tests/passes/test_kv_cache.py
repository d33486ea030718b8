"""KV-cache decoders (past_key/past_value graph inputs, present_key/present_value graph
outputs): head pruning only with prune_kv_cache, cache shapes reported and correct.

Models: models/kv_cache.py (GPT-2-style MHA, LLaMA-style GQA with rotary), both PyTorch
exporters, symbolic batch / seq / past_seq axes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

import graphprune  # noqa: E402
from graphprune.cli import main as cli_main  # noqa: E402
from graphprune.kv_cache import format_cache_shapes  # noqa: E402
from graphprune.runtime import run_model  # noqa: E402
from graphprune.verify import masked_model  # noqa: E402
from graphprune.verify_io import compare_sliced, io_slices, slice_arrays  # noqa: E402
from models.kv_cache import KV_MODELS, build_kv_onnx, kv_example_inputs  # noqa: E402
from _fixtures import export_getter  # noqa: E402

ORACLE_RTOL = 1e-4
EXPORTERS = {"torchscript": False, "dynamo": True}
try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False
_NEEDS_HF = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
CASES = [pytest.param(m, e, id=f"{m}-{e}", marks=[_NEEDS_HF] if m.startswith("hf_") else [])
         for m in KV_MODELS for e in EXPORTERS]
# (batch, seq, past): two batch sizes, two past lengths including the first step (past 0)
SIZES = [(1, 3, 0), (3, 2, 7), (2, 1, 5), (3, 4, 0)]


@pytest.fixture(scope="module")
def kv_path(tmp_path_factory):
    return export_getter(tmp_path_factory.mktemp("kv"), build_kv_onnx, EXPORTERS)


@pytest.fixture(scope="module")
def modules():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = KV_MODELS[name]()
        return cache[name]

    return get


def _dims(vi) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def _cache_names(proto) -> list[str]:
    io = list(proto.graph.input) + list(proto.graph.output)
    return [v.name for v in io if v.name.startswith(("past", "present"))]


@pytest.mark.parametrize("name, exporter", CASES)
def test_cache_heads_pinned_without_flag(kv_path, name, exporter):
    path = kv_path(name, exporter)
    res = graphprune.analyze(path)
    reasons = [p.reason for p in res.pinned]
    assert any("KV-cache graph input past_key" in r and "--prune-kv-cache" in r for r in reasons), reasons
    cache = set(_cache_names(onnx.load(path)))
    for g in res.groups:  # no group may touch a cache tensor
        assert not {m.tensor for m in g.members} & cache, g.name
    # with the flag, the K/V projections become head groups that include the cache axes
    flagged = graphprune.analyze(path, prune_kv_cache=True)
    heads = [g for g in flagged.groups if g.kind == "heads" and {m.tensor for m in g.members} & cache]
    assert len(heads) == 2, [g.name for g in flagged.groups]  # one per layer
    # and a prune without the flag leaves every cache shape as it was
    # (the pinned heads' projections are a quarter of the MACs at the default cost shape, one decode
    # step after 128 past tokens: 0.9 is reachable without touching the heads)
    res = graphprune.prune(path, target_flops=0.9)
    assert res.report["kv_cache"] and all(s["before"] == s["after"] for s in res.report["kv_cache"].values())
    assert [_dims(v) for v in res.model.graph.input] == [_dims(v) for v in onnx.load(path).graph.input]


@pytest.mark.parametrize("target", [0.7, 0.5])
@pytest.mark.parametrize("name, exporter", CASES)
def test_prune_kv_cache(kv_path, modules, name, exporter, target):
    path = kv_path(name, exporter)
    original = onnx.load(path)
    res = graphprune.prune(path, target_flops=target, prune_kv_cache=True, verify=True)
    pruned = res.model
    r = res.report
    assert r["oracle"]["equivalent"], r["oracle"]
    onnx.checker.check_model(pruned, full_check=True)
    assert target - 0.02 <= r["macs_ratio"] <= target, r["macs_ratio"]

    # reported cache shapes == the pruned graph's inputs/outputs; dynamic axes stay symbolic
    io = {v.name: _dims(v) for v in list(pruned.graph.input) + list(pruned.graph.output)}
    io0 = {v.name: _dims(v) for v in list(original.graph.input) + list(original.graph.output)}
    kv = r["kv_cache"]
    assert sorted(kv) == sorted(_cache_names(original))
    for cname, s in kv.items():
        assert s["after"] == io[cname] and s["before"] == io0[cname], cname
        assert isinstance(s["after"][0], str) and isinstance(s["after"][2], str), s  # batch, sequence
        assert s["after"][3] == s["before"][3]  # head_dim is not pruned by default
    shrunk = [c for c, s in kv.items() if s["after"][1] < s["before"][1]]
    assert shrunk, "no cache lost a head"
    # a key cache and its value cache keep the same heads, as do past and present of a layer
    for layer in (0, 1):
        heads = {kv[f"{p}_{t}.{layer}"]["after"][1] for p in ("past", "present") for t in ("key", "value")}
        assert len(heads) == 1, heads
    lines = format_cache_shapes(kv)
    assert any("->" in ln for ln in lines) and lines[0].startswith("past_key.0: [batch, ")

    # the oracle by hand, on real decoder feeds: random past caches (the removed heads hold
    # random values the masked original must ignore), two batch sizes, past length 0 and > 0
    ctx = res.context
    labels = ctx.plan.removed_labels(ctx.groups)
    masked = masked_model(ctx.original, ctx.dependency, labels)
    slices = io_slices(ctx.dependency, labels)
    assert set(slices) == set(shrunk)
    module = modules(name)
    for batch, seq, past in SIZES:
        feeds = kv_example_inputs(module, batch, seq, past, seed=11)
        cmp = compare_sliced(masked, pruned, feeds, slices)
        assert cmp["max_rel"] <= ORACLE_RTOL, (batch, seq, past, cmp)
        # the pruned model runs on the kept cache slices; present = past + seq along axis 2
        outs = dict(zip([o.name for o in pruned.graph.output],
                        run_model(pruned, slice_arrays(feeds, slices))))
        assert outs["logits"].shape[:2] == (batch, seq)
        for cname, s in kv.items():
            if s["kind"] == "output":
                assert outs[cname].shape == (batch, s["after"][1], past + seq, s["after"][3]), cname
            assert np.isfinite(outs["logits"]).all()
    # the oracle can fail: the unmasked original differs from the pruned model
    feeds = kv_example_inputs(module, 2, 3, 4, seed=5)
    assert compare_sliced(original, pruned, feeds, slices)["max_rel"] > 1e-3


def test_cli_prints_and_reports_cache_shapes(kv_path, tmp_path, capsys):
    path = kv_path("kv_gqa", "torchscript")
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    assert cli_main([path, "--target-flops", "0.5", "--prune-kv-cache", "--verify", "-o", str(out),
                     "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    report = json.loads(rep.read_text())
    pruned = onnx.load(out)
    for cname, s in report["kv_cache"].items():
        vi = next(v for v in list(pruned.graph.input) + list(pruned.graph.output) if v.name == cname)
        assert _dims(vi) == s["after"]
    for line in format_cache_shapes(report["kv_cache"]):
        assert line in text, (line, text)
    assert "past_key.0: [batch, 2->1, past_seq, 16]" in text
    # without the flag the caches keep their shapes (GQA: query heads may still go inside a group)
    assert cli_main([path, "--target-flops", "0.7", "--verify", "-o", str(tmp_path / "q.onnx")]) == 0
    text = capsys.readouterr().out
    assert "kv cache  8 inputs/outputs unchanged (--prune-kv-cache" in text and "->" not in text.split("kv cache")[1]
    q = onnx.load(tmp_path / "q.onnx")
    assert [_dims(v) for v in q.graph.input] == [_dims(v) for v in onnx.load(path).graph.input]
    # MHA without the flag: every head reaches the cache, 0.5 is out of reach: one line, exit 2, no file
    mha = kv_path("kv_mha", "dynamo")
    assert cli_main([mha, "--target-flops", "0.5", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot reach" in err, err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["kv_mha", "kv_gqa"])
def test_prune_kv_cache_head_dim(kv_path, modules, name):
    """With head_dim pruning on, the caches' head_size axis shrinks too (keys through the Q.K^T
    contraction, rotary pairs together; values with the output projection)."""
    path = kv_path(name, "dynamo")
    res = graphprune.prune(path, target_flops=0.6, prune_kv_cache=True, policy={"head_dim": True}, round_to=1,
                           verify=True)
    assert res.report["oracle"]["equivalent"]
    assert 0.58 <= res.report["macs_ratio"] <= 0.6
    onnx.checker.check_model(res.model, full_check=True)
    kv = res.report["kv_cache"]
    assert any(s["after"][3] < s["before"][3] for s in kv.values()), kv
    io = {v.name: _dims(v) for v in list(res.model.graph.input) + list(res.model.graph.output)}
    assert all(io[c] == s["after"] for c, s in kv.items())
    ctx = res.context
    labels = ctx.plan.removed_labels(ctx.groups)
    masked = masked_model(ctx.original, ctx.dependency, labels)
    slices = io_slices(ctx.dependency, labels)
    for batch, seq, past in SIZES[:2]:
        feeds = kv_example_inputs(modules(name), batch, seq, past, seed=2)
        assert compare_sliced(masked, res.model, feeds, slices)["max_rel"] <= ORACLE_RTOL
