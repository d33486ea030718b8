"""TensorFlow/Keras exports (tf2onnx) without TensorFlow: graphs written in ONNX text that copy
what tf2onnx emits for Keras models.

- channels-last (NHWC) tensors with Transpose(0,3,1,2) before and Transpose(0,2,3,1) after each
  Conv, per-channel Mul/Add constants (a BatchNormalization left unfolded) broadcast along the
  last axis, Relu6 as Clip(0, 6), HardSwish as x * HardSigmoid(x), Pad on NHWC, depthwise Conv
  (group = channels), ReduceMean over H, W and a MatMul head with [in, out] weights;
- tf2onnx names every None dimension ``unk__N``, the batch axis included;
- Keras MultiHeadAttention: its Einsums decomposed into MatMul with run-time Reshape targets
  computed from Shape -> Gather -> ReduceProd -> Concat, which merge the batch with the heads
  ([N, H, S, D] -> [N*H, S, D]).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphprune

from conftest import assert_oracle, make_model

TARGET = 0.5


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _check(model: onnx.ModelProto, **kw) -> graphprune.PruneResult:
    result = assert_oracle(model, target_flops=TARGET, round_to=1, **kw)
    ratio = result.report["macs_ratio"]
    assert TARGET - 0.02 <= ratio <= TARGET, ratio
    # the batch axis stays dynamic, under the exporter's own symbol name
    assert _dims(result.model.graph.input[0])[0] == _dims(model.graph.input[0])[0]
    assert _dims(result.model.graph.output[0])[0] == _dims(model.graph.output[0])[0]
    onnx.checker.check_model(result.model, full_check=True)
    return result


# -- channels-last CNN ----------------------------------------------------------------------------

def nhwc_cnn(opset: int, head: str = "reduce") -> onnx.ModelProto:
    """stem Conv -> BN as Mul/Add on the last axis -> Relu6 (Clip) -> Pad -> depthwise Conv ->
    HardSwish -> 1x1 Conv -> residual Add with another 1x1 Conv -> global mean -> MatMul head."""
    if opset >= 18:
        mean = "g = ReduceMean <keepdims=0> (r4, hw)" if head == "reduce" else \
            "gk = ReduceMean <keepdims=1> (r4, hw)\n  g = Squeeze (gk, hw)"
    else:
        mean = "g = ReduceMean <axes=[1,2], keepdims=0> (r4)" if head == "reduce" else \
            "gk = ReduceMean <axes=[1,2], keepdims=1> (r4)\n  g = Squeeze (gk, hw)"
    body = f"""
  xt = Transpose <perm=[0,3,1,2]> (x)
  c1 = Conv <pads=[1,1,1,1], strides=[2,2], kernel_shape=[3,3]> (xt, W1, B1)
  t1 = Transpose <perm=[0,2,3,1]> (c1)
  m1 = Mul (t1, S1)
  a1 = Add (m1, O1)
  r1 = Clip (a1, lo, hi)
  p1 = Pad (r1, pads, zero)
  t2 = Transpose <perm=[0,3,1,2]> (p1)
  d2 = Conv <group=16, kernel_shape=[3,3]> (t2, W2, B2)
  t3 = Transpose <perm=[0,2,3,1]> (d2)
  hs = HardSigmoid <alpha=0.1666667, beta=0.5> (t3)
  r2 = Mul (t3, hs)
  t4 = Transpose <perm=[0,3,1,2]> (r2)
  c3 = Conv <kernel_shape=[1,1]> (t4, W3, B3)
  t5 = Transpose <perm=[0,2,3,1]> (c3)
  r3 = Relu (t5)
  t6 = Transpose <perm=[0,3,1,2]> (r3)
  c4 = Conv <kernel_shape=[1,1]> (t6, W4, B4)
  t7 = Transpose <perm=[0,2,3,1]> (c4)
  m4 = Mul (t7, S4)
  s4 = Add (m4, t1)
  r4 = Relu (s4)
  {mean}
  mm = MatMul (g, W5)
  y = Add (mm, B5)
