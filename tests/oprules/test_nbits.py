"""com.microsoft MatMulNBits (onnxruntime-genai int4/int8 folders): output rows free, input columns in
whole quantization blocks; 4 and 8 bits, block sizes 16-256, packed/float/no zero points, g_idx, bias."""
from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.quantized import dequantize_nbits, quantize_nbits
from graphprune.runtime import run_model, synthetic_inputs

F = TensorProto.FLOAT
HIDDEN = 32


def _nbits(name, x, y, w, bits, bs, zp, *, g_idx=False, bias=False):
    k, n = w.shape
    q, s, z = quantize_nbits(w, bits, bs, zp)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(s, f"{name}_s")]
    ins = [x, f"{name}_q", f"{name}_s"]
    if z is not None:
        inits.append(numpy_helper.from_array(z, f"{name}_z"))
        ins.append(f"{name}_z")
    if g_idx or bias:
        ins += [""] * (4 - len(ins))
    if g_idx:
        inits.append(numpy_helper.from_array((np.arange(k) // bs).astype(np.int32), f"{name}_g"))
        ins[3:4] = [ins[3]]
        ins.append(f"{name}_g")
    if bias:
        ins += [""] * (5 - len(ins))
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), f"{name}_b"))
        ins.append(f"{name}_b")
    node = helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs)
    return node, inits


def build_mlp(bits=4, bs=32, zp="packed", *, blocks=4, g_idx=False, bias=False, seed=0):
    """x [B, S, 32] -> MatMulNBits (32 -> blocks * bs) -> Relu -> MatMulNBits (-> 32) + x."""
    rng = np.random.default_rng(seed)
    inter = blocks * bs
    n1, i1 = _nbits("fc1", "x", "h", rng.standard_normal((HIDDEN, inter)).astype(np.float32) * 0.3, bits,
                    min(bs, 32), zp, bias=bias)
    n2, i2 = _nbits("fc2", "r", "m", rng.standard_normal((inter, HIDDEN)).astype(np.float32) * 0.3, bits, bs, zp,
                    g_idx=g_idx, bias=bias)
    nodes = [n1, helper.make_node("Relu", ["h"], ["r"]), n2, helper.make_node("Add", ["m", "x"], ["y"])]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", F, ["batch", "seq", HIDDEN])], i1 + i2)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _attr(model, name, key):
    node = next(n for n in model.graph.node if n.name == name or n.output[0] == name)
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == key)


def test_quantize_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    for bits, zp in ((4, "packed"), (8, "float"), (4, "none")):
        model = build_mlp(bits, 32, zp, blocks=2)
        node = __import__("onnx_graphsurgeon").import_onnx(model).nodes[2]
        deq = dequantize_nbits(node)  # [N, k_blocks, block]
        assert deq.shape == (HIDDEN, 2, 32)
        q, s, z = quantize_nbits(w, bits, 32, zp)
        assert q.shape == (16, 2, 32 * bits // 8)
    # ours agrees with onnxruntime's kernel: the float MatMul of the dequantized weight
    model = build_mlp(4, 16, "packed", blocks=3)
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(model)
    w1 = dequantize_nbits(g.nodes[0]).reshape(64 if False else g.nodes[0].attrs["N"], -1)[:, :HIDDEN]
    x = rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)
    got = run_model(model, {"x": x})
    w2 = dequantize_nbits(g.nodes[2]).reshape(HIDDEN, -1)
    want = np.maximum(x @ w1.T, 0) @ w2.T + x
    np.testing.assert_allclose(got[0], want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits, bs, zp", [(4, 16, "packed"), (4, 32, "packed"), (4, 64, "float"), (4, 128, "none"),
                                          (4, 256, "packed"), (8, 32, "packed"), (8, 64, "none"), (8, 16, "packed")])
def test_matmulnbits_blocks_pruned_exactly(bits, bs, zp, oracle):
    model = build_mlp(bits, bs, zp)
    res = oracle(model, target_flops=0.6, round_to=1)
    inter = 4 * bs
    n1, k2 = _attr(res.model, "h", "N"), _attr(res.model, "m", "K")
    assert n1 == k2 < inter and k2 % bs == 0  # whole blocks
    if zp == "packed" and bits == 4:
        assert k2 % (2 * bs) == 0  # two blocks share a zero-point byte
    init = {t.name: t.dims for t in res.model.graph.initializer}
    assert init["fc2_q"][1] == k2 // bs and init["fc1_q"][0] == n1


