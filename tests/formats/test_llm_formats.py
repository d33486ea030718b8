"""onnxruntime-genai builder folders: packed GroupQueryAttention, (Skip)SimplifiedLayerNormalization,
deployment folder mode (uniform heads, config rewritten, files copied), decoder verify inputs.

The fixtures in tests/data/genai are the builder's own output (`python -m onnxruntime_genai.models.builder
-p fp32 -e cpu`) for random-init 2-layer LLaMA (4 query heads, 2 KV heads) and Phi-3 (4/4) folders made by
`models/llm_folders.py`; the generation test runs them in onnxruntime-genai when .venv-genai exists.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.cli import main as cli_main
from graphprune.deploy import graph_dimensions
from graphprune.runtime import PAST_TOKENS, run_model, synthetic_inputs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(HERE)
FIXTURES = {name: os.path.join(HERE, "data", "genai", name) for name in ("llama_fp32", "phi3_fp32")}
GENAI_PYTHON = os.path.join(ROOT, ".venv-genai", "bin", "python")


def _copy(name: str, tmp_path) -> str:
    dst = tmp_path / name
    shutil.copytree(FIXTURES[name], dst)
    return str(dst)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker with full shape inference. The builder writes onnxruntime's SimplifiedLayerNormalization
    in the ONNX domain, which onnx does not define (the input fails the checker for that alone): those
    nodes are checked as the custom-domain op they are, everything else as written."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "SimplifiedLayerNormalization" and n.domain == "":
            n.domain = "com.microsoft"
    onnx.checker.check_model(m, full_check=True)


def _plant_dead(folder: str) -> dict:
    """Zero KV group 1 of layer 0 (its Q, K, V columns) and MLP channels 0..15 of layer 1 (gate and up
    columns, down rows): their outputs are exactly zero, so cutting them leaves every output unchanged."""
    path = os.path.join(folder, "model.onnx")
    m = onnx.load(path)
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    a = _attrs(gqa)
    hq, hkv = a["num_heads"], a["kv_num_heads"]
    init = {t.name: t for t in m.graph.initializer}
    qkv = onnx.numpy_helper.to_array(init["model.layers.0.attn.qkv_proj.MatMul.weight"]).copy()
    d = qkv.shape[1] // (hq + 2 * hkv)
    rep = hq // hkv
    cols = list(range(rep * d, 2 * rep * d)) + list(range((hq + 1) * d, (hq + 2) * d)) \
        + list(range((hq + hkv + 1) * d, (hq + hkv + 2) * d))
    qkv[:, cols] = 0
    new = {"model.layers.0.attn.qkv_proj.MatMul.weight": qkv}
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
        key = f"model.layers.1.mlp.{name}.MatMul.weight"
        w = onnx.numpy_helper.to_array(init[key]).copy()
        np.moveaxis(w, axis, 0)[:16] = 0
        new[key] = w
    for t in m.graph.initializer:
        if t.name in new:
            t.CopyFrom(onnx.numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    onnx.save(m, path, save_as_external_data=True, location="model.onnx.data")
    return {"kv_group": 1, "mlp": 16}


def test_packed_gqa_groups_and_pins():
    res = graphprune.analyze(os.path.join(FIXTURES["llama_fp32"], "model.onnx"), prune_kv_cache=True)
    heads = [g for g in res.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.size == 2 and g.width == 64 for g in heads)  # 2 KV groups x (2 q + k + v) x 16
    reasons = " ".join(p.reason for p in res.pinned)
    assert "packed QKV" not in reasons and "no op rule" not in reasons
    assert "hidden width is pinned" in reasons


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_builder_fp32_oracle(name, tmp_path):
    folder = _copy(name, tmp_path)
    res = graphprune.prune(os.path.join(folder, "model.onnx"), target_flops=0.6, prune_kv_cache=True,
                           policy={"uniform_heads": True}, verify=True)
    assert res.report["oracle"]["equivalent"], res.report["oracle"]
    assert set(res.report["oracle"]) >= {"batch1", "batch5"}
    _check(res.model)
    gqas = [_attrs(n) for n in res.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len({(a["num_heads"], a["kv_num_heads"]) for a in gqas}) == 1  # the same heads in every layer
    assert 0.58 <= res.report["macs_ratio"] <= 0.6  # other groups gave channels back after rounding heads down
    assert gqas[0]["num_heads"] < 4
    dims = graph_dimensions(res.model)
    assert dims["head_size"] == 16 and dims["num_attention_heads"] == gqas[0]["num_heads"]
    for o in res.model.graph.output:
        if o.name.startswith("present"):
            assert o.type.tensor_type.shape.dim[1].dim_value == gqas[0]["kv_num_heads"]
            assert o.type.tensor_type.shape.dim[2].dim_param == "total_sequence_length"


def test_planted_dead_heads_and_channels_are_cut_exactly(tmp_path):
    folder = _copy("llama_fp32", tmp_path)
    _plant_dead(folder)
    path = os.path.join(folder, "model.onnx")
    # one KV group of layer 0 (64 qkv columns, 32 o_proj rows, half of its GroupQueryAttention's
    # Q.K^T + scores.V over 129 keys) and 16 MLP channels are 9216 + 8256 of 112896 MACs (one decode step)
    res = graphprune.prune(path, target_flops=0.846, round_to=16, prune_kv_cache=True, verify=True)
    removed = [g["removed"] for g in res.report["groups"]]
    assert removed == [[1], [], [], list(range(16))], removed  # exactly the planted dead units
    assert res.report["oracle"]["equivalent"]
    _check(res.model)
    original = onnx.load(path)
    gqa0 = next(n for n in res.model.graph.node if n.op_type == "GroupQueryAttention")
    assert _attrs(gqa0)["kv_num_heads"] == 1  # the dead KV group of layer 0 went
    down = {t.name: t.dims for t in res.model.graph.initializer}["model.layers.1.mlp.down_proj.MatMul.weight"]
    assert down[0] == 128 - 16
    for batch, seq in ((1, 5), (3, 1)):
        feeds = synthetic_inputs(original, batch=batch, seq=seq, seed=batch)
        for k in ("past_key_values.0.key", "past_key_values.0.value"):
            feeds[k][:, 1] = 0  # the dead KV head's past, as the model itself would have written it
        want = run_model(path, feeds)
        fed = dict(feeds)
        for k in fed:  # the pruned model reads the kept cache slices (layer 0 keeps KV head 0)
            if k == "past_key_values.0.key" or k == "past_key_values.0.value":
                fed[k] = fed[k][:, :1]
        got = run_model(res.model, fed)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)  # logits unchanged
    # without uniform heads the layers differ (1 and 2 KV heads): no single config can describe that
    from graphprune.deploy import check_uniform
    from graphprune.errors import BadInputError

    with pytest.raises(BadInputError, match="layers differ in num_attention_heads, num_key_value_heads"):
        check_uniform(res.model)


def test_synthetic_decoder_inputs_continue_the_past():
    m = onnx.load(os.path.join(FIXTURES["llama_fp32"], "model.onnx"))
    feeds = synthetic_inputs(m, batch=1, seq=5)
    assert feeds["input_ids"].shape == (1, 5)
    assert feeds["attention_mask"].shape == (1, PAST_TOKENS + 5) and feeds["attention_mask"].all()
    assert feeds["past_key_values.0.key"].shape == (1, 2, PAST_TOKENS, 16)  # kv_cache_dim = head_size
    outs = run_model(m, feeds)
    assert outs[1].shape == (1, 2, PAST_TOKENS + 5, 16)
    # batch > 1 with a past: GroupQueryAttention takes one new token per sequence
    assert synthetic_inputs(m, batch=3, seq=5)["input_ids"].shape == (3, 1)


def test_cli_folder_mode_writes_a_complete_folder(tmp_path, capsys):
    folder = _copy("llama_fp32", tmp_path)
    out = tmp_path / "out" / "model.onnx"
    before = open(os.path.join(folder, "genai_config.json")).read()
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.5", "-o", str(out), "--verify"]) == 0
    assert open(os.path.join(folder, "genai_config.json")).read() == before  # the input folder is untouched
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json", "model.onnx"} <= set(os.listdir(out.parent))
    cfg = json.load(open(out.parent / "genai_config.json"))["model"]["decoder"]
    pruned = onnx.load(str(out))
    gqa = _attrs(next(n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == \
        (gqa["num_heads"], gqa["kv_num_heads"], 16)
    assert cfg["num_attention_heads"] < 4
    assert "folder  genai_config.json" in capsys.readouterr().out


def test_cli_folder_mode_refuses_the_input_folder(tmp_path, capsys):
    folder = _copy("llama_fp32", tmp_path)
    code = cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.5", "-o",
                     os.path.join(folder, "pruned.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "input folder" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(folder, "pruned.onnx"))


@pytest.mark.skipif(not os.path.exists(GENAI_PYTHON),
                    reason=".venv-genai (onnxruntime-genai) is not installed; see README 'LLM deployment folders'")
@pytest.mark.parametrize("name", sorted(FIXTURES) + ["llama_int4"])
def test_pruned_folder_generates_in_onnxruntime_genai(name, tmp_path):
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(HERE, "data", "genai", name), folder)
    out = tmp_path / "out" / "model.onnx"
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.6", "-o", str(out), "-q"]) == 0
    run = subprocess.run([GENAI_PYTHON, os.path.join(ROOT, "tools", "genai_run.py"), str(out.parent),
                          "--tokens", "12"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["new_tokens"] == 12 and all(0 <= t < 96 for t in result["tokens"])


OPTIMUM = {name: os.path.join(HERE, "data", "optimum", name) for name in ("llama", "qwen2")}
OPTIMUM_PYTHON = os.path.join(ROOT, ".venv-optimum", "bin", "python")


@pytest.mark.parametrize("name", sorted(OPTIMUM))
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_optimum_export_prunes_verifies_and_runs_with_past(name, target, tmp_path, capsys):
    """optimum-cli export onnx --task text-generation-with-past: --verify feeds a past of a few tokens,
    new tokens, a mask over both; the config says the pruned cache shape; the file runs with a past."""
    folder = str(tmp_path / name)
    shutil.copytree(OPTIMUM[name], folder)
    out = tmp_path / "out" / "model.onnx"
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", str(target), "-o", str(out),
                     "--verify"]) == 0
    assert "oracle  mask equivalence holds" in capsys.readouterr().out
    cfg = json.load(open(out.parent / "config.json"))
    pruned = onnx.load(str(out))
    past = next(i for i in pruned.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
    assert dims[1] == cfg["num_key_value_heads"] and dims[3] == cfg["hidden_size"] // cfg["num_attention_heads"]
    if target == 0.5:
        assert cfg["num_key_value_heads"] < 2
    feeds = synthetic_inputs(onnx.load(os.path.join(folder, "model.onnx")), batch=2, seq=3)
    for k in feeds:
        if k.startswith("past_key_values"):
            feeds[k] = feeds[k][:, :dims[1]]
    logits = run_model(pruned, feeds)[0]
    assert logits.shape == (2, 3, 96) and np.isfinite(logits).all()


@pytest.mark.skipif(not os.path.exists(OPTIMUM_PYTHON),
                    reason=".venv-optimum (optimum-onnx) is not installed; see README 'LLM deployment folders'")
def test_pruned_optimum_folder_generates(tmp_path):
    folder = str(tmp_path / "llama")
    shutil.copytree(OPTIMUM["llama"], folder)
    out = tmp_path / "out" / "model.onnx"
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.5", "-o", str(out), "-q"]) == 0
    run = subprocess.run([OPTIMUM_PYTHON, os.path.join(ROOT, "tools", "optimum_run.py"), str(out.parent),
                          "--tokens", "8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["new_tokens"] == 8


def test_verify_inputs_npz(tmp_path, capsys):
    """--verify-inputs FILE.npz: the oracle runs on the user's arrays (here a past of 6 tokens and 2 new)."""
    folder = _copy("llama_fp32", tmp_path)
    model = os.path.join(folder, "model.onnx")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 96, (1, 2)), "attention_mask": np.ones((1, 8), np.int64)}
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((1, 2, 6, 16))  # float64: cast
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **feeds)
    out = tmp_path / "out" / "model.onnx"
    assert cli_main([model, "--target-flops", "0.5", "-o", str(out), "--verify-inputs", str(npz),
                     "--report", str(tmp_path / "r.json")]) == 0
    oracle = json.load(open(tmp_path / "r.json"))["oracle"]
    assert oracle["equivalent"] and set(oracle) == {"inputs", "equivalent"}
    assert "oracle  mask equivalence holds" in capsys.readouterr().out
    # bad files: one line, exit 2, nothing written
    bad = dict(feeds)
    del bad["attention_mask"]
    np.savez(tmp_path / "missing.npz", **bad)
    np.savez(tmp_path / "extra.npz", **feeds, nope=np.zeros(1))
    np.savez(tmp_path / "shape.npz", **(feeds | {"past_key_values.0.key": np.zeros((1, 3, 6, 16))}))
    (tmp_path / "junk.npz").write_text("not a zip")
    for name, words in (("missing.npz", "no array for graph input attention_mask"), ("extra.npz", "nope"),
                        ("shape.npz", "has shape [1, 3, 6, 16]"), ("junk.npz", "not a readable .npz"),
                        ("absent.npz", "no such file")):
        out2 = tmp_path / name.replace(".npz", "") / "model.onnx"
        assert cli_main([model, "--target-flops", "0.5", "-o", str(out2), "--verify-inputs",
                         str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not out2.exists()


def test_optimum_mha_config_keeps_heads(tmp_path, capsys):
    """A Hugging Face config without grouped-query num_key_value_heads (Phi-3 with 4/4 heads: optimum sizes
    its cache from num_attention_heads, which also fixes head_dim): heads stay, the MLP is pruned, and the
    folder still runs with past; --prune-kv-cache prunes heads anyway."""
    folder = str(tmp_path / "phi3")
    shutil.copytree(os.path.join(HERE, "data", "optimum", "phi3"), folder)
    out = tmp_path / "out" / "model.onnx"
    # at the default cost shape (one decode step after 128 past tokens) the kept heads' attention over
    # the cache is a small share of the MACs: 0.7 is reachable with the MLP alone
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.7", "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "attention heads are kept" in text and "oracle  mask equivalence holds" in text
    pruned = onnx.load(str(out))
    past = next(i for i in pruned.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[1].dim_value == 4
    assert json.load(open(out.parent / "config.json"))["num_attention_heads"] == 4
    out2 = tmp_path / "out2" / "model.onnx"
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.5", "-o", str(out2), "-q",
                     "--prune-kv-cache"]) == 0
    past = next(i for i in onnx.load(str(out2)).graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[1].dim_value < 4


def test_folder_default_output_is_a_sibling_folder(tmp_path):
    folder = _copy("llama_fp32", tmp_path)
    assert cli_main([os.path.join(folder, "model.onnx"), "--target-flops", "0.7", "-q"]) == 0
    out = tmp_path / "llama_fp32_pruned"
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert sorted(os.listdir(folder)) == sorted(os.listdir(FIXTURES["llama_fp32"]))  # nothing written beside the input


def test_verify_inputs_from_the_api():
    path = os.path.join(FIXTURES["phi3_fp32"], "model.onnx")
    feeds = synthetic_inputs(onnx.load(path), batch=2, seq=1, seed=5)
    res = graphprune.prune(path, target_flops=0.6, prune_kv_cache=True, verify_inputs=feeds)
    assert set(res.report["oracle"]) == {"inputs", "equivalent"} and res.report["oracle"]["equivalent"]
    with pytest.raises(graphprune.errors.BadInputError, match="no array for graph input"):
        # without --prune-kv-cache the heads and their Q.K^T + scores.V stay: 0.6 is out of reach
        graphprune.prune(path, target_flops=0.7, verify_inputs={"input_ids": feeds["input_ids"]})


@pytest.mark.parametrize("num_heads_attr", [4, 0])
def test_rotary_embedding_keeps_whole_heads(num_heads_attr, oracle):
    """com.microsoft RotaryEmbedding on 3-D q and k (the builder's fp16 form) before MultiHeadAttention:
    whole heads go, head_size and the cos/sin caches stay, num_heads is rewritten where set."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, heads, d, max_pos = 32, 4, 8, 64
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    ang = np.arange(max_pos)[:, None] * inv[None]
    w = {n: (rng.standard_normal((hidden, hidden)) * 0.3).astype(np.float32) for n in ("Wq", "Wk", "Wv", "Wo")}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.cos(ang).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(ang).astype(np.float32), "sin")]
    rot = {"num_heads": num_heads_attr} if num_heads_attr else {}
    nodes = [helper.make_node("MatMul", ["x", n], [n.lower()[1]]) for n in ("Wq", "Wk", "Wv")]
    nodes += [helper.make_node("RotaryEmbedding", [t, "pos", "cos", "sin"], [t + "r"], domain="com.microsoft", **rot)
              for t in ("q", "k")]
    nodes += [helper.make_node("MultiHeadAttention", ["qr", "kr", "v"], ["a"], domain="com.microsoft", num_heads=heads),
              helper.make_node("MatMul", ["a", "Wo"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    F = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("x", F, ["batch", "seq", hidden]),
                                               helper.make_tensor_value_info("pos", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", F, ["batch", "seq", hidden])], inits,
                              value_info=[helper.make_tensor_value_info(n, F, ["batch", "seq", hidden])
                                          for n in ("qr", "kr", "a")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    res = oracle(model, target_flops=0.6, round_to=1, uniform=True)
    kept = {n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in res.model.graph.node
            if n.op_type in ("RotaryEmbedding", "MultiHeadAttention")}
    assert kept["MultiHeadAttention"]["num_heads"] < heads
    if num_heads_attr:
        assert kept["RotaryEmbedding"]["num_heads"] == kept["MultiHeadAttention"]["num_heads"]
    assert {t.name: t.dims for t in res.model.graph.initializer}["cos"] == [max_pos, d // 2]