"""
    ir = 7 if opset <= 13 else 8 if opset <= 18 else 9
    text = (f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
            f'tf2onnx (float[unk__12,16,16,3] x) => (float[unk__13,10] y) '
            f'<float lo = {{0.0}}, float hi = {{6.0}}, int64[8] pads = {{0,1,1,0,0,1,1,0}}, float zero = {{0.0}}, '
            f'int64[2] hw = {{1,2}}> {{\n{body}\n}}')
    weights = {"W1": (16, 3, 3, 3), "B1": (16,), "S1": (16,), "O1": (16,), "W2": (16, 1, 3, 3), "B2": (16,),
               "W3": (32, 16, 1, 1), "B3": (32,), "W4": (16, 32, 1, 1), "B4": (16,), "S4": (16,),
               "W5": (16, 10), "B5": (10,)}
    return make_model(text, weights)


@pytest.mark.parametrize("opset,head", [(13, "reduce"), (13, "squeeze"), (18, "reduce"), (18, "squeeze")])
def test_nhwc_cnn_prunes_through_transposes(opset, head):
    model = nhwc_cnn(opset, head)
    analysis = graphprune.analyze(model)
    # the stem/residual channels (16, tied through the NHWC Add) and the expansion (32)
    assert sorted(g.size for g in analysis.groups) == [16, 32]
    reasons = " ".join(p.reason for p in analysis.pinned)
    assert "reaches graph output" in reasons and "Transpose" not in reasons, reasons
    result = _check(model)
    widths = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    # per-channel constants on the last (NHWC) axis and the depthwise group follow the channels
    assert widths["S1"][0] == widths["W1"][0] == widths["W2"][0] == widths["W5"][0] < 16
    dw = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] == "W2")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == widths["W2"][0]


def test_unk_batch_symbol_is_a_named_symbol():
    """tf2onnx's unk__N input symbol is the model's own batch symbol: an axis that merges it
    with a static factor is a folded axis, not an unknown (heads are found below because of it),
    and the pruned model keeps the exporter's name."""
    model = keras_encoder(opset=13)
    groups = graphprune.analyze(model).groups
    assert any(g.size == 8 and g.width == 4 for g in groups), [(g.size, g.width) for g in groups]


# -- Keras MultiHeadAttention (Einsum decomposed into MatMul by tf2onnx) ---------------------------