def test_matmulnbits_g_idx_pins_columns_bias_follows(oracle):
    model = build_mlp(4, 32, "packed", g_idx=True, bias=True)
    analysis = graphprune.analyze(model)
    assert any("g_idx" in p.reason for p in analysis.pinned)
    model = build_mlp(4, 32, "float", bias=True)
    res = oracle(model, target_flops=0.6, round_to=1)
    assert {t.name: t.dims for t in res.model.graph.initializer}["fc1_b"][0] == _attr(res.model, "h", "N")


INT4 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "genai", "llama_int4")


def test_builder_int4_folder(tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(INT4, folder)
    res = graphprune.prune(str(folder / "model.onnx"), target_flops=0.6, prune_kv_cache=True,
                           policy={"uniform_heads": True}, verify=True)
    assert res.report["oracle"]["equivalent"], res.report["oracle"]
    nodes = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    original = {n.name: n for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert any(_attr(res.model, n.name, "N") < helper.get_attribute_value(
        next(a for a in original[n.name].attribute if a.name == "N")) for n in nodes)
    feeds = synthetic_inputs(onnx.load(str(folder / "model.onnx")), batch=1, seq=4)
    assert np.isfinite(run_model(res.model, {k: v[:, :res.model.graph.input[2].type.tensor_type.shape.dim[1].dim_value]
                                             if k.startswith("past") else v for k, v in feeds.items()})[0]).all()


def _embedding_model(bits=4, bs=16, zp="none", vocab=40, seed=1):
    """ids -> GatherBlockQuantized embedding [vocab, 64] -> RMS-free MLP tail: Add residual with an fc2
    back to 64, so --prune-hidden has a hidden axis through the embedding."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, 64)).astype(np.float32)
    q, s, z = quantize_nbits(emb.T, bits, bs, zp)  # [vocab, k_blocks, blob]
    inits = [numpy_helper.from_array(q.reshape(vocab, -1), "table"), numpy_helper.from_array(s, "scales")]
    ins = ["table", "ids", "scales"]
    if z is not None:
        inits.append(numpy_helper.from_array(z, "zp"))
        ins.append("zp")
    w1 = rng.standard_normal((64, 48)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((48, 10)).astype(np.float32) * 0.2
    inits += [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    nodes = [helper.make_node("GatherBlockQuantized", ins, ["e"], domain="com.microsoft", bits=bits, block_size=bs,
                              gather_axis=0, quantize_axis=1),
             helper.make_node("MatMul", ["e", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "gbq", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", F, ["batch", "seq", 10])], inits,
                              value_info=[helper.make_tensor_value_info("e", F, ["batch", "seq", 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), emb


@pytest.mark.parametrize("zp", ["none", "packed"])
def test_gather_block_quantized_embedding_hidden_in_whole_blocks(zp):
    model, emb = _embedding_model(zp=zp)
    ids = np.array([[0, 3, 39, 7]])
    import onnx_graphsurgeon as gs

    from graphprune.quantized import unpack_bits as _unpack

    node = gs.import_onnx(model).nodes[0]
    q = np.asarray(node.inputs[0].values).reshape(40, 4, 8)
    codes = _unpack(q, 4, 16).astype(np.float32)
    zpv = (_unpack(np.asarray(node.inputs[3].values), 4, 4) if zp == "packed" else np.full((40, 4), 8)).astype(np.float32)
    deq = ((codes - zpv[..., None]) * np.asarray(node.inputs[2].values)[..., None]).reshape(40, 64)
    e = run_model(onnx.shape_inference.infer_shapes(model), {"ids": ids})  # onnxruntime agrees with our layout
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W1"))
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W2"))
    np.testing.assert_allclose(e[0], np.maximum(deq[ids] @ w1, 0) @ w2, rtol=1e-4, atol=1e-4)
    res = graphprune.prune(model, target_flops=0.45, round_to=1, uniform=True, prune_hidden=True, verify=True)
    assert res.report["oracle"]["equivalent"], res.report["oracle"]
    init = {t.name: t.dims for t in res.model.graph.initializer}
    hidden = init["W1"][0]
    assert hidden < 64 and hidden % (32 if zp == "packed" else 16) == 0
    assert init["table"][1] == hidden // 2 and init["scales"][1] == hidden // 16