def keras_encoder(opset: int = 13, heads: int = 8, dim: int = 32, seq: int = 8, ffn: int = 64) -> onnx.ModelProto:
    """x -> Q, K, V Dense ([in, out] MatMul + bias) -> [N, S, H, D] -> heads merged into the batch
    with run-time targets -> softmax(Q.K^T) V -> back to [N, S, H*D] -> output Dense -> residual
    -> Dense/Relu/Dense feed-forward -> residual."""
    d = dim // heads
    proj = ""
    for p, perm in (("q", "[0,2,1,3]"), ("k", "[0,2,3,1]"), ("v", "[0,2,1,3]")):
        proj += f"""
  {p}m = MatMul (x, W{p})
  {p}b = Add ({p}m, B{p})
  {p}4 = Reshape ({p}b, split4)
  {p}t = Transpose <perm={perm}> ({p}4)
  {p}s = Shape ({p}t)
  {p}lead = Gather ({p}s, i01)
  {p}bh = ReduceProd <keepdims=1> ({p}lead)
  {p}last = Gather ({p}s, i3)
  {p}tgt = Concat <axis=0> ({p}bh, minus1, {p}last)
  {p}3 = Reshape ({p}t, {p}tgt)"""
    body = f"""{proj}
  sc = MatMul (q3, k3)
  sm = Mul (sc, scale)
  pr = Softmax <axis=-1> (sm)
  o3 = MatMul (pr, v3)
  oback = Concat <axis=0> (qlead, minus1, vlast)
  o4 = Reshape (o3, oback)
  ot = Transpose <perm=[0,2,1,3]> (o4)
  o2 = Reshape (ot, merge3)
  om = MatMul (o2, Wo)
  ob = Add (om, Bo)
  h = Add (x, ob)
  f1 = MatMul (h, W1)
  f1b = Add (f1, B1)
  f1r = Relu (f1b)
  f2 = MatMul (f1r, W2)
  f2b = Add (f2, B2)
  y = Add (h, f2b)
"""
    ir = 7 if opset <= 13 else 8
    text = (f'<ir_version: {ir}, opset_import: ["" : {opset}]>\n'
            f'keras_mha (float[unk__5,{seq},{dim}] x) => (float[unk__6,{seq},{dim}] y) '
            f'<int64[4] split4 = {{0,0,{heads},{d}}}, int64[3] merge3 = {{0,0,{dim}}}, int64[2] i01 = {{0,1}}, '
            f'int64[1] i3 = {{3}}, int64[1] minus1 = {{-1}}, float scale = {{{1 / np.sqrt(d):.6f}}}> '
            f'{{\n{body}\n}}')
    weights = {f"W{p}": (dim, dim) for p in "qkvo"} | {f"B{p}": (dim,) for p in "qkvo"}
    weights |= {"W1": (dim, ffn), "B1": (ffn,), "W2": (ffn, dim), "B2": (dim,)}
    return make_model(text, weights)


@pytest.mark.parametrize("opset", [13, 17])
def test_keras_attention_prunes_whole_heads(opset):
    model = keras_encoder(opset)
    analysis = graphprune.analyze(model)
    heads = [g for g in analysis.groups if g.width == 4]
    assert len(heads) == 1 and heads[0].size == 8
    result = _check(model)
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    kept = shapes["Wq"][1]
    assert kept % 4 == 0 and kept < 32  # whole heads of 4
    assert shapes["Wk"][1] == shapes["Wv"][1] == shapes["Wo"][0] == kept
    # the split target [0, 0, heads, 4] follows the kept head count
    split = [i for i in result.model.graph.initializer if tuple(i.dims) == (4,) and i.data_type == 7]
    assert any(onnx.numpy_helper.to_array(i).tolist() == [0, 0, kept // 4, 4] for i in split)


def test_keras_attention_heads_tie_before_value_head_dim():
    """The value projection comes first in tf2onnx's node order: its reshape must not take the
    head dimension as carrier (which would pin every head), since Q.K^T pins head_dim on Q/K."""
    reasons = " ".join(p.reason for p in graphprune.analyze(keras_encoder(13)).pinned)
    assert "contraction between two activations" not in reasons, reasons


# -- Keras LayerNormalization as tf2onnx writes it: GlobalAveragePool over the last axis ---------

def keras_layernorm(opset: int = 13) -> onnx.ModelProto:
    """x -> Dense -> LayerNormalization (mean and variance by GlobalAveragePool on [N, S, D],
    which averages every axis after 1) -> Relu -> Dense."""
    body = """
  h0 = MatMul (x, W0)
  h = Add (h0, B0)
  mean = GlobalAveragePool (h)
  d = Sub (h, mean)
  d2 = Mul (d, d)
  var = GlobalAveragePool (d2)
  ve = Add (var, eps)
  sd = Sqrt (ve)
  inv = Reciprocal (sd)
  sc = Mul (inv, G)
  n = Mul (d, sc)
  ln = Add (n, Be)
  r = Relu (ln)
  y0 = MatMul (r, W1)
  y = Add (y0, B1)
"""
    text = (f'<ir_version: 7, opset_import: ["" : {opset}]>\n'
            f'keras_ln (float[unk__1,8,16] x) => (float[unk__2,8,16] y) <float eps = {{0.001}}> {{\n{body}\n}}')
    return make_model(text, {"W0": (16, 32), "B0": (32,), "G": (32,), "Be": (32,), "W1": (32, 16), "B1": (16,)})


def test_keras_layernorm_global_pool_is_a_reduction():
    model = keras_layernorm()
    analysis = graphprune.analyze(model)
    assert not analysis.groups  # the hidden width is the LayerNorm's: pinned by default
    assert any("reduced axis" in p.reason for p in analysis.pinned), [p.reason for p in analysis.pinned]
    hidden = graphprune.analyze(model, prune_hidden=True)
    assert [g.size for g in hidden.groups] == [32]
    result = _check(model, prune_hidden=True)
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["W0"][1] == shapes["G"][0] == shapes["W1"][0] == 16


# -- Keras MultiHeadAttention kept as Einsum (its own equations, kernels [C, H, D]) --------------

def keras_einsum_attention() -> onnx.ModelProto:
    body = """
  qe = Einsum <equation="abc,cde->abde"> (x, Wq)
  q = Add (qe, Bq)
  ke = Einsum <equation="abc,cde->abde"> (x, Wk)
  k = Add (ke, Bk)
  ve = Einsum <equation="abc,cde->abde"> (x, Wv)
  v = Add (ve, Bv)
  s = Einsum <equation="aecd,abcd->acbe"> (k, q)
  p = Softmax <axis=-1> (s)
  o = Einsum <equation="acbe,aecd->abcd"> (p, v)
  oe = Einsum <equation="abcd,cde->abe"> (o, Wo)
  ob = Add (oe, Bo)
  h = Add (x, ob)
  f1 = MatMul (h, W1)
  f1r = Relu (f1)
  f2 = MatMul (f1r, W2)
  y = Add (h, f2)
"""
    text = (f'<ir_version: 8, opset_import: ["" : 15]>\n'
            f'keras_einsum (float[unk__5,8,32] x) => (float[unk__6,8,32] y) {{\n{body}\n}}')
    weights = {f"W{p}": (32, 8, 4) for p in "qkv"} | {f"B{p}": (8, 4) for p in "qkv"}
    weights |= {"Wo": (8, 4, 32), "Bo": (32,), "W1": (32, 64), "W2": (64, 32)}
    return make_model(text, weights)


def test_keras_einsum_attention_prunes_heads():
    model = keras_einsum_attention()
    sizes = sorted(g.size for g in graphprune.analyze(model).groups)
    assert sizes == [4, 8, 64]  # V's head dim (shared by all heads), the heads, the feed-forward
    result = _check(model)
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert shapes["Wq"][1] == shapes["Wk"][1] == shapes["Wv"][1] == shapes["Wo"][0] == shapes["Bq"][0]
    assert shapes["Wq"][2] == shapes["Wk"][2] == 4  # Q.K^T contraction: head dim kept


# -- an incomplete tf2onnx export: TensorFlow ops left in the graph -----------------------------

def test_unconverted_tensorflow_ops_are_named(tmp_path):
    """tf2onnx leaves ops it cannot convert (ConvNeXt under Keras 3: StatefulPartitionedCall with a
    binary config_proto attribute, Erfc) in the default domain: a one-line error that names them."""
    from graphprune.errors import BadInputError

    node = onnx.helper.make_node("StatefulPartitionedCall", ["x"], ["y"], name="dwconv",
                                 config_proto=b"\n\x07\n\x03CPU\x10\x01\x82\x01\x00")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["unk__1", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["unk__2", 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    with pytest.raises(BadInputError, match="not ONNX ops \\(StatefulPartitionedCall x1\\)"):
        graphprune.analyze(model)
    path = tmp_path / "incomplete.onnx"
    onnx.save(model, path)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "graphprune", str(path), "--target-flops", "0.5", "-o",
                          str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "StatefulPartitionedCall" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out.onnx").exists()
